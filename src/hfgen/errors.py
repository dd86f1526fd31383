"""User-facing errors: bad recipes, data, model paths or CLI input.

Anything raised as `UserError` is printed as one paragraph and the process exits with code 2,
without a traceback; a run stopped by the divergence guard (`Diverged`) exits with code 3 the same way.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class UserError(Exception):
    """A problem with what the user gave us (recipe, data, paths, flags), not with hfgen."""


class Diverged(Exception):
    """Training stopped on a non-finite loss or gradient norm (see `hfgen.guard`)."""


@contextmanager
def exit_on_user_error(program: str = "hfgen"):
    """Turn a `UserError` into a one-paragraph message on stderr and exit code 2 (`Diverged`: exit code 3)."""
    try:
        yield
    except UserError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except Diverged as error:
        print(f"{program}: diverged: {error}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except Exception as error:
        # A chat template's own refusal of a row (its raise_exception: a TemplateError itself, not a subclass such
        # as a syntax error) past the rows the check renders: the data does not fit the model's template.
        from jinja2.exceptions import TemplateError

        if type(error) is not TemplateError:
            raise
        from hfgen.data.rendering import template_refusal

        print(f"{program}: error: {template_refusal(error, 'a row of the data')}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
