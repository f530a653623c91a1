"""The named conventions of the normalization layers: PyTorch's (the default), Keras 3's,
and the two layer-norm formulas with epsilon outside the square root.

- ``"torch"``: PyTorch's epsilon values and formulas, the defaults everywhere.
- ``"keras"``: Keras 3's epsilon values and, for batch norm, Keras's momentum meaning (the
  weight of the *old* running value) and its biased running variance.
- ``"eps_outside"`` (layer norm only): ``(x - E[x]) / (sqrt(Var[x]) + eps)`` with the biased
  variance, the formula of the seed text ``seeds/003``; eps 1e-5 (PyTorch's value: the
  text names none).
- ``"annotated_transformer"`` (layer norm only): ``(x - E[x]) / (std(x) + eps)`` with the
  unbiased standard deviation (``torch.std``'s default) and eps 1e-6, as in the Annotated
  Transformer's ``LayerNorm`` (Rush, 2018).

The numbers are the sources' documented defaults. ``docs/conventions.md`` compares them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import check_choice
from ..errors import UsageError


@dataclass(frozen=True)
class Convention:
    """One named convention: its default eps per norm kind (the kinds it applies to) and,
    for layer norm, where epsilon goes and which variance is used.

    ``eps_outside_sqrt=False, correction=0`` is the formula of ``torch.nn.LayerNorm`` and of
    the fused kernels, ``(x - E[x]) / sqrt(Var[x] + eps)``; otherwise
    ``(x - E[x]) / (sqrt(Var[x]) + eps)``, the variance computed with ``correction``
    (0: biased, divide by n; 1: unbiased, divide by n - 1)."""

    name: str
    eps: dict[str, float | None]  # None: the dtype's machine epsilon (torch.nn.RMSNorm)
    eps_outside_sqrt: bool = False
    correction: int = 0

    @property
    def is_stock_formula(self) -> bool:
        """True when the layers compute ``torch.nn``'s formula (only eps may differ)."""
        return not self.eps_outside_sqrt and self.correction == 0


_ALL_KINDS = ("batch", "layer", "rms", "group", "instance")

CONVENTION_TABLE: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention("torch", dict(zip(_ALL_KINDS, (1e-5, 1e-5, None, 1e-5, 1e-5), strict=True))),
        Convention("keras", dict(zip(_ALL_KINDS, (1e-3, 1e-3, 1e-6, 1e-3, 1e-3), strict=True))),
        Convention("eps_outside", {"layer": 1e-5}, eps_outside_sqrt=True),
        Convention("annotated_transformer", {"layer": 1e-6}, eps_outside_sqrt=True, correction=1),
    )
}
CONVENTIONS = tuple(CONVENTION_TABLE)
# Batch-norm momentum, in each convention's own meaning.
DEFAULT_MOMENTUM = {"torch": 0.1, "keras": 0.99}


def check_convention(kind: str, convention: str) -> Convention:
    """The :class:`Convention` named ``convention``, if it applies to the norm ``kind``;
    otherwise ``ValueError`` naming the conventions that do."""
    check_choice("convention", convention, CONVENTIONS)
    row = CONVENTION_TABLE[convention]
    if kind not in row.eps:
        accepted = ", ".join(repr(n) for n, c in CONVENTION_TABLE.items() if kind in c.eps)
        raise UsageError(
            f"convention={convention!r} applies to norm kind(s) "
            f"{', '.join(map(repr, row.eps))} only, not {kind!r}; accepted for {kind!r}: "
            f"{accepted}"
        )
    return row


def resolve_eps(kind: str, eps: float | None, convention: str) -> float | None:
    """The epsilon to use: ``eps`` if given, else the convention's default for ``kind``."""
    row = check_convention(kind, convention)
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise UsageError(f"eps must be a number >= 0, got {eps!r}")
        return float(eps)
    return row.eps[kind]
