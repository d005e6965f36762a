"""Errors a user can cause, and the one place that turns them into a clean exit."""

from __future__ import annotations

import sys

USAGE_EXIT_CODE = 2


class UserError(Exception):
    """A problem the user can fix (bad value, bad path, missing weights offline).

    The message is one sentence that says what to do; it is printed without a traceback
    and the program exits with status 2.
    """


def exit_with(error: UserError) -> None:
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_EXIT_CODE)
