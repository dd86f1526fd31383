"""User-facing errors: bad recipes, data, model paths or CLI input.

Anything raised as `UserError` is printed as one paragraph and the process exits with code 2,
without a traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

EXIT_USAGE = 2


class UserError(Exception):
    """A problem with what the user gave us (recipe, data, paths, flags), not with hfgen."""


@contextmanager
def exit_on_user_error(program: str = "hfgen"):
    """Turn a `UserError` into a one-paragraph message on stderr and exit code 2."""
    try:
        yield
    except UserError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
