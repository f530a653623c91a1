"""The claims study (``resnorm lab claims``): every claim of the seed texts tested with
several seeds, a learning rate tuned per variant on a validation split, a 95% interval
per effect and a verdict rule fixed before the run.

- :mod:`.protocol` reads the claims and their rules (``resnorm/lab/studies/claims.toml``);
- :mod:`.experiments` is the table of experiments: variants and measures;
- :mod:`.jobs` trains one run and takes its measurements; :mod:`.models` holds the models
  the zoo does not have;
- :mod:`.engine` plans, trains (resuming), picks learning rates and judges;
- :mod:`.stats` holds the intervals and verdict rules; :mod:`.report` writes the report.
"""

from .engine import run_claims
from .protocol import Claim, Criterion, Protocol, Size, load_protocol, parse_protocol

__all__ = [
    "Claim",
    "Criterion",
    "Protocol",
    "Size",
    "load_protocol",
    "parse_protocol",
    "run_claims",
]
