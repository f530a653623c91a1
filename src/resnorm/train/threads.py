"""The intra-op thread count a training call asks for, set for its duration only."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """PyTorch's intra-op thread count set to ``threads`` (unchanged when ``None``) for
    the block, and restored after it however it ends."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
