"""resnorm: residual connections and normalization for PyTorch."""

from . import blocks, models, norms
from .errors import UsageError, UsageTypeError
from .models import create_model, list_models
from .norms import make_norm

__version__ = "0.1.0"

__all__ = [
    "UsageError",
    "UsageTypeError",
    "__version__",
    "blocks",
    "create_model",
    "list_models",
    "make_norm",
    "models",
    "norms",
]
