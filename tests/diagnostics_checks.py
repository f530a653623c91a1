"""What ``test_diagnostics.py`` and ``test_monitor.py`` share: strict JSON parsing, the
check that no hook is left on a model, and a small model with dead ReLU units."""

import json

import torch
from torch import nn


def _strict_json(text: str):
    """json.loads that rejects NaN, Infinity and -Infinity tokens."""

    def reject(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=reject)


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
)


def _assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            assert not hooks, f"{attr} left on {name or 'the model'}: {hooks}"
    from torch.nn.modules import module as module_mod

    assert not module_mod._global_forward_hooks
    assert not module_mod._global_forward_pre_hooks


def _dead_relu_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].bias[:3] = -1e3  # units 0-2 never fire
    return model
