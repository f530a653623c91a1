"""Default hyper-parameters of the two conventions users meet: PyTorch's and Keras 3's.

PyTorch's are the defaults everywhere. ``convention="keras"`` gives Keras's epsilon values
and, for batch norm, Keras's momentum meaning (the weight of the *old* running value) and
its biased running variance. The numbers are the libraries' documented defaults.
"""

from __future__ import annotations

from .._checks import check_choice
from ..errors import UsageError

CONVENTIONS = ("torch", "keras")

# eps per norm kind; None means "the dtype's machine epsilon" (torch.nn.RMSNorm's default).
_DEFAULT_EPS = {
    "torch": {"batch": 1e-5, "layer": 1e-5, "rms": None, "group": 1e-5, "instance": 1e-5},
    "keras": {"batch": 1e-3, "layer": 1e-3, "rms": 1e-6, "group": 1e-3, "instance": 1e-3},
}
# Batch-norm momentum, in each convention's own meaning.
DEFAULT_MOMENTUM = {"torch": 0.1, "keras": 0.99}


def resolve_eps(kind: str, eps: float | None, convention: str) -> float | None:
    """The epsilon to use: ``eps`` if given, else the convention's default for ``kind``."""
    check_choice("convention", convention, CONVENTIONS)
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise UsageError(f"eps must be a number >= 0, got {eps!r}")
        return float(eps)
    return _DEFAULT_EPS[convention][kind]
