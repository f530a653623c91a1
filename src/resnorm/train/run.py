"""A run is its configuration: what identifies a training run, what its folder records
about how it was made, and the one-line refusal to resume another run.

A run's *identity* is everything that changes its results: the training configuration
(with the global batch, so a run may resume on another number of processes when the
batches stay the same), what the caller says about the model and the data (names and
every option, see :func:`resnorm.train.train_named`), the model's structure (parameter
and buffer names, shapes and dtypes) and a digest of the data's tensors. It is stored in
``config.json`` and in every checkpoint; its short hash names default run folders. What
does not change results is recorded but left out: how often to checkpoint, where the data
files live, the resnorm version, the command line, the date and the machine.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError

# TrainConfig fields that do not change a run's results.
_NOT_IDENTITY = ("checkpoint_every",)
# meta keys that describe where things are or how the run was made, not what it computes.
_META_NOT_IDENTITY = ("data_root", "command")


class RunMismatchError(UsageError):
    """A run folder holds another run than the one asked for. ``differences`` maps each
    differing key (dotted path) to ``(recorded value, requested value)``."""

    def __init__(self, root, differences: dict) -> None:
        self.root, self.differences = Path(root), differences
        shown = [
            f"{key}: {_short(old)} -> {_short(new)}"
            for key, (old, new) in list(differences.items())[:6]
        ]
        more = len(differences) - len(shown)
        super().__init__(
            f"{root} holds a run with a different configuration ({'; '.join(shown)}"
            f"{f'; {more} more' if more > 0 else ''}); start it over with --restart "
            f"(resume=False), or give another --out"
        )


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if value is not _MISSING else "(none)"
    return text if len(text) <= 40 else text[:37] + "..."


_MISSING = object()


def train_identity(config: dict, world_size: int) -> dict:
    """The parts of a :class:`TrainConfig` (as a dict) that change results, with the
    global batch (``batch_size`` x processes) in place of the per-process one."""
    train = {k: v for k, v in config.items() if k not in _NOT_IDENTITY and k != "batch_size"}
    train["global_batch_size"] = config["batch_size"] * world_size
    return train


def model_structure(model: nn.Module) -> str:
    """A digest of the model's class and its state dict's names, shapes and dtypes."""
    items = [type(model).__name__] + [
        f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in model.state_dict().items()
    ]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def data_digest(data) -> str:
    """A digest of a :class:`~resnorm.data.DataSplit`'s tensors (the bytes themselves: a
    data file replaced under the same name gives another run)."""
    digest = hashlib.blake2b(digest_size=12)
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def run_identity(config, meta: dict, model: nn.Module, data, world_size: int) -> dict:
    """What identifies a run (see the module's docstring)."""
    described = {k: v for k, v in meta.items() if k not in _META_NOT_IDENTITY}
    return json.loads(
        json.dumps(
            {
                "train": train_identity(config.to_dict(), world_size),
                **described,
                "model_structure": model_structure(model),
                "data": data_digest(data),
            },
            sort_keys=True,
            default=str,
        )
    )


def identity_hash(identity: dict) -> str:
    """A short hash of an identity: equal identities, equal hashes."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _differences(old, new, prefix: str, out: dict) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in set(old) | set(new):
            _differences(old.get(key, _MISSING), new.get(key, _MISSING), f"{prefix}{key}.", out)
    elif old != new:  # a subtree present on one side only is one difference
        out[prefix.rstrip(".")] = (old, new)


def identity_differences(recorded: dict, requested: dict) -> dict:
    """``{dotted key: (recorded, requested)}`` for every key whose value differs, the
    model's first, then the data's, then the training configuration's."""
    found: dict = {}
    _differences(recorded, requested, "", found)

    def order(key: str) -> tuple:
        top = key.split(".")[0]
        return (_ORDER.index(top) if top in _ORDER else len(_ORDER), key)

    return {key: found[key] for key in sorted(found, key=order)}


_ORDER = (
    "model",
    "model_options",
    "model_structure",
    "dataset",
    "dataset_options",
    "train",
    "data",
)


def command_line() -> str:
    """The command that made this process's results, as the user typed it: the one a
    parent launching workers announced in ``$RESNORM_COMMAND``, else this process's."""
    if os.environ.get("RESNORM_COMMAND"):
        return os.environ["RESNORM_COMMAND"]
    if not sys.argv or not sys.argv[0]:
        return ""
    program = Path(sys.argv[0])
    name = (
        "python -m resnorm"
        if program.name == "__main__.py" and program.parent.name == "resnorm"
        else program.name
    )
    return " ".join([name, shlex.join(sys.argv[1:])]).strip()


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device=None) -> dict:
    """How and where something was made: the command line, versions, date and machine."""
    from .. import __version__

    machine = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        # The CPU and the vector instructions torch's kernels use: they decide the order
        # of float operations, so results that rounding moves can differ between machines.
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None:
        machine["device"] = str(device)
        if torch.device(device).type == "cuda" and torch.cuda.is_available():
            machine["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return {
        "command": command_line(),
        "resnorm": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
    }


def run_record(
    identity: dict,
    meta: dict,
    config,
    data_summary: str,
    device,
    world_size: int,
    previous: dict | None = None,
) -> dict:
    """The content of a run folder's ``config.json``: the identity and its hash, the full
    configuration, the data, and the provenance of the start (kept from ``previous``) and
    of every resume."""
    record = {
        "hash": identity_hash(identity),
        "identity": identity,
        **meta,
        "config": config.to_dict(),
        "data": data_summary,
        "device": str(device),
        "world_size": world_size,
    }
    now = provenance(device)
    if previous and isinstance(previous.get("provenance"), dict):
        record["provenance"] = previous["provenance"]
        record["resumes"] = [*previous.get("resumes", []), now]
    else:
        record["provenance"] = now
    return record
