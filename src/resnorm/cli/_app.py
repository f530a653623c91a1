"""The command group and the option checks that run while a command line is parsed."""

from __future__ import annotations

import click

from .. import __version__

MAX_DEPTH = 10_000
"""The deepest --depth accepted (the ResNet paper's deepest is 1202): a deeper model is
built module by module in Python before any memory check can refuse it."""


class _UserError(click.ClickException):
    exit_code = 2


def _parse_depths(ctx, param, value: str) -> tuple[int, ...]:
    try:
        depths = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of integers (e.g. 1,16)"
        ) from None
    if not depths or min(depths) < 1:
        raise click.BadParameter(f"{value!r}: depths must be integers >= 1")
    return depths


# Option checks that run while the command line is parsed, before any work starts.


def _writable(kind: str):
    """A callback: the option's path can be written as a ``kind`` ('dir' or 'file')."""

    def check(ctx, param, value):
        if value is not None:
            from .._io import check_writable_path

            check_writable_path(param.opts[0], value, kind)
        return value

    return check


def _check_device(ctx, param, value):
    from .._checks import check_device

    return check_device(param.opts[0], value, available=True)


def _check_finite(ctx, param, value):
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return value


def _check_seeds(ctx, param, value):
    from ..lab.study import check_seeds

    return value if value is None else check_seeds(param.opts[0], value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="resnorm")
def cli() -> None:
    """Residual connections and normalization for PyTorch: building blocks, diagnostics
    and experiments."""


def _parse_shape(ctx, param, value):
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of sizes (e.g. 3,32,32)"
        ) from None
    if min(shape) < 1:
        raise click.BadParameter(f"{value!r}: sizes must be >= 1")
    return shape


def _parse_verdicts(ctx, param, value):
    from ..diagnostics import Verdict

    if not value:
        return ()
    accepted = [v.value for v in Verdict if v is not Verdict.HEALTHY]
    chosen = tuple(v.strip() for v in value.split(","))
    for v in chosen:
        if v not in accepted:
            raise click.BadParameter(f"{v!r} is not a verdict; accepted: {', '.join(accepted)}")
    return chosen


def _parse_bench_shapes(ctx, param, value):
    if value is None:
        return None
    from ..bench import parse_shapes

    try:
        return parse_shapes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _parse_list(choices):
    def parse(ctx, param, value):
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        for item in items:
            if item not in choices:
                raise click.BadParameter(f"{item!r} is not one of {', '.join(choices)}", ctx, param)
        if not items:
            raise click.BadParameter(f"give at least one of {', '.join(choices)}", ctx, param)
        return items

    return parse
