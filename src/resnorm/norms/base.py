"""Pieces shared by the normalization layers: where the channel axis is, and running statistics."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._checks import check_choice, check_input, check_int

CHANNEL_DIMS = (1, -1)


def apply_channels_at(
    x: torch.Tensor, channel_dim: int, native_dim: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply ``fn``, which expects channels at ``native_dim``, to ``x`` whose channels are at
    ``channel_dim``. For (N, C) inputs dims 1 and -1 coincide and nothing moves.

    A contiguous input gives a contiguous output. Moving the channels back alone would hand
    the next layer channels-last strides, and PyTorch 2.13's oneDNN backward of a strided
    1x1 convolution (a ResNet's projection shortcut) on such an input, with one intra-op
    thread, corrupts the heap (glibc aborts, or the process hangs; reproduced with torch
    alone: ``Conv2d(4, 8, 1, 2)`` on ``x.movedim(1, -1).contiguous().movedim(-1, 1)``)."""
    if x.dim() <= 2 or channel_dim == native_dim:
        return fn(x)
    out = fn(x.movedim(channel_dim, native_dim)).movedim(native_dim, channel_dim)
    return out.contiguous() if x.is_contiguous() else out


def channel_view(param: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """Reshape a per-channel parameter of shape (C,) so it broadcasts against an ndim input."""
    if channel_dim == -1 or ndim <= 2:
        return param
    return param.view(-1, *([1] * (ndim - 2)))


class RunningStatsNorm(nn.Module):
    """Base of the norms that keep running statistics (batch norm, instance norm).

    Holds the same parameters and buffers, under the same names, as ``torch.nn``'s
    ``_NormBase``, so state dicts move between the two both ways.
    """

    _version = 2
    _min_dims = 2

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        channel_dim: int,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = check_int("num_features", num_features, minimum=1)
        self.eps = eps
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.channel_dim = check_choice("channel_dim", channel_dim, CHANNEL_DIMS)
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check(self, x: torch.Tensor) -> None:
        check_input(
            "input",
            x,
            ndims=range(self._min_dims, 6),
            channels=self.num_features,
            channel_dim=self.channel_dim,
            what=type(self).__name__,
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Checkpoints written before num_batches_tracked existed (torch < 0.4.1) lack it;
        # torch.nn then keeps the module's own counter (0 for a new module; a new 0 on the
        # meta device), and so do we.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = (
                self.num_batches_tracked
                if self.num_batches_tracked.device != torch.device("meta")
                else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )
        if self.channel_dim != 1:
            text += f", channel_dim={self.channel_dim}"
        return text
