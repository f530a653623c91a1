"""Writing files safely: atomically (a temporary file in the target's folder, then a
rename, so a reader never sees half a file and an interrupted write leaves the old file
or nothing), and as strict JSON."""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import UsageError


@contextmanager
def atomic_open(path, mode: str = "wb") -> IO:
    """``with atomic_open(path, "w") as f: ...`` writes ``path`` atomically. The file gets
    the usual permissions (0666 less the umask), not mkstemp's 0600. A failed write (a full
    disk) leaves the old file, no temporary, and an ``OSError`` that names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None and exc.errno is not None:  # a write error names no file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value, *, coerce: bool = False):
    """``value`` with every NaN or infinite float (in nested dicts, lists and tuples)
    replaced by ``None``, so that ``json.dumps(..., allow_nan=False)`` writes strict JSON.

    With ``coerce=True`` the result is JSON data throughout, whatever ``value`` holds:
    dict keys become strings, numpy and torch scalars their Python value (through
    ``.item()``), and anything else that is not ``None``, a bool, str, int or float its
    ``str``."""
    if isinstance(value, dict):
        return {(str(k) if coerce else k): json_safe(v, coerce=coerce) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, coerce=coerce) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if not coerce or value is None or isinstance(value, (bool, str, int, float)):
        return value
    if hasattr(value, "item"):  # numpy and torch scalars
        try:
            return json_safe(value.item(), coerce=True)
        except (TypeError, ValueError):
            pass
    return str(value)


def check_writable_path(name: str, path, kind: str = "dir") -> None:
    """Raise :class:`~resnorm.errors.UsageError` naming ``name`` unless ``path`` can be
    created or written as a ``kind`` (``"dir"``: a folder; ``"file"``: a file written with
    :func:`atomic_open`), so that a command fails before its work rather than after.

    The first existing folder on the way up must accept new entries: that is tried by
    creating (and removing) an empty folder in it, since ``os.access`` says yes to root on
    ``/proc`` and ``/sys``, where nothing can be created."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind={kind!r}; accepted: 'dir', 'file'")
    what = "a folder" if kind == "dir" else "a file"
    if not str(path):
        raise UsageError(f"{name}: the path is empty; give {what} you can write to")
    target = Path(path).absolute()
    if os.path.isdir(target) and kind == "file":
        raise UsageError(f"{name}={str(path)!r} is a folder; give a file path")
    if os.path.exists(target) and not os.path.isdir(target) and kind == "dir":
        raise UsageError(f"{name}={str(path)!r} is a file; give a folder")
    # A folder is written in itself, a file (atomically) in its folder.
    start = target if kind == "dir" else target.parent
    existing = next(p for p in (start, *start.parents) if os.path.exists(p))
    if not os.path.isdir(existing):
        raise UsageError(
            f"{name}={str(path)!r}: {existing} is a file, not a folder; give "
            f"{what} you can write to"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".resnorm-write-check-", dir=existing))
    except OSError as exc:
        raise UsageError(
            f"{name}={str(path)!r}: cannot create anything in {existing} "
            f"({exc.strerror or exc}); give {what} you can write to"
        ) from None
