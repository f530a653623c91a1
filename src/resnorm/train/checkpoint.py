"""Checkpoints that lose nothing: written atomically, the previous good one kept while a run
trains, loaded with ``torch.load(weights_only=True)`` so a checkpoint file cannot run code,
and verified against a SHA-256 digest of their content (``torch.load`` does not check the
zip's CRCs, so a flipped byte inside a tensor would otherwise load silently)."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from .._io import atomic_open
from ..errors import UsageError

FORMAT = "resnorm-checkpoint"
VERSION = 2
"""Version 2 added ``checksum`` (and the run's ``identity``); version 1 files still load."""
LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
_REQUIRED = (
    "format",
    "version",
    "model",
    "optimizer",
    "scheduler",
    "rng",
    "epoch",
    "step_in_epoch",
    "global_step",
    "history",
    "config",
)


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used: corrupted, truncated or not ours."""


def _feed(digest, value) -> None:
    """Hash ``value`` (nested dicts, lists, tuples, tensors, scalars) in a canonical walk:
    dict keys in sorted order, tensors as dtype, shape and raw bytes."""
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"V{value!r}".encode())


def content_digest(state: dict) -> str:
    """The SHA-256 of a checkpoint's content (every tensor byte and every value), without
    its ``checksum`` entry."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != "checksum"})
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception (PyTorch's loading errors run to a
    paragraph of advice on one line)."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    text = lines[0]
    if len(text) > 100 and ". " in text:
        text = text.split(". ")[0]
    return f"{type(exc).__name__}: {text}"


def _write_error(exc: BaseException, path: Path) -> BaseException:
    """The error to raise for a failed checkpoint write: the ``OSError`` that says why
    (naming ``path`` when it names no file), not what hides it. When a write of
    ``torch.save`` fails (a full disk), its zip writer, closing the archive, raises a
    ``RuntimeError`` ("unexpected pos ...") over that ``OSError``."""
    cause = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    if cause is None:
        return exc
    if cause.filename is None and cause.errno is not None:
        return OSError(cause.errno, cause.strerror, str(path))
    return cause


def load_checkpoint(path) -> dict:
    """Load and validate one checkpoint file; :class:`CheckpointError` says what is wrong."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} is corrupted or truncated: it is empty")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, CheckpointError):
        raise
    except Exception as exc:  # truncated zip, garbage, or a pickle that is not allowed
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated and cannot be read ({_first_line(exc)})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a resnorm checkpoint")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    if state["version"] > VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['version']}; "
            f"this resnorm reads up to {VERSION}"
        )
    if "checksum" in state and state["checksum"] != content_digest(state):
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its content does not match the "
            f"checksum stored in it (a changed byte)"
        )
    return state


class CheckpointDir:
    """The checkpoints of one run directory: ``checkpoint.pt`` (latest) and, while the run
    trains, ``checkpoint.prev.pt`` (the one before it)."""

    def __init__(self, root) -> None:
        self.root = Path(root)
        self.latest = self.root / LATEST
        self.previous = self.root / PREVIOUS
        self.pending = self.root / (LATEST + ".new")
        self._latest_is_good = False

    def recover(self) -> None:
        """Finish what a process killed while saving left behind, before loading: a
        complete ``checkpoint.pt.new`` (atomic writes only give it its name once it is
        whole) is the newest checkpoint, so it is put in place as a save would have; the
        temporary files of interrupted atomic writes (``.NAME.XXXX.tmp``) are deleted.
        One writer per run folder."""
        if self.pending.exists():
            if self.latest.exists():
                os.replace(self.latest, self.previous)
            os.replace(self.pending, self.latest)
        if self.root.is_dir():
            for path in self.root.glob(".*.tmp"):
                path.unlink(missing_ok=True)

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
                warnings.warn(
                    f"{errors[0]}; resuming from the previous good checkpoint {self.previous}",
                    stacklevel=2,
                )
            self._latest_is_good = path == self.latest
            return state
        raise CheckpointError(
            "; ".join(errors) + "; no usable checkpoint is left: start "
            "again with a new output directory or --restart"
        )

    def save(self, state: dict) -> None:
        """Write ``state`` as the latest checkpoint; the former latest (if it was good)
        becomes the previous one. A crash at any moment leaves a usable checkpoint."""
        state = {"format": FORMAT, "version": VERSION, **state}
        state["checksum"] = content_digest(state)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_open(self.pending, "wb") as f:  # a full disk fails here: latest intact
                torch.save(state, f)
        except (OSError, RuntimeError) as exc:
            error = _write_error(exc, self.pending)
            if error is exc:
                raise
            raise error from None
        if self._latest_is_good and self.latest.exists():
            os.replace(self.latest, self.previous)
        os.replace(self.pending, self.latest)
        self._latest_is_good = True

    def drop_previous(self) -> None:
        """A finished run keeps one checkpoint: the previous one is only a fallback while
        the latest may still be replaced."""
        self.previous.unlink(missing_ok=True)

    def clear(self) -> None:
        for path in (self.latest, self.previous, self.pending):
            path.unlink(missing_ok=True)
        self._latest_is_good = False
