"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from local files in the official "python version".

The files are Python 2 pickles of dicts with bytes keys: ``b"data"``, a uint8 array of
shape (N, 3072) (each row 1,024 red, then green, then blue values of a 32x32 image, row by
row), the labels (``b"labels"``; CIFAR-100: ``b"fine_labels"`` and ``b"coarse_labels"``),
``b"filenames"`` and ``b"batch_label"``. A pickle can run any Python function while it
loads, so they are read with :class:`RestrictedUnpickler`, which resolves only the few
globals these files need and refuses every other one before anything runs. It also
refuses arrays whose declared sizes add up to more than the file holds (a pickled array
stores its values in the file), so a forged shape cannot allocate more memory than the
file's size.
"""

from __future__ import annotations

import math
import os
import pickle
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._checks import check_choice, check_fits_in_memory
from ..errors import MissingFileError, UsageError
from .base import DataSplit, check_limit, describe_stats, from_arrays, resolve_root, standardize

try:  # NumPy >= 2 (its arrays pickle under this name)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class UnsafePickleError(UsageError):
    """A pickle asked for a Python global other than the few that CIFAR files need."""


def _latin1_encode(text, encoding):
    # How Python 3 writes bytes in a protocol-2 pickle: _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(
            "_codecs.encode is allowed only as (str, 'latin1'), the way pickle writes bytes"
        )
    return text.encode("latin1")


def _ndarray_class(*args):
    # Stands for numpy.ndarray, which a pickle names only as the class _reconstruct builds;
    # called directly it would allocate whatever shape the pickle asks for.
    raise pickle.UnpicklingError(
        "numpy.ndarray is allowed only as the class argument of "
        "_reconstruct, the way NumPy pickles arrays"
    )


def _empty_bytes(*args):
    # How Python 3 writes b"" in a protocol-2 pickle: bytes() with no argument.
    if args:
        raise pickle.UnpicklingError(
            "bytes is allowed only without arguments, the way pickle writes b''"
        )
    return b""


# Everything an official CIFAR file (or one Python 3 writes with protocol 2) refers to.
# Dicts, lists, ints and byte strings have opcodes of their own and need no global.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _ndarray_class,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class _PickledArray(np.ndarray):
    """An array while it is unpickled: checks the shape and dtype its pickled state
    declares before NumPy allocates them (NumPy allocates an object array before it
    looks at its values). :func:`_unpickle` hands out plain ``ndarray`` views. The
    unpickler is held by a weak reference, so a loaded array does not keep it (and all
    it read) alive."""

    def __setstate__(self, state):
        unpickler = self.unpickler()
        if unpickler is not None and isinstance(state, tuple) and len(state) in (4, 5):
            shape, dtype = state[-4:-2]  # (version,) shape, dtype, is_fortran, raw data
            if isinstance(dtype, np.dtype):
                unpickler.declare_array(shape, dtype)
        super().__setstate__(state)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR files: NumPy arrays, dicts, lists, ints and bytes, nothing else.

    ``find_class`` runs when the pickle names a global, before it can be called; any global
    outside the list raises :class:`UnsafePickleError` naming the file and the global. Byte
    strings stay bytes (``encoding="bytes"``), as in the official loading code. Every array
    the pickle builds declares its shape and dtype first; :meth:`declare_array` refuses
    them once they add up to more than the file holds, so ``file`` must be a real file
    (opened in binary mode) whose size can be read.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path
        self.file_size = os.fstat(file.fileno()).st_size
        self.declared = 0  # bytes the pickle must hold for the arrays declared so far
        self.in_memory = 0  # bytes those arrays take in memory

    def declare_array(self, shape, dtype: np.dtype) -> None:
        """Count an array of ``shape`` and ``dtype`` before it is allocated; refuse it when
        the arrays so far need more bytes than the file holds (an object array's values
        are pickled objects of at least one byte each; other arrays store their raw
        bytes), or more memory than this machine has."""
        shape = (shape,) if isinstance(shape, int) else shape
        if not (
            isinstance(shape, (tuple, list))
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise pickle.UnpicklingError(
                f"an array's shape must be a tuple of sizes >= 0, got {shape!r}"
            )
        count = math.prod(shape)
        self.declared += count if dtype.hasobject else count * dtype.itemsize
        self.in_memory += count * dtype.itemsize
        arrays = f"its arrays (the last of dtype {dtype} and shape {tuple(shape)})"
        if self.declared > self.file_size:
            raise UsageError(
                f"refused to load {self.path}: {arrays} declare {self.declared:,} bytes of "
                f"values, more than the whole file holds ({self.file_size:,} bytes), and a "
                f"pickled array stores its values in the file; it is corrupt or forged. "
                f"Replace it with the official file from {CIFAR_URL}"
            )
        check_fits_in_memory(f"loading {self.path}: {arrays}", self.in_memory)

    def _reconstruct(self, cls, shape, dtype):
        # How NumPy pickles rebuild an array: an empty one of shape (0,), then its state.
        if cls is not _ndarray_class:
            raise pickle.UnpicklingError(
                f"_reconstruct is allowed only for numpy.ndarray, got {cls!r}"
            )
        self.declare_array(shape, np.dtype(dtype))
        array = _reconstruct(_PickledArray, shape, dtype)
        array.unpickler = weakref.ref(self)
        return array

    def find_class(self, module: str, name: str):
        try:
            found = _ALLOWED_GLOBALS[module, name]
            return self._reconstruct if found is _reconstruct else found
        except KeyError:
            raise UnsafePickleError(
                f"refused to load {self.path}: the pickle asks for the Python global "
                f"{module}.{name}, and a CIFAR file needs only NumPy arrays, dicts, lists "
                f"and bytes; it is not an official CIFAR file and may be malicious. Replace "
                f"it with the official file from {CIFAR_URL}"
            ) from None


@dataclass(frozen=True)
class _Source:
    """What differs between CIFAR-10 and CIFAR-100: names and files."""

    title: str
    archive: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str

    def hint(self, root: Path) -> str:
        return (
            f"download {self.archive} (the python version) from {CIFAR_URL} and extract "
            f"it into {root}, which creates {self.folder}/ (or pass root= the folder that "
            f"holds the files, or set RESNORM_DATA)"
        )


_CIFAR10 = _Source(
    "CIFAR-10",
    "cifar-10-python.tar.gz",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
)
_CIFAR100 = _Source(
    "CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "meta"
)


def _find_folder(source: _Source, root: Path) -> Path:
    candidates = (root / source.folder, root)
    for folder in candidates:
        if (folder / source.train[0]).is_file():
            break
    else:
        where = " or ".join(str(c) for c in candidates)
        missing = "" if root.is_dir() else f" ({root} does not exist)"
        raise MissingFileError(
            f"{source.title}: no file {source.train[0]} in {where}{missing}; {source.hint(root)}"
        )
    for name in (*source.train, source.test):
        if not (folder / name).is_file():
            raise MissingFileError(
                f"{source.title}: {folder / name} is missing (the "
                f"folder holds {source.train[0]}); {source.hint(root)}"
            )
    return folder


def _unpickle(path: Path, hint: str) -> dict:
    with open(path, "rb") as f:
        try:
            content = RestrictedUnpickler(f, path).load()
        except (UsageError, MemoryError):  # UnsafePickleError and forged sizes included
            raise
        except Exception as err:  # truncated, not a pickle, or built from the wrong pieces
            raise UsageError(
                f"{path} is not a readable CIFAR pickle ({type(err).__name__}: {err}); {hint}"
            ) from err
    if not isinstance(content, dict):
        raise UsageError(
            f"{path} holds a {type(content).__name__}, but a CIFAR file holds a dict; {hint}"
        )
    return {
        k.decode("latin1") if isinstance(k, bytes) else k: v.view(np.ndarray)
        if isinstance(v, _PickledArray)
        else v
        for k, v in content.items()
    }


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _entry(entries: dict, key: str, path: Path, hint: str):
    if key not in entries:
        keys = ", ".join(sorted(repr(k) for k in entries))
        raise UsageError(f"{path} has no {key!r} entry (its keys: {keys or 'none'}); {hint}")
    return entries[key]


def _read_batch(
    path: Path, label_key: str, num_classes: int, hint: str
) -> tuple[np.ndarray, np.ndarray]:
    """One checked batch: uint8 images (N, 3072) and int64 labels (N,) in range."""
    entries = _unpickle(path, hint)
    data = _entry(entries, "data", path, hint)
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[0] >= 1
        and data.shape[1] == 3 * 32 * 32
    ):
        raise UsageError(
            f"{path}: 'data' is {_describe(data)}; expected a uint8 array of "
            f"shape (N, 3072), N >= 1 (N images of 3x32x32); {hint}"
        )
    raw = _entry(entries, label_key, path, hint)
    try:
        labels = np.asarray(raw)
    except (ValueError, TypeError):
        labels = None
    if (
        labels is None
        or labels.ndim != 1
        or labels.dtype.kind not in "iu"
        or len(labels) != len(data)
    ):
        raise UsageError(
            f"{path}: {label_key!r} is {_describe(raw)}; expected {len(data)} "
            f"integer labels, one per image; {hint}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UsageError(
            f"{path}: {label_key!r} holds values from {labels.min()} to "
            f"{labels.max()}; expected 0 to {num_classes - 1}; {hint}"
        )
    return data, labels.astype(np.int64)


def _read_split(
    folder: Path,
    names: tuple[str, ...],
    label_key: str,
    num_classes: int,
    limit: int | None,
    hint: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The batches of one split, in order; with ``limit``, only the batches it needs."""
    images, labels, count = [], [], 0
    for name in names:
        batch_images, batch_labels = _read_batch(folder / name, label_key, num_classes, hint)
        images.append(batch_images)
        labels.append(batch_labels)
        count += len(batch_labels)
        if limit is not None and count >= limit:
            break
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


def _class_names(path: Path, key: str, count: int, hint: str) -> list[str] | None:
    """The class names in the optional meta file, checked; ``None`` when it is absent."""
    if not path.is_file():
        return None
    names = _entry(_unpickle(path, hint), key, path, hint)
    if not (
        isinstance(names, list)
        and len(names) == count
        and all(isinstance(n, (bytes, str)) for n in names)
    ):
        raise UsageError(
            f"{path}: {key!r} is {_describe(names)}; expected a list of {count} class names; {hint}"
        )
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _load(
    source: _Source,
    name: str,
    root,
    label_key: str,
    num_classes: int,
    names_key: str,
    limit: int | None,
    what: str,
) -> DataSplit:
    limit = check_limit(limit)
    root = resolve_root(root)
    folder = _find_folder(source, root)
    hint = source.hint(root)
    x, y = {}, {}
    for split, files in (("train", source.train), ("test", (source.test,))):
        images, y[split] = _read_split(folder, files, label_key, num_classes, limit, hint)
        x[split] = images.reshape(-1, 3, 32, 32).astype(np.float32)
        x[split] /= 255
    mean, std = standardize(x["train"], x["test"])
    class_names = _class_names(folder / source.meta, names_key, num_classes, hint)
    shown = (
        ""
        if class_names is None
        else (": " + ", ".join(class_names[:10]) + (", ..." if num_classes > 10 else ""))
    )
    return from_arrays(
        name,
        x["train"],
        y["train"],
        x["test"],
        y["test"],
        num_classes,
        f"{source.title} (Krizhevsky 2009), the python version read from {folder}"
        f"{'' if limit is None else f' (first {limit:,} samples of each split)'}: "
        f"{len(x['train']):,} train / {len(x['test']):,} test images of shape (3, 32, 32), "
        f"{num_classes} {what}{shown}; pixels scaled to [0, 1], then standardized per "
        f"channel (RGB) with the training split's {describe_stats(mean, std)}",
    )


def load_cifar10(root: str | os.PathLike | None = None, *, limit: int | None = None) -> DataSplit:
    """CIFAR-10: 50,000 training and 10,000 test images (3, 32, 32) of 10 classes.

    ``root`` (default :func:`~resnorm.data.base.data_dir`) is the folder the official
    ``cifar-10-python.tar.gz`` was extracted into, holding ``cifar-10-batches-py/`` with
    ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` and ``batches.meta`` (optional, for
    the class names); or that folder itself. ``limit`` keeps the first ``limit`` samples of
    each split and reads only the batches they are in. Pixels are standardized per channel
    with the training split's statistics. Missing files raise ``FileNotFoundError``,
    malformed ones ``ValueError``, and pickles asking for anything but arrays, dicts, lists
    and bytes :class:`UnsafePickleError` (a ``ValueError``); each names the file and says
    where to get the official one.
    """
    return _load(_CIFAR10, "cifar10", root, "labels", 10, "label_names", limit, "classes")


def load_cifar100(
    root: str | os.PathLike | None = None, *, label: str = "fine", limit: int | None = None
) -> DataSplit:
    """CIFAR-100: 50,000 training and 10,000 test images (3, 32, 32), with ``label="fine"``
    (100 classes) or ``"coarse"`` (20 superclasses) labels.

    ``root`` (default :func:`~resnorm.data.base.data_dir`) is the folder the official
    ``cifar-100-python.tar.gz`` was extracted into, holding ``cifar-100-python/`` with
    ``train``, ``test`` and ``meta`` (optional, for the class names); or that folder itself.
    ``limit``, standardization and errors as in :func:`load_cifar10`.
    """
    check_choice("label", label, ("fine", "coarse"))
    num_classes, what = (100, "classes") if label == "fine" else (20, "superclasses")
    return _load(
        _CIFAR100,
        "cifar100",
        root,
        f"{label}_labels",
        num_classes,
        f"{label}_label_names",
        limit,
        f"{what} ({label} labels)",
    )
