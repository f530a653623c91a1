"""MNIST and Fashion-MNIST from local files in their official IDX format, raw or gzipped.

An IDX file is a big-endian header, then the values. The header's first 4 bytes are the
magic number: two zero bytes, the value type (0x08: unsigned byte) and the number of
dimensions; then one 4-byte size per dimension. Images: magic 2051 (0x00000803), sizes
(N, 28, 28); labels: magic 2049 (0x00000801), size (N,). Every file is checked: magic
number, sizes, and a length equal to what the header announces.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MissingFileError, UsageError
from .base import DataSplit, check_limit, describe_stats, from_arrays, resolve_root, standardize

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class _Source:
    """What differs between MNIST and Fashion-MNIST."""

    name: str  # the registry's name, also the folder under root
    title: str
    url: str
    classes: str

    def hint(self, root: Path) -> str:
        files = ", ".join(name for pair in FILES.values() for name in pair)
        return (f"download the four files of {self.title} ({files}; gzipped or not) from "
                f"{self.url} into {root / self.name} (or pass root= the folder that holds "
                f"them, or set RESNORM_DATA)")


_MNIST = _Source("mnist", "MNIST", "https://yann.lecun.com/exdb/mnist/ (or the mirror "
                 "https://ossci-datasets.s3.amazonaws.com/mnist/)", "digits 0-9")
_FASHION = _Source("fashion-mnist", "Fashion-MNIST",
                   "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)",
                   "T-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, "
                   "ankle boot")


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
    raise MissingFileError(f"{source.title}: no file {first} or {first}.gz in {where}"
                            f"{missing}; {source.hint(root)}")


def _read_at_most(f, size: int) -> bytes:
    """Up to ``size`` bytes, in chunks: a header announcing terabytes allocates nothing."""
    chunks = []
    while size > 0:
        chunk = f.read(min(size, 1 << 22))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_idx(path: Path, magic: int, sample_shape: tuple[int, ...], hint: str = "") -> np.ndarray:
    """The uint8 array in an IDX file (``.gz``: gzipped) whose magic number must be
    ``magic`` and whose sizes after the first must be ``sample_shape``; ``ValueError``
    naming the file and what was expected otherwise."""
    hint = f"; {hint}" if hint else ""
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            header = _read_at_most(f, header_size)
            found = int.from_bytes(header[:4], "big")
            if len(header) >= 4 and found != magic:
                gzipped = (" (it is gzipped: name it .gz)" if header[:2] == b"\x1f\x8b"
                           and path.suffix != ".gz" else "")
                raise UsageError(f"{path} starts with magic number {found} (0x{found:08x})"
                                 f"{gzipped}; expected {magic} (0x{magic:08x}), the IDX header "
                                 f"of {'images' if magic == IMAGES_MAGIC else 'labels'}{hint}")
            if len(header) < header_size:
                raise UsageError(f"{path} is truncated: {len(header)} bytes, shorter than the "
                                 f"{header_size}-byte IDX header{hint}")
            shape = tuple(int.from_bytes(header[i:i + 4], "big")
                          for i in range(4, header_size, 4))
            if shape[1:] != sample_shape:
                raise UsageError(f"{path} holds samples of shape {shape[1:]}; expected "
                                 f"{sample_shape}{hint}")
            size = math.prod(shape)
            body = _read_at_most(f, size + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise UsageError(f"{path} is not a readable gzip file ({err}){hint}") from err
    if len(body) != size:
        problem = "truncated" if len(body) < size else "longer than its header says"
        raise UsageError(f"{path} is {problem}: its header announces {shape[0]:,} samples of "
                         f"shape {sample_shape}, {size:,} bytes after the {header_size}-byte "
                         f"header, but {'only ' if len(body) < size else 'more than '}"
                         f"{min(len(body), size):,} follow{hint}")
    return np.frombuffer(body, np.uint8).reshape(shape)


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
                raise MissingFileError(f"{source.title}: {folder / name} (or {name}.gz) is "
                                        f"missing; {hint}")
            paths.append(path)
        images = read_idx(paths[0], IMAGES_MAGIC, (28, 28), hint)
        labels = read_idx(paths[1], LABELS_MAGIC, (), hint)
        if len(images) != len(labels):
            raise UsageError(f"{paths[1]} holds {len(labels):,} labels but {paths[0]} holds "
                             f"{len(images):,} images; expected one label per image; {hint}")
        if len(labels) == 0 or labels.max() > 9:
            raise UsageError(f"{paths[1]} holds "
                             f"{'no labels' if len(labels) == 0 else f'label {labels.max()}'}"
                             f"; expected at least one label, each 0 to 9; {hint}")
        x[split] = images[:limit, None].astype(np.float32)
        x[split] /= 255
        y[split] = labels[:limit].astype(np.int64)
    mean, std = standardize(x["train"], x["test"])
    return from_arrays(
        source.name, x["train"], y["train"], x["test"], y["test"], 10,
        f"{source.title} read from the IDX files in {folder}"
        f"{'' if limit is None else f' (first {limit:,} samples of each split)'}: "
        f"{len(x['train']):,} train / {len(x['test']):,} test images of shape (1, 28, 28), "
        f"10 classes ({source.classes}); pixels scaled to [0, 1], then standardized with "
        f"the training split's {describe_stats(mean, std)}")


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


def load_fashion_mnist(root: str | os.PathLike | None = None, *,
                       limit: int | None = None) -> DataSplit:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images (1, 28, 28)
    of 10 kinds of clothing, in the same IDX files as MNIST, under ``fashion-mnist/`` in
    ``root`` (or in ``root`` itself). Options and errors as in :func:`load_mnist`."""
    return _load(_FASHION, root, limit)
