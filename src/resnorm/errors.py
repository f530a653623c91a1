"""The project's own exception types: what the user got wrong, told apart from bugs.

Every check of user input (arguments, options, files, study files, command lines) raises
:class:`UsageError`, or :class:`UsageTypeError` for a value of the wrong type. They
subclass ``ValueError`` and ``TypeError`` so ``except ValueError`` keeps working. The
command line prints them as one line with exit status 2; any other exception escaping the
library is a bug in resnorm (or in code it ran) and is shown with its traceback, exit 1.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user: the message names the argument, the value it got and what
    is accepted."""


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong type (also a ``TypeError``)."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file the user pointed at (or a data set's official file) is not there."""


class MissingExtraError(UsageError, ImportError):
    """An optional dependency that the requested feature needs is not installed; the
    message names the extra to install."""


__all__ = ["MissingExtraError", "MissingFileError", "UsageError", "UsageTypeError"]
