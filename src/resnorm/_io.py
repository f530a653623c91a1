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


@contextmanager
def atomic_open(path, mode: str = "wb") -> IO:
    """``with atomic_open(path, "w") as f: ...`` writes ``path`` atomically. The file gets
    the usual permissions (0666 less the umask), not mkstemp's 0600."""
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value):
    """``value`` with every NaN or infinite float (in nested dicts, lists and tuples)
    replaced by ``None``, so that ``json.dumps(..., allow_nan=False)`` writes strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
