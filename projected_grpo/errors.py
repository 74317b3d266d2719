"""User errors: a bad flag, a missing or malformed file, a run folder that cannot be used. Each
is found by our checks before anything expensive starts and printed as one line,
`error: <what is wrong> (<how to fix it>)`, with exit status 2 and no traceback
(`--debug` or PROJECTED_GRPO_DEBUG=1 shows it)."""

import os
import sys
from collections.abc import Callable
from pathlib import Path
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


def unreadable_file(path: Path, error: BaseException) -> str:
    """How a file that failed to read is named in an error or a warning: its path, the
    exception's type and the start of its message (a foreign file's can run to pages)."""
    return f"{path} is unreadable ({type(error).__name__}: {str(error)[:120]})"


def flag(name: str) -> str:
    """The command-line flag of a config field (tyro spells underscores as dashes)."""
    return "--" + name.replace("_", "-")


def check_file(path: Path | None, name: str, parse: Callable[[Path], T] | None = None) -> T | None:
    """`path` (the value of field `name`) exists, and `parse` reads it; returns what `parse` read
    (None without one), so a caller need not read the file again. A default LeetCode split names
    `just download-data` as the fix."""
    fix = "run `just download-data`" if path is not None and path.parent.name == "leetcode" else f"pass an existing file to {flag(name)}"
    if path is None or not path.is_file():
        raise UserError(f"{flag(name)} {path} does not exist", fix)
    if parse is None:
        return None
    try:
        return parse(path)
    except ValueError as e:  # ProblemFormatError and jsonl_rows name file, line and field
        raise UserError(str(e), f"fix the file or pass another {flag(name)}") from e
