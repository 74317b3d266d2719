"""Where the harness's files live, and the one way it writes a file or folder that another process
may read meanwhile (a sweep's results job, `just results` during a sweep, a resume).

REPO_ROOT is the checkout; DATA its bundled data (data/), OUT what runs write (out/: runs,
caches, teacher pools, benchmarks), MODELS_DIR the local model folders (models/).

Guarantees:
- `atomic(path)` hands out a temporary path beside `path` (its name holds TMP, the process and
  the thread, so concurrent writers never share one) and moves it onto `path` by one rename
  once the block ends without an error; an error removes it. A reader never sees `path`
  half-written; a killed writer leaves only its temporary behind.
"""

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "data"
OUT = REPO_ROOT / "out"
MODELS_DIR = REPO_ROOT / "models"
TEST_SPLIT = DATA / "leetcode" / "leetcode_test_medhard.jsonl"  # the benchmark's test split (`just download-data`)
TMP = ".tmp"  # in the name of every temporary path `atomic` hands out


def remove(path: Path) -> None:
    """Delete a file or a folder tree, if there is one."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """`path.write_text(text)` through `atomic`: never seen half-written."""
    with atomic(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic(path: Path, replace: bool = True) -> Iterator[Path]:
    """A temporary path to write a file or a folder into (the caller creates it), moved onto
    `path` when the block ends. A file replaces the one at `path`; so does a folder, unless
    `replace` is False: then a folder that is at `path` by then (a concurrent builder of the
    same content finished first) stays, and ours is dropped."""
    tmp = path.with_name(f"{path.name}{TMP}{os.getpid()}-{threading.get_ident()}")
    remove(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    if replace and tmp.is_dir():
        remove(path)
    try:
        tmp.replace(path)
    except OSError:
        remove(tmp)
        if replace or not path.is_dir():
            raise
