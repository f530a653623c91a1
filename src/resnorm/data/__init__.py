"""Data sets: generated locally, shipped inside packages, or read from local files."""
from .base import DataSplit, cache_dir
from .mnist1d import load_mnist1d

__all__ = ["DataSplit", "cache_dir", "load_mnist1d"]
