"""Batch normalization (Ioffe & Szegedy, 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_float
from ..errors import UsageError
from .base import RunningStatsNorm, apply_channels_at, channel_view
from .conventions import DEFAULT_MOMENTUM, check_convention, resolve_eps

_DEFAULT = object()  # sentinel: "the convention's default momentum" (None has a meaning)


class BatchNorm(RunningStatsNorm):
    r"""Batch normalization over the batch and spatial dims, one statistic per channel.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    where the mean and the (biased) variance are taken over N and every spatial position,
    per channel, in training mode, and the running estimates are used in eval mode (or
    always the batch's own when ``track_running_stats=False``). Accepts (N, C), (N, C, L),
    (N, C, H, W) and (N, C, D, H, W) inputs; with ``channel_dim=-1`` channels are last,
    as in (N, T, C) token sequences.

    Running statistics, ``convention="torch"`` (default, ``momentum=0.1``)::

        running = (1 - momentum) * running + momentum * batch_stat   (unbiased variance)

    and ``momentum=None`` gives a cumulative average, as in ``torch.nn``.
    ``convention="keras"`` (``momentum=0.99``, ``eps=1e-3``) follows Keras 3::

        running = momentum * running + (1 - momentum) * batch_stat   (biased variance)

    Parameters and buffers carry the names of ``torch.nn.BatchNorm{1,2,3}d``
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``);
    with the torch convention the outputs, gradients and running statistics are those of
    the ``torch.nn`` layer.
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
        device=None,
        dtype=None,
    ):
        check_convention("batch", convention)
        if momentum is _DEFAULT:
            momentum = DEFAULT_MOMENTUM[convention]
        elif momentum is None:
            if convention != "torch":
                raise UsageError(
                    "momentum=None (cumulative moving average) is only accepted "
                    "with convention='torch'"
                )
        else:
            momentum = check_float("momentum", momentum, low=0.0, high=1.0)
        self.convention = convention
        super().__init__(
            num_features,
            resolve_eps("batch", eps, convention),
            momentum,
            affine,
            track_running_stats,
            channel_dim,
            device,
            dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats and x.numel() // self.num_features <= 1:
            raise UsageError(
                f"BatchNorm in training mode needs more than one value per channel, got input "
                f"shape {tuple(x.shape)}; use a batch of 2 or more, eval mode, or a per-sample "
                f"normalization such as norm='layer' or norm='group'"
            )
        return apply_channels_at(x, self.channel_dim, 1, self._forward_channels_first)

    # How many runs fit_stacked's copy of this module is called for under vmap (0: it is
    # not), and whether an (N, C) input is normalized over the runs too (off in the layers
    # convert_torch_batchnorm makes from torch.nn's, see OVER_RUNS_MIN_ELEMENTS); class
    # attributes, so state dicts and copies are unchanged.
    vmapped_runs = 0
    over_runs_2d = True

    def _forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        if self.convention == "keras" and self.training:
            return self._keras_train_forward(x)
        # The same arithmetic as torch.nn.modules.batchnorm._BatchNorm.forward.
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
        use_batch_stats = self.training or not self.track_running_stats
        if (
            use_batch_stats
            and self.vmapped_runs
            and x.device.type == "cpu"
            and (x.dim() > 2 or self.over_runs_2d)
            and self.vmapped_runs * x.numel() >= OVER_RUNS_MIN_ELEMENTS
        ):
            return batch_norm_over_runs(
                x, self.running_mean, self.running_var, self.weight, self.bias, factor, self.eps
            )
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )

    def _keras_train_forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.batch_norm would update the running variance with the unbiased estimate;
        # Keras uses the biased one, so the statistics are computed here.
        dims = [0, *range(2, x.dim())]
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var, mean = torch.var_mean(xf, dim=dims, correction=0, keepdim=True)
        if self.track_running_stats:
            with torch.no_grad():
                keep = self.momentum
                self.running_mean.mul_(keep).add_(
                    mean.flatten().to(self.running_mean.dtype), alpha=1 - keep
                )
                self.running_var.mul_(keep).add_(
                    var.flatten().to(self.running_var.dtype), alpha=1 - keep
                )
                self.num_batches_tracked.add_(1)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * channel_view(self.weight, y.dim(), 1) + channel_view(self.bias, y.dim(), 1)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (f", convention={self.convention!r}" if self.convention != "torch" else "")


# Below this many elements over all the runs, torch's own vmap rule is faster on the CPU
# (measured with one thread: 24 runs of (128, 16) 0.8x, 24 of (128, 32) 1.6x, 12 of
# (128, 128) 2.8x, 3 of (64, 16, 40) 1.3x): the autograd.Function's dispatch under vmap
# costs about 0.3 ms. On a GPU torch's rule is kept (its kernels take strided gradients).
# Above it, an input with positions, (N, C, L) or (N, C, H, W), is 1.4-2.4x faster over
# the runs whatever the layout of the gradient coming back; an (N, C) input only when that
# gradient is runs-first (12 runs of (128, 128): 3.3x, or 0.95x when it comes (N, runs, C);
# 24 of (128, 32): 1.5x or 0.7x). In resnorm's MLPs it is (the 8-block batch-norm MLP's
# stacked step 1.3-1.5x faster); in a plain Linear-BatchNorm1d-ReLU stack it is not
# (0.9x), so the layers fit_stacked converts from torch.nn's keep torch's rule for (N, C).
OVER_RUNS_MIN_ELEMENTS = 65536


def batch_norm_over_runs(x, running_mean, running_var, weight, bias, momentum, eps):
    """``F.batch_norm(x, ..., training=True, momentum, eps)``, for a module called under
    :func:`torch.func.vmap` over runs (:func:`resnorm.train.fit_stacked`): the runs are
    normalized as one batch norm over ``(N, runs x C, ...)``, each run's channels its own.

    The result is F.batch_norm's, by the same kernel. PyTorch's own vmap rule for batch norm
    hands the CPU kernel a transposed gradient: with 12 runs of a (128, 128) batch a
    forward and backward took 4.6 ms there, against 2.0 ms here. :class:`BatchNorm` uses
    it on the CPU when its ``vmapped_runs`` times the input's size reaches
    :data:`OVER_RUNS_MIN_ELEMENTS`."""
    return _BatchNormOverRuns.apply(x, running_mean, running_var, weight, bias, momentum, eps)[0]


class _BatchNormOverRuns(torch.autograd.Function):
    """Training-mode batch norm with a vmap rule that stacks the runs along the channels.
    Outside vmap it is ``torch.native_batch_norm`` and its backward."""

    @staticmethod
    def forward(x, running_mean, running_var, weight, bias, momentum, eps):
        return torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, running_mean, running_var, weight, _, _, ctx.eps = inputs
        ctx.save_for_backward(x, weight, running_mean, running_var, output[1], output[2])
        ctx.has_weight = weight is not None
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def backward(ctx, grad, _mean, _invstd):
        x, weight, running_mean, running_var, mean, invstd = ctx.saved_tensors
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(),
            x,
            weight,
            running_mean,
            running_var,
            mean,
            invstd,
            True,
            ctx.eps,
            [ctx.needs_input_grad[0], ctx.has_weight, ctx.has_weight],
        )
        return dx, None, None, dw, db, None, None

    @staticmethod
    def vmap(info, in_dims, x, running_mean, running_var, weight, bias, momentum, eps):
        runs = info.batch_size
        for name, stat, dim in (
            ("mean", running_mean, in_dims[1]),
            ("var", running_var, in_dims[2]),
        ):
            if stat is not None and (dim != 0 or not stat.is_contiguous()):
                raise RuntimeError(
                    f"batch_norm_over_runs updates each run's running_{name} in place: it must "
                    f"be batched along its first dim and contiguous"
                )

        def first(t, dim):
            return t.movedim(dim, 0) if dim is not None else t.expand(runs, *t.shape)

        x = first(x, in_dims[0])  # (runs, N, C, ...)
        n, c, rest = x.shape[1], x.shape[2], x.shape[3:]

        def flat(t, dim):
            return None if t is None else first(t, dim).reshape(runs * c)

        out, mean, invstd = _BatchNormOverRuns.apply(
            x.transpose(0, 1).reshape(n, runs * c, *rest),
            flat(running_mean, in_dims[1]),
            flat(running_var, in_dims[2]),
            flat(weight, in_dims[3]),
            flat(bias, in_dims[4]),
            momentum,
            eps,
        )
        return (out.view(n, runs, c, *rest), mean.view(runs, c), invstd.view(runs, c)), (1, 0, 0)
