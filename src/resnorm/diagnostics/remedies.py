"""What to change for a verdict: chosen from the signals that fired and from what the
model has (skips, norms, placement, zero-initialized parameters), never what it already
has."""

from __future__ import annotations

from .signals import Verdict


def remedies(verdict: Verdict, structure: dict, dead_units: bool, signals: list) -> list[str]:
    """What to change, never what the model already has."""
    fired = {s.name for s in signals if s.fired}
    out: list[str] = []
    if verdict is Verdict.VANISHING:
        out += _vanishing_remedies(structure, fired)
    elif verdict is Verdict.EXPLODING:
        out += _exploding_remedies(structure, fired)
    elif verdict is Verdict.NONFINITE:
        out.append(
            "Lower the learning rate, add warm-up, or clip gradients "
            "(torch.nn.utils.clip_grad_norm_); check the inputs and the loss for NaN/Inf."
        )
    elif verdict is Verdict.STALLED:
        out.append(
            "Raise the learning rate: the weights barely move (about 1e-3 of their norm per "
            "step is typical), or check that the loss depends on the parameters."
        )
    elif verdict is Verdict.LINEAR:
        out.append(
            "Put a nonlinearity between the layers (activation='relu' or 'gelu'): a stack of "
            "linear layers is one linear map, whatever its depth."
        )
    if dead_units:
        out.append(
            "Many ReLU units are dead: lower the learning rate, use a leaky or "
            "smooth activation (activation='gelu'), or normalize before the ReLU."
        )
    return out


def _vanishing_remedies(structure: dict, fired: set) -> list[str]:
    has_skip, has_norm = structure["has_skip"], structure["has_norm"]
    out = []
    if not has_skip:
        out.append(
            "Add skip connections (residual=True): y = F(x) + x gives gradients "
            "a path around every block."
        )
    if not has_norm:
        out.append(
            "Add normalization (norm='batch' for convnets and MLPs, 'layer' or "
            "'rms' for Transformers) so each layer's signal keeps unit scale."
        )
    if "zero_chain" in fired and structure.get("zero_init"):
        out.append(
            "Do not start every layer at zero: only one parameter per path may start at zero "
            "(the head, or each residual branch's last scale); draw the others with "
            "He/Kaiming or Xavier init."
        )
    out.append(
        "Check the initialization: He/Kaiming init for ReLU layers keeps the "
        "variance of activations and gradients constant with depth."
    )
    if "frozen_layers" in fired:
        out.append("The first layers do not train: see above, and check their learning rate.")
    if has_skip and structure["post_norm"]:
        out.append(
            "Move normalization inside the branch (placement='pre') so the skip "
            "path stays an identity from output to input."
        )
    return out


def _exploding_remedies(structure: dict, fired: set) -> list[str]:
    has_skip = structure["has_skip"]
    out = []
    if "loss_scale" in fired or "activation_growth" in fired:
        out.append(
            "Initialize with a variance-preserving scheme (He/Kaiming for ReLU, Xavier for "
            "tanh/sigmoid; torch.nn's default Linear/Conv init), not N(0, 1) or scaled-up "
            "weights: the output at initialization is far off scale."
        )
        if not structure["has_norm"]:
            out.append("Add normalization (norm='batch' or 'layer') to bound activations.")
    if "grad_ratio" in fired and not has_skip:
        if any("BatchNorm" in kind for kind in structure["norm_kinds"]):
            out.append(
                "Add skip connections (residual=True): deep plain stacks with batch "
                "norm have exploding gradients at initialization (Yang et al. 2019)."
            )
        else:
            out.append("Add skip connections (residual=True).")
    if "grad_ratio" in fired and structure["post_norm"]:
        out.append(
            "Use pre-norm placement (placement='pre'): post-norm stacks have large "
            "gradients near the output at initialization (Xiong et al. 2020)."
        )
    # A plain block scaled to zero outputs zero, not its input; a model that already
    # starts its branches at zero needs something else.
    if "grad_ratio" in fired and has_skip is not False and not structure.get("zero_init"):
        out.append(
            "Scale the residual branches at initialization (scale='rezero' or "
            "'layerscale', or zero_init_last=True) so each block starts near the "
            "identity."
        )
    out.append("Lower the learning rate, add warm-up, or clip gradients.")
    return out
