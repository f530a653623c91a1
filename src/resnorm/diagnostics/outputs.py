"""Reading a model's output, whatever its shape, as the tensor a loss is computed from.

Models return a tensor, a tuple or list (``(logits, aux)``, an RNN's ``(output, hidden)``),
a dict, or an object with attributes (Hugging Face's ``ModelOutput``: ``.logits`` and,
when labels were given, ``.loss``). :func:`read_output` finds the logits and a ready
loss in all of them; anything else gets one line naming ``loss_fn=``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import UsageTypeError

# Where a dict-like or attribute-carrying output keeps its predictions, in order of
# preference (Hugging Face, timm/torchvision detection-style dicts, common custom names).
LOGIT_KEYS = (
    "logits",
    "prediction_logits",
    "out",
    "output",
    "outputs",
    "y",
    "pred",
    "preds",
    "predictions",
)


@dataclass(frozen=True)
class ModelOutput:
    """What :func:`read_output` found: ``logits`` (the tensor a loss compares with the
    targets, or ``None``) and ``loss`` (a scalar the model computed itself, or ``None``)."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None


def _is_scalar(value) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()


def _first_tensor(items) -> torch.Tensor | None:
    for item in items:
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            return item
        if isinstance(item, (tuple, list)):  # an RNN's (output, (h, c))
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _field(output, key: str):
    if isinstance(output, Mapping):
        return output.get(key)
    try:
        return getattr(output, key, None)
    except Exception:  # a property that raises: not a field we can read
        return None


def read_output(output) -> ModelOutput:
    """The logits and the model's own loss in ``output`` (see the module docstring).

    A tensor is the logits. A tuple or list: its first floating-point tensor (searched
    into nested tuples). A dict or an object: the first of :data:`LOGIT_KEYS` that holds a
    tensor, and ``loss`` when it holds a scalar. Raises :class:`~resnorm.errors.UsageTypeError`
    when neither is found.
    """
    if isinstance(output, torch.Tensor):
        return ModelOutput(output, None)
    if isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
        found = _first_tensor(output)
        if found is not None:
            return ModelOutput(found, None)
    else:
        loss = _field(output, "loss")
        logits = next(
            (
                v
                for k in LOGIT_KEYS
                if isinstance(v := _field(output, k), torch.Tensor) and v.is_floating_point()
            ),
            None,
        )
        if logits is None and isinstance(output, tuple):  # a namedtuple
            logits = _first_tensor(output)
        if logits is not None or _is_scalar(loss):
            return ModelOutput(logits, loss if _is_scalar(loss) else None)
    raise UsageTypeError(
        f"the model returned a {type(output).__name__}, which has no tensor diagnose can "
        f"read (accepted: a tensor; a tuple or list starting with one; a dict or object "
        f"with .logits or .loss); pass loss_fn=lambda output, targets: <scalar loss>"
    )
