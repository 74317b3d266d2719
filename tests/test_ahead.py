"""projected_grpo/ahead.py: work run on a background thread, its result or its error handed back."""

import threading

import pytest

from projected_grpo.ahead import Ahead


def test_the_result_and_the_error_come_back_to_the_caller():
    started, release = threading.Event(), threading.Event()

    def work(x: int) -> tuple[int, str]:
        started.set()
        release.wait(10)
        return x + 1, threading.current_thread().name

    ahead = Ahead("cpu", work, 41)
    assert started.wait(10)  # running while the caller goes on
    release.set()
    assert ahead.result() == (42, "ahead") and ahead.result() == (42, "ahead")

    def fail() -> None:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        Ahead("cpu", fail).result()
