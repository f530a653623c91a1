"""Studies: a grid of runs described in a TOML file, validated with clear errors.

A study file looks like this (the built-in ones are in ``resnorm/lab/studies/``)::

    name = "depth"
    description = "Plain vs residual networks over depth on MNIST-1D."
    x = "depth"                 # the swept axis of the main plot: "depth" or "batch_size"
    dataset = "mnist1d"
    seeds = 1
    init_only = false           # true: diagnostics at initialization only, no training

    [dataset_options]           # passed to resnorm.data.load_dataset
    num_samples = 10000

    [train]                     # resnorm.train.TrainConfig fields
    epochs = 10

    [quick]                     # what --quick changes (also quick_depths in [[grid]])
    train = { epochs = 2 }
    dataset_options = { num_samples = 2000 }

    [[grid]]                    # each [[grid]] table is a product of its lists
    models = ["mlp"]            # registered models that take depth=
    depths = [2, 8, 24]
    norms = ["batch", "none"]
    residual = [true, false]
    placements = ["post"]       # for models that take placement=
    batch_sizes = [128]
    options = { width = 128 }   # other keyword arguments of the model
    quick_depths = [2, 8]       # --quick uses these (and quick_batch_sizes) instead
    label = ""                  # appended to the variant's name (e.g. "DeepNorm")
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..data import DATASETS, dataset_options
from ..errors import UsageError
from ..models import accepted_options, get_model_entry
from ..norms import NORM_KINDS
from ..train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

AXES = ("depth", "batch_size")
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_TOP = {
    "name": str,
    "description": str,
    "x": str,
    "dataset": str,
    "seeds": int,
    "init_only": bool,
    "dataset_options": dict,
    "train": dict,
    "quick": dict,
    "grid": list,
}
_GRID = {
    "models": list,
    "depths": list,
    "norms": list,
    "residual": list,
    "placements": list,
    "batch_sizes": list,
    "options": dict,
    "quick_depths": list,
    "quick_batch_sizes": list,
    "label": str,
}
_QUICK = {"train": dict, "dataset_options": dict}


class StudyError(UsageError):
    """A study file that is not valid; the message names the file and the entry."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a study's grid."""

    model: str
    depth: int
    norm: str
    residual: bool
    placement: str | None
    batch_size: int
    seed: int
    options: tuple = ()
    label: str = ""

    @property
    def variant(self) -> str:
        """Everything but the swept axes and the seed, in words."""
        parts = [
            self.model,
            "residual" if self.residual else "plain",
            "no norm" if self.norm == "none" else f"{self.norm} norm",
        ]
        if self.placement == "pre":
            parts.append("pre-norm")
        if self.label:
            parts.append(self.label)
        return ", ".join(parts)

    @property
    def run_id(self) -> str:
        """A file-name-safe identifier, unique within a study."""
        parts = [self.model, f"d{self.depth}", self.norm, "res" if self.residual else "plain"]
        if self.placement is not None:
            parts.append(self.placement)
        parts += [f"{k}{v}" for k, v in self.options]
        parts += [f"b{self.batch_size}", f"s{self.seed}"]
        return "-".join(str(p).replace("/", "_").replace(" ", "") for p in parts)

    def model_overrides(self) -> dict:
        overrides = {
            "depth": self.depth,
            "norm": self.norm,
            "residual": self.residual,
            **dict(self.options),
        }
        if self.placement is not None:
            overrides["placement"] = self.placement
        return overrides


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    x: str
    dataset: str
    dataset_options: dict
    train: dict
    grid: list
    seeds: int = 1
    init_only: bool = False
    quick: dict = field(default_factory=dict)
    source: str = "<study>"
    is_quick: bool = False

    def train_config(self, batch_size: int, seed: int, device: str = "cpu") -> TrainConfig:
        return TrainConfig(
            **{**self.train, "batch_size": batch_size, "seed": seed, "device": device}
        )

    def quick_version(self) -> Study:
        """The study as ``--quick`` runs it."""
        quick = self.quick
        grid = [
            {
                **g,
                "depths": g.get("quick_depths", g["depths"]),
                "batch_sizes": g.get("quick_batch_sizes", g["batch_sizes"]),
            }
            for g in self.grid
        ]
        return Study(
            self.name,
            self.description,
            self.x,
            self.dataset,
            {**self.dataset_options, **quick.get("dataset_options", {})},
            {**self.train, **quick.get("train", {})},
            grid,
            1,
            self.init_only,
            {},
            self.source,
            is_quick=True,
        )

    def runs(self, seeds: int | None = None) -> list[RunSpec]:
        """The grid expanded, in a stable order, without duplicates."""
        specs: dict[str, RunSpec] = {}
        for group in self.grid:
            takes_placement = "placement" in accepted_options(group["models"][0])
            for model, depth, norm, residual, placement, batch, seed in itertools.product(
                group["models"],
                group["depths"],
                group["norms"],
                group["residual"],
                group["placements"] if takes_placement else [None],
                group["batch_sizes"],
                range(seeds or self.seeds),
            ):
                spec = RunSpec(
                    model,
                    depth,
                    norm,
                    residual,
                    placement,
                    batch,
                    seed,
                    tuple(sorted(group["options"].items())),
                    group.get("label", ""),
                )
                specs.setdefault(spec.run_id, spec)
        return list(specs.values())

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "x": self.x,
            "dataset": self.dataset,
            "dataset_options": self.dataset_options,
            "train": self.train,
            "seeds": self.seeds,
            "init_only": self.init_only,
            "quick": self.is_quick,
            "grid": self.grid,
            "source": self.source,
        }


def _check_table(where: str, table: dict, schema: dict, required=()) -> None:
    unknown = sorted(set(table) - set(schema))
    if unknown:
        raise StudyError(
            f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(schema)}"
        )
    for key in required:
        if key not in table:
            raise StudyError(f"{where}: missing required key {key!r}")
    for key, kind in schema.items():
        if (
            key in table
            and not isinstance(table[key], kind)
            or (kind is int and isinstance(table.get(key), bool))
        ):
            raise StudyError(f"{where}: {key} must be a {kind.__name__}, got {table[key]!r}")


def parse_study(text: str, source: str = "<study>") -> Study:
    """Parse and validate a study from TOML text; :class:`StudyError` says what is wrong."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"study {source}: not valid TOML ({exc})") from None
    where = f"study {source}"
    _check_table(where, raw, _TOP, required=("name", "dataset", "grid"))
    if not _NAME.fullmatch(raw["name"]):
        raise StudyError(
            f"{where}: name={raw['name']!r} must be 1-64 letters, digits, '.', "
            f"'_' or '-', not starting with '.' (it names the lab's folder)"
        )
    if raw.get("x", "depth") not in AXES:
        raise StudyError(f"{where}: x={raw['x']!r} is not supported; accepted: {', '.join(AXES)}")
    if raw["dataset"] not in DATASETS:
        raise StudyError(
            f"{where}: unknown dataset {raw['dataset']!r}; accepted: {', '.join(DATASETS)}"
        )
    _check_dataset_options(where, raw["dataset"], raw.get("dataset_options", {}))
    _check_dataset_options(
        f"{where}: [quick]", raw["dataset"], raw.get("quick", {}).get("dataset_options", {})
    )
    if raw.get("seeds", 1) < 1:
        raise StudyError(f"{where}: seeds must be >= 1, got {raw['seeds']}")
    train = raw.get("train", {})
    for forbidden in ("batch_size", "seed", "device"):
        if forbidden in train:
            raise StudyError(
                f"{where}: [train] must not set {forbidden} (it comes from the "
                f"grid, the seeds and --device)"
            )
    try:
        TrainConfig(**train)
    except (TypeError, ValueError) as exc:
        raise StudyError(f"{where}: [train]: {exc}") from None
    quick = raw.get("quick", {})
    _check_table(f"{where}: [quick]", quick, _QUICK)
    if not raw["grid"]:
        raise StudyError(f"{where}: [[grid]] must hold at least one table")
    grid = [_check_group(f"{where}: grid #{i + 1}", g) for i, g in enumerate(raw["grid"])]
    if "train" in quick:
        try:
            TrainConfig(**{**train, **quick["train"]})
        except (TypeError, ValueError) as exc:
            raise StudyError(f"{where}: [quick] train: {exc}") from None
    return Study(
        raw["name"],
        raw.get("description", ""),
        raw.get("x", "depth"),
        raw["dataset"],
        raw.get("dataset_options", {}),
        train,
        grid,
        raw.get("seeds", 1),
        raw.get("init_only", False),
        quick,
        source,
    )


def _check_dataset_options(where: str, dataset: str, options) -> None:
    """The options must be ones the data set's loader takes (their values are checked
    when the lab loads the data once, before any run starts)."""
    if not isinstance(options, dict):
        raise StudyError(f"{where}: dataset_options must be a table, got {options!r}")
    accepted = dataset_options(dataset)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise StudyError(
            f"{where}: dataset {dataset!r} takes no option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted)}"
        )


def _positive_ints(where: str, key: str, values: list) -> None:
    if not values or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise StudyError(
            f"{where}: {key} must be a non-empty list of integers >= 1, got {values!r}"
        )


def _check_group(where: str, group: dict) -> dict:
    if not isinstance(group, dict):
        raise StudyError(f"{where}: must be a table")
    _check_table(where, group, _GRID, required=("models", "depths"))
    group = {
        "norms": ["batch"],
        "residual": [True],
        "placements": ["post"],
        "batch_sizes": [128],
        "options": {},
        **group,
    }
    for model in group["models"]:
        try:
            get_model_entry(model)
        except ValueError as exc:
            raise StudyError(f"{where}: {exc}") from None
        accepted = accepted_options(model)
        if "depth" not in accepted:
            raise StudyError(
                f"{where}: model {model!r} has a fixed depth; use its family "
                f"(e.g. 'resnet1d', 'resnet_cifar', 'mlp') so depths can vary"
            )
        unknown = sorted(set(group["options"]) - set(accepted))
        if unknown:
            raise StudyError(
                f"{where}: model {model!r} takes no option(s) "
                f"{', '.join(unknown)}; accepted: {', '.join(accepted)}"
            )
        if "placement" not in accepted and group["placements"] != ["post"]:
            raise StudyError(f"{where}: model {model!r} takes no placement; remove placements")
    for key in ("depths", "batch_sizes", "quick_depths", "quick_batch_sizes"):
        if key in group:
            _positive_ints(where, key, group[key])
    for norm in group["norms"]:
        if norm not in NORM_KINDS:
            raise StudyError(f"{where}: unknown norm {norm!r}; accepted: {', '.join(NORM_KINDS)}")
    if not group["residual"] or not all(isinstance(r, bool) for r in group["residual"]):
        raise StudyError(f"{where}: residual must be a non-empty list of true/false")
    for placement in group["placements"]:
        if placement not in ("pre", "post"):
            raise StudyError(f"{where}: unknown placement {placement!r}; accepted: pre, post")
    return group


BUILTIN = ("depth", "init", "batch-size", "placement", "cifar10-resnet")


def load_study(name_or_path) -> Study:
    """A built-in study by name (see :data:`BUILTIN`) or a study file by path."""
    if str(name_or_path) in BUILTIN:
        text = resources.files("resnorm.lab.studies").joinpath(f"{name_or_path}.toml").read_text()
        return parse_study(text, f"{name_or_path} (built in)")
    accepted = f"give a built-in study ({', '.join(BUILTIN)}) or a study TOML file"
    if not str(name_or_path).strip():
        raise StudyError(f"study {str(name_or_path)!r} is empty; {accepted}")
    path = Path(name_or_path)
    if not path.exists():
        raise StudyError(
            f"study {name_or_path!r} is neither a built-in study "
            f"({', '.join(BUILTIN)}) nor an existing file"
        )
    if path.is_dir():
        raise StudyError(f"study {str(path)!r} is a folder; {accepted}")
    try:
        # A device (/dev/zero) or a huge file would be read without end: a study is small.
        if not path.is_file() or path.stat().st_size > _MAX_STUDY_BYTES:
            raise StudyError(
                f"study {str(path)!r} is not a study file (a regular file of at "
                f"most {_MAX_STUDY_BYTES >> 20} MiB); {accepted}"
            )
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise StudyError(
            f"study {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); {accepted}"
        ) from None
    except OSError as exc:
        raise StudyError(
            f"study {str(path)!r} cannot be read ({exc.strerror or exc}); {accepted}"
        ) from None
    study = parse_study(text, str(path))
    check_run_count(study)
    return study


_MAX_STUDY_BYTES = 1 << 20
MAX_SEEDS = 1000
MAX_RUNS = 100_000
_AXES_OF_GROUP = ("models", "depths", "norms", "residual", "placements", "batch_sizes")


def check_seeds(name: str, seeds: int) -> int:
    """``seeds`` if a lab may run that many seeds per grid point (at most
    :data:`MAX_SEEDS`); :class:`UsageError` otherwise, before any run is planned."""
    if seeds > MAX_SEEDS:
        raise UsageError(
            f"{name}={seeds} would be {seeds:,} runs for each point of the "
            f"study's grid; at most {MAX_SEEDS} seeds are accepted"
        )
    return seeds


def check_run_count(study: Study, seeds: int | None = None) -> int:
    """The number of runs ``study.runs(seeds)`` plans (at most: before duplicates are
    dropped), counted without expanding the grid; :class:`StudyError` beyond
    :data:`MAX_SEEDS` seeds or :data:`MAX_RUNS` runs. Call it before ``Study.runs``."""
    seeds = check_seeds("seeds", seeds or study.seeds)
    points = sum(
        math.prod(len(group.get(axis) or [None]) for axis in _AXES_OF_GROUP) for group in study.grid
    )
    if points * seeds > MAX_RUNS:
        raise StudyError(
            f"study {study.source}: {points:,} grid points x {seeds} seed(s) "
            f"would be {points * seeds:,} runs; at most {MAX_RUNS:,} are accepted"
        )
    return points * seeds
