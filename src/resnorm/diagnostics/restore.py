"""``state_restored``: a model measured and put back as it was (its gradients, buffers,
modes and the random generators' states), for diagnose and the other probes."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .probes import named_parameters


@contextmanager
def state_restored(
    model: nn.Module,
    net: nn.Module,
    train_mode: bool,
    named: list[tuple[str, nn.Module]] | None = None,
):
    """Clear every parameter's ``.grad`` for the measurement; afterwards (also on an error)
    put back the gradients, the buffers (running statistics), every module's mode and the
    random generators' states. In between, the model is in ``train_mode``. ``named``:
    ``net.named_modules()`` when the caller has listed them."""
    named = list(net.named_modules()) if named is None else named
    modules = [m for _, m in named]
    params = [p for _, p in named_parameters(named)]
    saved_grads = [p.grad for p in params]
    buffers = {id(b): b for m in modules for b in m._buffers.values() if b is not None}
    saved_buffers = [(b, b.detach().clone()) for b in buffers.values()]
    # The wrapper's modules too: DDP keeps a training flag of its own.
    was_training = [(m, m.training) for m in (modules if model is net else model.modules())]
    # Dropout draws from the generator: being diagnosed leaves the caller's stream as it was.
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        for p in params:
            p.grad = None
        if any(mode != train_mode for _, mode in was_training):  # else train() is a no-op
            model.train(train_mode)
        yield
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        for p, g in zip(params, saved_grads):
            p.grad = g
        with torch.no_grad():
            for buffer, saved in saved_buffers:
                buffer.copy_(saved)
        for m, mode in was_training:
            if m.training != mode:  # nn.Module's __setattr__ is slow; most are unchanged
                m.training = mode
