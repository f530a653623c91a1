"""MNIST and Fashion-MNIST from local files in their official IDX format, raw or gzipped.

An IDX file is a big-endian header, then the values. The header's first 4 bytes are the
magic number: two zero bytes, the value type (0x08: unsigned byte) and the number of
dimensions; then one 4-byte size per dimension. Images: magic 2051 (0x00000803), sizes
(N, 28, 28); labels: magic 2049 (0x00000801), size (N,). Every file is checked: magic
number, sizes, and a length equal to what the header announces.

The header is checked against the file before the values are read: a raw file must be
exactly as long as it announces, and a gzipped one cannot expand to more than 1032 times
its size (deflate's limit), so a forged header (or a gzip bomb behind one) is refused
before anything is decompressed; the values are then decompressed in bounded chunks
straight into their array, never more than the header announced.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._checks import check_fits_in_memory
from ..errors import MissingFileError, UsageError
from .base import DataSplit, check_limit, describe_stats, from_arrays, resolve_root, standardize

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
# Deflate's most compact code is 2 bits per 258-byte match: no gzip file expands beyond this.
DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 22
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class _Source:
    """What differs between MNIST and Fashion-MNIST."""

    name: str  # the registry's name, also the folder under root
    title: str
    url: str
    classes: str

    def hint(self, root: Path) -> str:
        files = ", ".join(name for pair in FILES.values() for name in pair)
        return (
            f"download the four files of {self.title} ({files}; gzipped or not) from "
            f"{self.url} into {root / self.name} (or pass root= the folder that holds "
            f"them, or set RESNORM_DATA)"
        )


_MNIST = _Source(
    "mnist",
    "MNIST",
    "https://yann.lecun.com/exdb/mnist/ (or the mirror "
    "https://ossci-datasets.s3.amazonaws.com/mnist/)",
    "digits 0-9",
)
_FASHION = _Source(
    "fashion-mnist",
    "Fashion-MNIST",
    "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)",
    "T-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot",
)


def _find_file(folder: Path, name: str) -> Path | None:
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def _find_folder(source: _Source, root: Path) -> Path:
    first = FILES["train"][0]
    candidates = (root / source.name, root)
    for folder in candidates:
        if _find_file(folder, first) is not None:
            return folder
    where = " or ".join(str(c) for c in candidates)
    missing = "" if root.is_dir() else f" ({root} does not exist)"
    raise MissingFileError(
        f"{source.title}: no file {first} or {first}.gz in {where}{missing}; {source.hint(root)}"
    )


def _read_at_most(f, size: int) -> bytes:
    """Up to ``size`` bytes: for the header, which is at most a few dozen bytes."""
    chunks = []
    while size > 0:
        chunk = f.read(min(size, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _wrong_length(
    path: Path, shape: tuple[int, ...], header_size: int, follows: int, hint: str
) -> UsageError:
    """The error for a payload of ``follows`` bytes where the header announced another size."""
    size = math.prod(shape)
    problem, count = (
        ("truncated", f"only {follows:,}")
        if follows < size
        else ("longer than its header says", f"more than {size:,}")
    )
    return UsageError(
        f"{path} is {problem}: its header announces {shape[0]:,} samples of "
        f"shape {shape[1:]}, {size:,} bytes after the {header_size}-byte "
        f"header, but {count} follow{hint}"
    )


def _check_announced(
    path: Path, gzipped: bool, shape: tuple[int, ...], header_size: int, hint: str
) -> int:
    """The payload's size in bytes, once checked without reading it: a raw file holds
    exactly its bytes, a gzipped one at most :data:`DEFLATE_MAX_RATIO` times its size, and
    a payload that could be real must still fit in this machine's memory."""
    size = math.prod(shape)
    file_size = path.stat().st_size
    if not gzipped and file_size - header_size != size:
        raise _wrong_length(path, shape, header_size, file_size - header_size, hint)
    if gzipped and header_size + size > DEFLATE_MAX_RATIO * file_size:
        raise UsageError(
            f"{path} is too small for its header: the header announces "
            f"{shape[0]:,} samples of shape {shape[1:]}, {size:,} bytes, but a "
            f"gzip file of {file_size:,} bytes expands to at most "
            f"{DEFLATE_MAX_RATIO * file_size:,} (deflate's limit is "
            f"{DEFLATE_MAX_RATIO}:1); it is truncated or forged{hint}"
        )
    try:
        check_fits_in_memory(
            f"reading {path} ({shape[0]:,} samples of shape {shape[1:]}, as its header announces)",
            size,
        )
    except UsageError as err:
        raise UsageError(f"{err}{hint}") from None
    return size


def _read_into(f, array: np.ndarray) -> int:
    """Fill ``array`` (uint8, 1-D) from ``f`` in chunks; the number of bytes read. A
    gzipped stream is decompressed one chunk at a time, so memory stays at the array plus
    one chunk whatever the stream holds."""
    view = memoryview(array)
    filled = 0
    while filled < len(array):
        count = f.readinto(view[filled : filled + _CHUNK])
        if not count:
            break
        filled += count
    return filled


def read_idx(path: Path, magic: int, sample_shape: tuple[int, ...], hint: str = "") -> np.ndarray:
    """The uint8 array in an IDX file (``.gz``: gzipped) whose magic number must be
    ``magic`` and whose sizes after the first must be ``sample_shape``; ``ValueError``
    naming the file and what was expected otherwise.

    The payload the header announces is checked against the file's size (and this
    machine's memory) before it is read, and read into an array allocated once: a
    forged header or a gzip bomb costs no more memory than a real file of that size.
    """
    hint = f"; {hint}" if hint else ""
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    gzipped = path.suffix == ".gz"
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as f:
            header = _read_at_most(f, header_size)
            found = int.from_bytes(header[:4], "big")
            if len(header) >= 4 and found != magic:
                gzip_hint = (
                    " (it is gzipped: name it .gz)"
                    if header[:2] == b"\x1f\x8b" and not gzipped
                    else ""
                )
                raise UsageError(
                    f"{path} starts with magic number {found} (0x{found:08x})"
                    f"{gzip_hint}; expected {magic} (0x{magic:08x}), the IDX "
                    f"header of {'images' if magic == IMAGES_MAGIC else 'labels'}"
                    f"{hint}"
                )
            if len(header) < header_size:
                raise UsageError(
                    f"{path} is truncated: {len(header)} bytes, shorter than the "
                    f"{header_size}-byte IDX header{hint}"
                )
            shape = tuple(
                int.from_bytes(header[i : i + 4], "big") for i in range(4, header_size, 4)
            )
            if shape[1:] != sample_shape:
                raise UsageError(
                    f"{path} holds samples of shape {shape[1:]}; expected {sample_shape}{hint}"
                )
            size = _check_announced(path, gzipped, shape, header_size, hint)
            body = np.empty(size, np.uint8)
            filled = _read_into(f, body)
            longer = filled == size and f.read(1) != b""
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise UsageError(f"{path} is not a readable gzip file ({err}){hint}") from err
    if filled != size or longer:
        raise _wrong_length(path, shape, header_size, filled + longer, hint)
    return body.reshape(shape)


def _load(source: _Source, root, limit: int | None) -> DataSplit:
    limit = check_limit(limit)
    root = resolve_root(root)
    folder = _find_folder(source, root)
    hint = source.hint(root)
    x, y = {}, {}
    for split, (images_name, labels_name) in FILES.items():
        paths = []
        for name in (images_name, labels_name):
            path = _find_file(folder, name)
            if path is None:
                raise MissingFileError(
                    f"{source.title}: {folder / name} (or {name}.gz) is missing; {hint}"
                )
            paths.append(path)
        images = read_idx(paths[0], IMAGES_MAGIC, (28, 28), hint)
        labels = read_idx(paths[1], LABELS_MAGIC, (), hint)
        if len(images) != len(labels):
            raise UsageError(
                f"{paths[1]} holds {len(labels):,} labels but {paths[0]} holds "
                f"{len(images):,} images; expected one label per image; {hint}"
            )
        if len(labels) == 0 or labels.max() > 9:
            raise UsageError(
                f"{paths[1]} holds "
                f"{'no labels' if len(labels) == 0 else f'label {labels.max()}'}"
                f"; expected at least one label, each 0 to 9; {hint}"
            )
        x[split] = images[:limit, None].astype(np.float32)
        x[split] /= 255
        y[split] = labels[:limit].astype(np.int64)
    mean, std = standardize(x["train"], x["test"])
    return from_arrays(
        source.name,
        x["train"],
        y["train"],
        x["test"],
        y["test"],
        10,
        f"{source.title} read from the IDX files in {folder}"
        f"{'' if limit is None else f' (first {limit:,} samples of each split)'}: "
        f"{len(x['train']):,} train / {len(x['test']):,} test images of shape (1, 28, 28), "
        f"10 classes ({source.classes}); pixels scaled to [0, 1], then standardized with "
        f"the training split's {describe_stats(mean, std)}",
    )


def load_mnist(root: str | os.PathLike | None = None, *, limit: int | None = None) -> DataSplit:
    """MNIST: 60,000 training and 10,000 test images (1, 28, 28) of the digits 0-9.

    ``root`` (default :func:`~resnorm.data.base.data_dir`) is a folder holding ``mnist/``
    with the four official IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
    each unpacked or ``.gz``), or a folder holding the files themselves. ``limit`` keeps the
    first ``limit`` samples of each split (every file is still read and checked). Pixels are
    standardized with the training split's mean and standard deviation. Missing files
    raise ``FileNotFoundError`` and malformed ones ``ValueError``, naming the file and
    saying where to get the official one.
    """
    return _load(_MNIST, root, limit)


def load_fashion_mnist(
    root: str | os.PathLike | None = None, *, limit: int | None = None
) -> DataSplit:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images (1, 28, 28)
    of 10 kinds of clothing, in the same IDX files as MNIST, under ``fashion-mnist/`` in
    ``root`` (or in ``root`` itself). Options and errors as in :func:`load_mnist`."""
    return _load(_FASHION, root, limit)
