"""Work started now on a background thread and waited for later: one-step-off training
(train.py's --one-step-off) samples step t+1's rollouts while step t learns.

Guarantees:
- The function runs on its own thread; on CUDA on the side stream of the caller's current
  device (one per device, kept, so that its cached memory is reused from step to step), after
  the work the calling thread had queued by the time `Ahead` was made: it reads what that
  work wrote.
- `result()` returns what the function returned, or raises what it raised, in the caller's
  thread; on CUDA the side stream's work is finished by then, in either case.
- `wait_for(event)` returns once the function has set `event`, or has returned or raised
  without setting it (it never waits on a function that is gone).
- A daemon thread: a run stopped meanwhile (an error, Ctrl-C, a stop on SIGTERM) is not held up by it at exit.
- `compiled_code`, held by each side around its passes through the model outside a CUDA graph's
  replay (the engine's prefill and graph making, the learner's micro-batches, an extraction), keeps
  them from overlapping: a compile anywhere traces with torch.fx, which patches nn.Module.__call__
  for every thread, and a torch.compile'd layer called meanwhile on the other thread refuses
  ("Detected that you are using FX to symbolically trace a dynamo-optimized function": the
  compiled learner beside a sampler making a graph, H100 2026-12-07), while an eager one runs
  through the other thread's tracer. It keeps, per thread name, the seconds spent waiting for it
  (`waited()`: the price of taking turns; the sampler's thread is named AHEAD_THREAD).
"""

import functools
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class Turns:
    """A re-entrant lock that adds up, per thread name, the seconds each `with` waited for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._waited: dict[str, float] = {}  # each thread adds to its own name's entry only

    def __enter__(self) -> None:
        start = time.perf_counter()
        self._lock.acquire()
        name = threading.current_thread().name
        self._waited[name] = self._waited.get(name, 0.0) + time.perf_counter() - start

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def waited(self) -> dict[str, float]:
        """Seconds waited so far, by thread name."""
        return dict(self._waited)


compiled_code = Turns()  # see the module docstring
AHEAD_THREAD = "ahead"  # the name of Ahead's thread, under which its waits are counted


@functools.cache
def side_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(index)


class Ahead(Generic[T]):
    """fn(*args) running on a background thread (see the module docstring)."""

    def __init__(self, device: str, fn: Callable[..., T], *args: object):
        """`device`: where fn works ("cpu", "cuda", "cuda:1"); on CUDA the caller's current device is used."""
        self._out: T | None = None
        self._error: BaseException | None = None
        stream = ready = None
        if torch.device(device).type == "cuda":
            # A new thread starts on device 0: the stream carries the caller's device (a torchrun rank's) there.
            stream, ready = side_stream(torch.cuda.current_device()), torch.cuda.Event()
            ready.record()  # on the caller's current stream: what the function must see
        self._thread = threading.Thread(target=self._run, args=(stream, ready, fn, args), name=AHEAD_THREAD, daemon=True)
        self._thread.start()

    def _run(self, stream: "torch.cuda.Stream | None", ready: "torch.cuda.Event | None", fn: Callable[..., T], args: tuple) -> None:
        try:
            if stream is None:
                self._out = fn(*args)
                return
            try:
                with torch.cuda.device(stream.device), torch.cuda.stream(stream):
                    stream.wait_event(ready)
                    self._out = fn(*args)
            finally:
                stream.synchronize()  # after an error too: result() promises the side stream's work is done
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e

    def wait_for(self, event: threading.Event) -> None:
        """Until `event` is set (by the function, at a point it promises) or the function is done."""
        while not event.wait(0.01) and self._thread.is_alive():
            pass

    def result(self) -> T:
        """Wait for the function; its result, or its exception raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out
