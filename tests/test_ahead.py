"""projected_grpo/ahead.py: work run on a background thread, its result or its error handed back."""

import threading

import pytest
import torch

from projected_grpo.ahead import Ahead, side_stream


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


def test_wait_for_returns_at_the_event_or_when_the_function_is_done():
    allocated, release = threading.Event(), threading.Event()

    def work() -> int:
        allocated.set()
        release.wait(10)
        return 1

    ahead = Ahead("cpu", work)
    ahead.wait_for(allocated)
    assert allocated.is_set() and ahead._thread.is_alive()  # back while the function still runs
    release.set()
    assert ahead.result() == 1

    def fail() -> None:  # raises before it sets the event: wait_for must not hang
        raise RuntimeError("out of memory before the KV cache")

    never = threading.Event()
    ahead = Ahead("cpu", fail)
    ahead.wait_for(never)
    assert not never.is_set()
    with pytest.raises(RuntimeError, match="before the KV cache"):
        ahead.result()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the side stream exists there only")
def test_the_side_streams_work_is_finished_when_the_error_comes_back():
    """A function that queues GPU work and then raises: by the time result() raises, the side
    stream has run what was queued (the caller may free or reuse what that work touches)."""

    def fail() -> None:
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU cycles, queued on the side stream
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        Ahead("cuda", fail).result()
    assert side_stream(torch.cuda.current_device()).query()
