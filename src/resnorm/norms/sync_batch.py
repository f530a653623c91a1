"""Synchronized batch normalization: the statistics of the whole batch of a distributed job.

Under data-parallel training each process holds a slice of the batch; a plain batch norm
normalizes each slice with its own statistics, so the network trained with N processes
of batch B is not the network trained with one process of batch N x B. ``SyncBatchNorm``
combines the slices' statistics first, forward and backward.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError, UsageTypeError
from .base import apply_channels_at, channel_view
from .batch import _DEFAULT, BatchNorm

_TORCH_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalization of a channels-first slice with the statistics of all slices.

    Forward: one ``all_reduce`` of, per channel, the count, the sum and the sum of squares
    of every slice, in float64, built from each slice's own mean and variance (n * mean,
    n * (var + mean^2)): the global variance E[x^2] - E[x]^2 then cancels only in float64,
    accurate to ~1e-16 * mean^2 / var where float32 sums of squares would lose everything
    for data far from zero. (An ``all_gather`` of the slices' moments, combined with Chan
    et al.'s formula, is as exact but twice as slow with gloo.)

    Backward of y = (x - mean) * invstd * w + b over the global batch of N values::

        dx = w * invstd * (dy - sum(dy) / N - (x - mean) * invstd^2 * sum(dy * (x - mean)) / N)

    with both sums all-reduced over the processes (each process's loss reaches every
    slice through the shared statistics); dw and db are the local sums, which
    DistributedDataParallel then averages like every other gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        local_count = x.numel() // channels
        wide = torch.float32 if x.device.type == "mps" else torch.float64  # no float64 on MPS
        if local_count:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            mean, var = mean.to(wide), var.to(wide)
        else:  # a process may hold no sample of a small trailing batch
            mean = var = torch.zeros(channels, dtype=wide, device=x.device)
        sums = torch.cat(
            [
                torch.full((1,), float(local_count), dtype=wide, device=x.device),
                mean * local_count,
                (var + mean * mean) * local_count,
            ]
        )
        dist.all_reduce(sums, group=group)
        total = sums[0]
        if x.device.type == "cpu" and total.item() <= 1:  # no host sync on accelerators
            raise UsageError(
                f"SyncBatchNorm in training mode needs more than one value per channel over "
                f"all processes, got {int(total.item())}; use larger batches"
            )
        mean = sums[1 : channels + 1] / total
        var = (sums[channels + 1 :] / total - mean * mean).clamp(min=0).to(x.dtype)
        mean, total = mean.to(x.dtype), total.to(x.dtype)
        invstd = torch.rsqrt(var + eps)
        y = (x - channel_view(mean, x.dim(), 1)) * channel_view(invstd, x.dim(), 1)
        if weight is not None:
            y = y * channel_view(weight, x.dim(), 1) + channel_view(bias, x.dim(), 1)
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.group = group
        ctx.mark_non_differentiable(mean, var, total)
        return y, mean, var, total

    @staticmethod
    def backward(ctx, dy, _mean, _var, _total):
        x, weight, mean, invstd, total = ctx.saved_tensors
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xmu = x - channel_view(mean, x.dim(), 1)
        sum_dy = dy.sum(dims)
        sum_dy_xmu = (dy * xmu).sum(dims)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums, group=ctx.group)
            global_dy, global_dy_xmu = sums.split(channels)
            scale = invstd if weight is None else invstd * weight
            grad_x = channel_view(scale, x.dim(), 1) * (
                dy
                - channel_view(global_dy / total, x.dim(), 1)
                - xmu * channel_view(invstd * invstd * global_dy_xmu / total, x.dim(), 1)
            )
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xmu * invstd
        if weight is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy
        return grad_x, grad_weight, grad_bias, None, None


class SyncBatchNorm(BatchNorm):
    r"""Batch normalization with the statistics of the whole distributed batch.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    where, in training mode inside a ``torch.distributed`` job of more than one process,
    the mean and (biased) variance per channel are taken over the slices of *all* the
    processes (of ``process_group``, by default all of them), so the outputs, gradients
    and running statistics are those of :class:`BatchNorm` applied in one process to the
    concatenated batch. Slices may differ in size (a process may even hold none). The
    running statistics follow :class:`BatchNorm`'s convention (``"torch"``: unbiased
    variance of the global batch, ``momentum`` the weight of the new value, ``None`` a
    cumulative average; ``"keras"``: biased variance, ``momentum`` the weight of the old
    value) and are identical on every process.

    In eval mode, outside a process group, or in a group of one process it is exactly
    :class:`BatchNorm`. Parameters and buffers carry the same names, so state dicts move
    between the two (and ``torch.nn.BatchNorm{1,2,3}d``) both ways. Build one with
    :func:`convert_sync_batchnorm`; :func:`revert_sync_batchnorm` turns it back.
    """

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum=_DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        convention: str = "torch",
        channel_dim: int = 1,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            convention=convention,
            channel_dim=channel_dim,
            device=device,
            dtype=dtype,
        )
        self.process_group = process_group

    def _synchronizes(self) -> bool:
        return (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._synchronizes():
            return super().forward(x)
        # One value per channel in this slice is fine: the check is on the global count.
        self._check(x)
        return apply_channels_at(x, self.channel_dim, 1, self._sync_forward)

    def _sync_forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        weight = bias = None
        if self.affine:
            weight, bias = self.weight.to(xf.dtype), self.bias.to(xf.dtype)
        group = self.process_group or dist.group.WORLD
        y, mean, var, total = _SyncBatchNormFunction.apply(xf, weight, bias, self.eps, group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.convention == "keras":
                    keep = self.momentum
                    new_weight, batch_var = 1.0 - keep, var
                else:
                    new_weight = (
                        1.0 / float(self.num_batches_tracked)
                        if self.momentum is None
                        else self.momentum
                    )
                    keep = 1.0 - new_weight
                    batch_var = var * (total / (total - 1).clamp(min=1))
                self.running_mean.mul_(keep).add_(
                    mean.to(self.running_mean.dtype), alpha=new_weight
                )
                self.running_var.mul_(keep).add_(
                    batch_var.to(self.running_var.dtype), alpha=new_weight
                )
        return y.to(x.dtype)


_SYNC_CLASSES: dict[type, type] = {BatchNorm: SyncBatchNorm}
_SYNC_ONLY = ("process_group", "_sync_reverts_to", "_sync_added")


def _sync_class(cls: type) -> type:
    """The synchronized twin of a resnorm ``BatchNorm`` class: ``SyncBatchNorm``, or for a
    subclass ``K`` of yours ``class SyncK(K, SyncBatchNorm)``, whose method order puts the
    synchronization between ``K`` and ``BatchNorm``, so ``K``'s own code (an activation
    after the norm, say) still runs around the synchronized statistics."""
    if cls not in _SYNC_CLASSES:
        _SYNC_CLASSES[cls] = type(
            f"Sync{cls.__name__}", (cls, SyncBatchNorm), {"__module__": cls.__module__}
        )
    return _SYNC_CLASSES[cls]


def _retyped(module: nn.Module, cls: type, **attributes) -> nn.Module:
    """A module of class ``cls`` carrying everything ``module`` carries: the same parameter
    and buffer tensors (so an optimizer built on either keeps working and in-place updates
    show in both), children, hooks, training flag, options and any attribute of yours;
    its own containers, so registering on one does not touch the other."""
    new = cls.__new__(cls)
    state = {
        key: (copy.copy(value) if isinstance(value, (dict, set)) else value)
        for key, value in module.__dict__.items()
    }
    new.__dict__.update(state)
    new.__dict__.update(attributes)
    return new


def _torch_forward(module: nn.Module) -> bool:
    """Whether a torch.nn batch norm runs torch's own forward (a subclass may have its own,
    which a conversion would lose)."""
    return type(module).forward is nn.modules.batchnorm._BatchNorm.forward


def _convertible(module: nn.Module) -> bool:
    if isinstance(module, SyncBatchNorm):
        return False
    if isinstance(module, BatchNorm):
        return True
    if isinstance(module, _TORCH_BATCH_NORMS):
        if not _torch_forward(module):
            raise UsageTypeError(
                f"cannot synchronize {type(module).__name__}: it subclasses "
                f"{type(module).__mro__[1].__name__} with a forward() of its own, which would "
                f"be lost; build it on resnorm.norms.BatchNorm (whose subclasses convert) or "
                f"convert it yourself"
            )
        return True
    return False


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every batch norm in ``module`` by its synchronized twin, in place, and return
    the module (a new one only when ``module`` itself is a batch norm).

    resnorm's :class:`BatchNorm` (and subclasses of it) and ``torch.nn.BatchNorm1d/2d/3d``
    become :class:`SyncBatchNorm` (for a subclass, a class deriving from both) keeping the
    same parameter and buffer tensors, ``num_batches_tracked``, the training flag, every
    option (``eps``, ``momentum``, ``affine``, ``track_running_stats``, ``convention``,
    ``channel_dim``), hooks and attributes. :func:`revert_sync_batchnorm` undoes it,
    giving back the original classes. ``process_group``: the processes whose slices form
    the batch (default: all).
    """
    if not isinstance(module, nn.Module):
        raise UsageTypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if _convertible(module):
        if isinstance(module, BatchNorm):
            return _retyped(module, _sync_class(type(module)), process_group=process_group)
        # torch.nn's layers lack resnorm's two layout options: torch's meaning is added.
        added = {"convention": "torch", "channel_dim": 1}
        return _retyped(
            module,
            SyncBatchNorm,
            **added,
            process_group=process_group,
            _sync_reverts_to=type(module),
            _sync_added=tuple(added),
        )
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm` in place (a ``SyncBatchNorm`` built directly
    becomes a :class:`BatchNorm`; subclasses of ``SyncBatchNorm`` of your own are left as
    they are) and return the module, for evaluation or export in one process. Parameters,
    buffers and options are kept, as in the conversion."""
    if not isinstance(module, nn.Module):
        raise UsageTypeError(f"module must be an nn.Module, got {type(module).__name__}")
    original = {sync: plain for plain, sync in _SYNC_CLASSES.items()}
    if type(module) in original:
        target = module.__dict__.get("_sync_reverts_to") or original[type(module)]
        reverted = _retyped(module, target)
        for key in (*_SYNC_ONLY, *module.__dict__.get("_sync_added", ())):
            reverted.__dict__.pop(key, None)
        return reverted
    for name, child in module.named_children():
        reverted = revert_sync_batchnorm(child)
        if reverted is not child:
            setattr(module, name, reverted)
    return module


def convert_torch_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` by resnorm's
    :class:`BatchNorm` with torch's convention, in place, and return the module (a new one
    only when ``module`` itself is one). The same parameter and buffer tensors, options,
    training flag, hooks and attributes are kept, as :func:`convert_sync_batchnorm` keeps
    them; the outputs, gradients and running statistics are the torch layer's. A subclass
    with a ``forward()`` of its own is left as it is.

    :func:`resnorm.train.fit_stacked` does it to its own copy of the model, so that the
    batch norms of any model, not only resnorm's, normalize the stacked runs as one on the
    CPU (:func:`resnorm.norms.batch.batch_norm_over_runs`): inputs with positions, (N, C,
    L) or (N, C, H, W), only (``over_runs_2d=False``: for (N, C) torch's rule measured
    faster in plain Linear-BatchNorm1d stacks)."""
    if not isinstance(module, nn.Module):
        raise UsageTypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module, _TORCH_BATCH_NORMS) and _torch_forward(module):
        return _retyped(module, BatchNorm, convention="torch", channel_dim=1, over_runs_2d=False)
    for name, child in module.named_children():
        converted = convert_torch_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def has_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` holds a batch norm that :func:`convert_sync_batchnorm` converts
    (or one already synchronized)."""
    return any(isinstance(m, (BatchNorm, *_TORCH_BATCH_NORMS)) for m in module.modules())
