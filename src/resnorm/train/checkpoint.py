"""Checkpoints that lose nothing: written atomically, the previous good one kept, loaded
with ``torch.load(weights_only=True)`` so a checkpoint file cannot run code."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..errors import UsageError
from .._io import atomic_open

FORMAT = "resnorm-checkpoint"
VERSION = 1
LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
_REQUIRED = ("format", "version", "model", "optimizer", "scheduler", "rng", "epoch",
             "step_in_epoch", "global_step", "history", "config")


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used: corrupted, truncated or not ours."""


def load_checkpoint(path) -> dict:
    """Load and validate one checkpoint file; :class:`CheckpointError` says what is wrong."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated zip, garbage, or a pickle that is not allowed
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated and cannot be "
                              f"read ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a resnorm checkpoint")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    if state["version"] > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state['version']}; "
                              f"this resnorm reads up to {VERSION}")
    return state


class CheckpointDir:
    """The checkpoints of one run directory: ``checkpoint.pt`` (latest) and
    ``checkpoint.prev.pt`` (the one before it)."""

    def __init__(self, root) -> None:
        self.root = Path(root)
        self.latest = self.root / LATEST
        self.previous = self.root / PREVIOUS
        self._latest_is_good = False

    def load(self) -> dict | None:
        """The newest usable checkpoint, or ``None`` if there is none. A corrupted latest
        one is reported (warning) and the previous good one used; it is left on disk,
        renamed ``checkpoint.pt.corrupt``, for inspection."""
        if not self.latest.exists() and not self.previous.exists():
            return None
        errors = []
        for path in (self.latest, self.previous):
            if not path.exists():
                continue
            try:
                state = load_checkpoint(path)
            except CheckpointError as exc:
                errors.append(str(exc))
                continue
            if path == self.previous and self.latest.exists():
                os.replace(self.latest, self.latest.with_name(LATEST + ".corrupt"))
                warnings.warn(f"{errors[0]}; resuming from the previous good checkpoint "
                              f"{self.previous}", stacklevel=2)
            self._latest_is_good = path == self.latest
            return state
        raise CheckpointError("; ".join(errors) + "; no usable checkpoint is left: start "
                              "again with a new output directory or --restart")

    def save(self, state: dict) -> None:
        """Write ``state`` as the latest checkpoint; the former latest (if it was good)
        becomes the previous one. A crash at any moment leaves a usable checkpoint."""
        state = {"format": FORMAT, "version": VERSION, **state}
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.latest.with_name(LATEST + ".new"), "wb") as f:
            torch.save(state, f)
        if self._latest_is_good and self.latest.exists():
            os.replace(self.latest, self.previous)
        os.replace(self.latest.with_name(LATEST + ".new"), self.latest)
        self._latest_is_good = True

    def clear(self) -> None:
        for path in (self.latest, self.previous, self.latest.with_name(LATEST + ".new")):
            path.unlink(missing_ok=True)
        self._latest_is_good = False
