"""The claims study's protocol: the claims, their verdict rules and the study's sizes, read
from a TOML file (the built-in one is ``resnorm/lab/studies/claims.toml``) and validated
before anything runs, so that every rule is fixed before the results exist."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import tomllib

from ..study import _NAME, StudyError

VERDICTS = ("supported", "not supported", "inconclusive", "not judged")
_EFFECT = re.compile(r"\s*([a-z_]+)\.([a-z_]+)\s*(?:-\s*([a-z_]+)\.([a-z_]+)\s*)?")
_RULE = re.compile(r"\s*([<>])\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*")
_SIZE_KEYS = {
    "seeds": int,
    "num_samples": int,
    "epochs": int,
    "batch_size": int,
    "lrs": list,
    "val_fraction": float,
    "experiments": dict,
}


@dataclass(frozen=True)
class Criterion:
    """One verdict rule: ``effect`` (``a.m`` or ``a.m - b.m``, paired by seed) must lie
    beyond ``margin`` on the side ``direction`` (``">"`` or ``"<"``)."""

    what: str
    effect: str
    direction: str
    margin: float
    unit: str = ""

    @property
    def terms(self) -> list[tuple[str, str]]:
        """The (group, metric) terms: one, or two for a difference."""
        m = _EFFECT.fullmatch(self.effect)
        a = [(m.group(1), m.group(2))]
        return a + ([(m.group(3), m.group(4))] if m.group(3) else [])

    @property
    def holds_if(self) -> str:
        return f"{self.direction} {self.margin:g}"


@dataclass(frozen=True)
class Claim:
    id: str
    title: str
    quote: str
    seeds: tuple[str, ...]
    experiment: str
    criteria: tuple[Criterion, ...]
    kind: str = "claim"


@dataclass(frozen=True)
class Size:
    """How big a claims study runs: seeds, data, epochs, the learning-rate grid, and
    per-experiment overrides (``experiments["depth"] = {"depths": [...], ...}``)."""

    name: str
    seeds: int
    num_samples: int
    epochs: int
    batch_size: int
    lrs: tuple[float, ...]
    val_fraction: float
    experiments: dict = field(default_factory=dict)

    def of(self, experiment: str) -> dict:
        """The settings one experiment runs with: the size's, then its overrides."""
        base = {
            "seeds": self.seeds,
            "num_samples": self.num_samples,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lrs": list(self.lrs),
            "val_fraction": self.val_fraction,
        }
        return {**base, **self.experiments.get(experiment, {})}


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    dataset: str
    sizes: dict
    claims: tuple[Claim, ...]
    source: str = "<claims>"


def _need(where: str, table: dict, key: str, kind):
    if key not in table:
        raise StudyError(f"{where}: missing required key {key!r}")
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StudyError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
    return value


def _criterion(where: str, raw: dict) -> Criterion:
    effect = _need(where, raw, "effect", str)
    if not _EFFECT.fullmatch(effect):
        raise StudyError(
            f"{where}: effect={effect!r} must be 'group.metric' or "
            f"'group.metric - group.metric' (lower-case names)"
        )
    rule = _need(where, raw, "holds_if", str)
    m = _RULE.fullmatch(rule)
    if not m or not math.isfinite(float(m.group(2))):
        raise StudyError(f"{where}: holds_if={rule!r} must be '> number' or '< number'")
    unit = raw.get("unit", "")
    return Criterion(_need(where, raw, "what", str), effect, m.group(1), float(m.group(2)), unit)


def _claim(where: str, raw: dict, experiments) -> Claim:
    experiment = _need(where, raw, "experiment", str)
    if experiment not in experiments:
        raise StudyError(
            f"{where}: unknown experiment {experiment!r}; accepted: {', '.join(experiments)}"
        )
    kind = raw.get("kind", "claim")
    if kind not in ("claim", "follow-up"):
        raise StudyError(f"{where}: kind={kind!r}; accepted: claim, follow-up")
    raws = _need(where, raw, "criterion", list)
    if not raws:
        raise StudyError(f"{where}: a claim needs at least one [[claim.criterion]]")
    criteria = tuple(_criterion(f"{where}: criterion #{i + 1}", c) for i, c in enumerate(raws))
    outputs = experiments[experiment].outputs
    for criterion in criteria:
        for group, metric in criterion.terms:
            if metric not in outputs.get(group, ()):
                known = "; ".join(f"{g}: {', '.join(ms)}" for g, ms in outputs.items())
                raise StudyError(
                    f"{where}: experiment {experiment!r} measures no {group}.{metric}; "
                    f"it measures {known}"
                )
    seeds = tuple(_need(where, raw, "seeds", list))
    return Claim(
        _need(where, raw, "id", str),
        _need(where, raw, "title", str),
        _need(where, raw, "quote", str),
        seeds,
        experiment,
        criteria,
        kind,
    )


def _size(where: str, name: str, raw: dict, experiments) -> Size:
    unknown = sorted(set(raw) - set(_SIZE_KEYS))
    if unknown:
        raise StudyError(
            f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(_SIZE_KEYS)}"
        )
    values = {
        key: _need(where, raw, key, kind)
        for key, kind in _SIZE_KEYS.items()
        if key != "experiments"
    }
    for key in ("seeds", "num_samples", "epochs", "batch_size"):
        if values[key] < 1:
            raise StudyError(f"{where}: {key} must be >= 1, got {values[key]}")
    if not values["lrs"] or not all(isinstance(v, (int, float)) and v > 0 for v in values["lrs"]):
        raise StudyError(
            f"{where}: lrs must be a non-empty list of numbers > 0, got {values['lrs']!r}"
        )
    if not 0 < values["val_fraction"] < 0.5:
        raise StudyError(f"{where}: val_fraction must be in (0, 0.5), got {values['val_fraction']}")
    overrides = raw.get("experiments", {})
    for experiment, table in overrides.items():
        if experiment not in experiments:
            raise StudyError(
                f"{where}: experiments.{experiment}: unknown experiment; accepted: "
                f"{', '.join(experiments)}"
            )
        accepted = set(_SIZE_KEYS) - {"experiments"} | set(experiments[experiment].settings)
        bad = sorted(set(table) - accepted)
        if bad:
            raise StudyError(
                f"{where}: experiments.{experiment}: unknown key(s) {', '.join(bad)}; "
                f"accepted: {', '.join(sorted(accepted))}"
            )
    values["lrs"] = tuple(float(v) for v in values["lrs"])
    return Size(name, experiments=overrides, **values)


def parse_protocol(text: str, source: str = "<claims>") -> Protocol:
    """Parse and validate a claims protocol; :class:`StudyError` says what is wrong."""
    from .experiments import EXPERIMENTS

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"claims protocol {source}: not valid TOML ({exc})") from None
    where = f"claims protocol {source}"
    sizes = _need(where, raw, "sizes", dict)
    for required in ("default", "quick"):
        if required not in sizes:
            raise StudyError(f"{where}: [sizes.{required}] is required")
    parsed = {
        name: _size(f"{where}: [sizes.{name}]", name, table, EXPERIMENTS)
        for name, table in sizes.items()
    }
    claims = tuple(
        _claim(f"{where}: claim #{i + 1}", c, EXPERIMENTS)
        for i, c in enumerate(_need(where, raw, "claim", list))
    )
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise StudyError(f"{where}: claim ids must be unique, got {ids}")
    dataset = _need(where, raw, "dataset", str)
    if dataset != "mnist1d":
        raise StudyError(
            f"{where}: dataset={dataset!r} is not supported; accepted: mnist1d (the "
            f"experiments read the data as a 40-sample signal: patches, 1-D convolutions)"
        )
    name = _need(where, raw, "name", str)
    if not _NAME.fullmatch(name):
        raise StudyError(
            f"{where}: name={name!r} must be 1-64 letters, digits, '.', '_' or '-', not "
            f"starting with '.' (it names the lab's folder)"
        )
    return Protocol(
        name,
        raw.get("description", ""),
        dataset,
        parsed,
        claims,
        source,
    )


def is_protocol_file(path) -> bool:
    """Whether ``path`` is a TOML file of at most 1 MiB with ``[[claim]]`` tables (a claims
    protocol rather than a grid study); ``False`` for anything else."""
    try:
        path = Path(path)
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return False
        return "claim" in tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False


def load_protocol(path=None) -> Protocol:
    """The built-in claims protocol, or the one in the TOML file ``path``."""
    if path is None:
        text = resources.files("resnorm.lab.studies").joinpath("claims.toml").read_text()
        return parse_protocol(text, "claims (built in)")
    path = Path(path)
    if not is_protocol_file(path):
        raise StudyError(
            f"claims protocol {str(path)!r} is not a TOML file of at most 1 MiB with "
            f"[[claim]] tables"
        )
    return parse_protocol(path.read_text(encoding="utf-8"), str(path))
