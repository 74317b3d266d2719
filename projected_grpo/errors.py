"""User errors: a bad flag, a missing or malformed file, a run folder that cannot be used. Each
is found by our checks before anything expensive starts and printed as one line,
`error: <what is wrong> (<how to fix it>)`, with exit status 2 and no traceback
(`--debug` or PROJECTED_GRPO_DEBUG=1 shows it)."""

import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
DEBUG_ENV = "PROJECTED_GRPO_DEBUG"


class UserError(ValueError):
    """Something the user can fix; the message says what and how."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what} ({fix})")


def reported(fn: Callable[[], T], argv: list[str]) -> T:
    """fn(), with a UserError printed as one line and exit status 2 (see the module docstring).
    `--debug` is taken out of argv here, before the command's own parser sees it."""
    debug = "--debug" in argv or bool(os.environ.get(DEBUG_ENV))
    while "--debug" in argv:
        argv.remove("--debug")
    try:
        return fn()
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
