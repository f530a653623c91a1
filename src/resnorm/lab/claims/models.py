"""The models of the claims study that the model zoo does not have: a plain stack of
``Linear -> norm -> activation`` layers (the seed texts' recommended order, or the norm
after the activation), batch norm with injected noise (Santurkar et al. 2018), and a GRU
classifier over MNIST-1D as a sequence. The residual MLPs, 1-D ResNets and the Transformer
come from the zoo (:func:`resnorm.models.create_model`)."""

from __future__ import annotations

import torch
from torch import nn

from ...blocks import LayerNormGRU
from ...models import create_model
from ...norms import make_norm


class NoisyBatchNorm(nn.Module):
    """Batch norm followed by noise whose distribution changes at every training step
    (Santurkar et al. 2018, section 2.1): each unit's output is scaled by ``s ~ U(1 - n,
    1 + n)`` and shifted by ``m ~ U(-n, n)``, drawn anew per unit and per step, on top of
    per-activation Gaussian noise of standard deviation ``n / 2``. A covariate shift made
    on purpose; in eval mode it is plain batch norm."""

    def __init__(self, num_features: int, noise: float = 0.5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features)
        self.noise = float(noise)

    @property
    def draws_random_numbers(self) -> bool:
        """Noise is drawn in training (so its runs are not stacked: see
        :func:`resnorm.train.stack_refusal`)."""
        return self.noise > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if not self.training or self.noise == 0:
            return y
        n, features = self.noise, y.shape[1]
        scale = 1 + n * (2 * torch.rand(features, device=y.device, dtype=y.dtype) - 1)
        shift = n * (2 * torch.rand(features, device=y.device, dtype=y.dtype) - 1)
        return y * scale + shift + torch.randn_like(y) * (n / 2)


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "noisy-batch":
        return NoisyBatchNorm(width)
    return make_norm(kind, width)


class NormStack(nn.Module):
    """``depth x (Linear -> norm -> ReLU)`` (``order="before"``: the norm before the
    activation) or ``Linear -> ReLU -> norm`` (``"after"``), then a linear classifier.
    ``init="default"`` keeps PyTorch's initialization of ``nn.Linear``; ``"he"`` draws the
    weights from He et al.'s normal (fan in, ReLU gain) and zeroes the biases. Every
    weight matrix is then multiplied by ``scale``."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        depth: int = 8,
        width: int = 64,
        norm: str = "batch",
        order: str = "before",
        scale: float = 1.0,
        init: str = "default",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(in_features if i == 0 else width, width))
            norm_layer = _norm(norm, width) if norm != "none" else nn.Identity()
            pair = [norm_layer, nn.ReLU()] if order == "before" else [nn.ReLU(), norm_layer]
            layers += pair
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width if depth else in_features, num_classes)
        if init not in ("default", "he"):
            raise ValueError(f"init={init!r}; accepted: default, he")
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    if init == "he":
                        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                        nn.init.zeros_(module.bias)
                    module.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


class SequenceGRU(nn.Module):
    """A GRU classifier over a 1-D signal read as ``steps`` patches: ``norm="layer"`` is a
    :class:`~resnorm.blocks.LayerNormGRU` (Ba et al. 2016); ``"batch"`` batch-normalizes the
    input projection over batch and time (Laurent et al. 2016) before a GRU without norms;
    ``"none"``: neither. The last hidden state goes to a linear classifier."""

    def __init__(
        self, length: int, num_classes: int, hidden: int = 64, steps: int = 10, norm: str = "layer"
    ) -> None:
        super().__init__()
        if length % steps:
            raise ValueError(f"steps={steps} must divide the signal length {length}")
        self.steps = steps
        self.proj = nn.Linear(length // steps, hidden)
        self.proj_norm = nn.BatchNorm1d(hidden) if norm == "batch" else nn.Identity()
        self.rnn = LayerNormGRU(
            hidden, hidden, batch_first=True, norm="layer" if norm == "layer" else None
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.reshape(x.shape[0], self.steps, -1))
        x = self.proj_norm(x.transpose(1, 2)).transpose(1, 2)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Patches(nn.Module):
    """Reads a 1-D signal of ``(N, L)`` as ``(N, steps, L / steps)`` tokens for ``inner``."""

    def __init__(self, inner: nn.Module, steps: int) -> None:
        super().__init__()
        self.inner, self.steps = inner, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.reshape(x.shape[0], self.steps, -1))


def build_model(kind: str, in_features: int, num_classes: int, options: dict) -> nn.Module:
    """A claims-study model: ``"stack"``, ``"gru"``, ``"transformer"`` (patches), or a
    model of the zoo by name (``"mlp"``, ``"plain_mlp"``, ``"resnet1d"``)."""
    options = dict(options)
    if kind == "stack":
        return NormStack(in_features, num_classes, **options)
    if kind == "gru":
        return SequenceGRU(in_features, num_classes, **options)
    if kind == "transformer":
        steps = options.pop("steps", 10)
        inner = create_model(
            "transformer",
            seq_len=steps,
            in_channels=in_features // steps,
            num_classes=num_classes,
            **options,
        )
        return Patches(inner, steps)
    if kind == "resnet1d":
        if options.get("norm") == "layer":
            # Layer norm as Ba et al. define it: over every unit of the layer (channels x
            # positions) of one sample, i.e. group norm with one group. (The zoo's "layer"
            # normalizes the channels at each position, which on this 16-channel 1-D
            # signal removes each position's amplitude: it trains to ~17%.)
            options.update(norm="group", norm_options={"num_groups": 1})
        return create_model(kind, in_channels=1, num_classes=num_classes, **options)
    return create_model(kind, in_features=in_features, num_classes=num_classes, **options)
