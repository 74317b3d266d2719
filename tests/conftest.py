"""Shared fixtures. Tests run offline on CPU; BEARTYPE=1 (as in `just test`) turns on the
jaxtyping shape checks for every harness module, so the hook must go in before any import."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import typecheck  # noqa: E402,F401

import pytest  # noqa: E402

from grader import SHARED_SPLIT  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from models import TINY_MODEL, resolve_model

    return resolve_model(TINY_MODEL)


@pytest.fixture(scope="session")
def shared_split() -> Path:
    if not SHARED_SPLIT.exists():
        pytest.skip(f"the shared real test split is absent at {SHARED_SPLIT} (it lives beside the checkout in ../shared)")
    return SHARED_SPLIT
