"""The ``resnorm`` command line. Thin: it parses, calls the library, and prints.

One module per command (or pair of commands); ``_app`` holds the group and the option
checks; :func:`main` turns what escapes into one line and an exit status."""

from __future__ import annotations

import errno
import sys

import click

from ..errors import UsageError
from . import _bench, _demo_lab, _diagnose  # noqa: F401  (they register their commands)
from ._app import cli
from ._train import _forwarded_args, train

__all__ = ["_forwarded_args", "cli", "main", "train"]


# Failures of the machine rather than of the user or of resnorm: one line, exit 1.
_ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC",
        "EDQUOT",
        "EROFS",
        "EACCES",
        "EPERM",
        "EIO",
        "ENOTDIR",
        "EISDIR",
        "ENAMETOOLONG",
        "EMFILE",
        "ENOMEM",
    )
    if hasattr(errno, name)
)


def _os_error_line(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def main(argv: list[str] | None = None) -> int:
    """Entry point. Usage errors (:class:`resnorm.errors.UsageError`, click's bad options)
    print one line on stderr and exit 2; a failure of the machine (disk full, read-only
    file system, permission denied) prints one line and exits 1; anything else is a bug in
    resnorm: its traceback, a line saying so, and exit 1."""
    try:
        # Without standalone mode click returns (rather than raises) the code of an Exit.
        code = cli.main(args=argv, prog_name="resnorm", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help())
        return 0
    except click.ClickException as exc:
        click.echo(f"resnorm: error: {exc.format_message()}", err=True)
        return 2
    except UsageError as exc:
        click.echo(f"resnorm: error: {_one_line(exc)}", err=True)
        return 2
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo(
            "resnorm: interrupted (run the same command again to resume: finished work is kept)",
            err=True,
        )
        return 130
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            return _internal_error(exc)
        click.echo(f"resnorm: error: {_os_error_line(exc)}", err=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - the one place that reports bugs
        return _internal_error(exc)
    return code if isinstance(code, int) else 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _internal_error(exc: BaseException) -> int:
    import traceback

    traceback.print_exception(type(exc), exc, exc.__traceback__, limit=-8, file=sys.stderr)
    click.echo(
        f"resnorm: internal error: {type(exc).__name__}: {_one_line(exc)}\n"
        f"This is a bug in resnorm (or in code it ran, such as a --factory model), not "
        f"a problem with your command; please report it with the traceback above.",
        err=True,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
