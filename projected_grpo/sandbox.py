"""The sandbox: runs untrusted Python programs against their tests, in child processes of a
pool of long-lived workers, and says whether the tests passed.

A run (Run) is setup code, a program and test statements; its outcome (Outcome) is how it
ended (passed, or where and how it failed), why not (and by which exception), and what the
strict check below saw. This module knows nothing of the
task: the caller (grader.py) decides what to run and what an outcome means. It imports
only the standard library, since every worker imports it at start.

Guarantees:
1. No program runs in the caller's process. Every program runs in a child forked from a
   long-lived worker (started with a clean environment, its setup imports loaded once), in a
   fresh namespace, as `exec(code, {})` runs code (so `__name__` is not "__main__"), with: its
   own session, killed as a whole (and every descendant that left it) at the end; a time limit
   in CPU seconds of the child and all its descendants (3 s by default, as in the benchmark)
   and a wall-clock limit (2x + 1 s); limits on address space, processes, file size and core
   files; stdin closed; output drained and capped; a fresh working directory, removed
   afterwards; an empty network namespace; and, when run as root, a uid of its own that can
   read every file but write none of the caller's and signal none of its processes. Exiting,
   killing itself, looping, forking, flooding or patching builtins ends as a failed run and
   leaves the caller untouched.
2. A run passes only if the child reports a per-run nonce after the last test, so exiting
   early (sys.exit(0), os._exit(0), a signal) never passes.
3. Pool.run never hangs: every run has an outer timeout, and a dead or hung worker is
   replaced, the run counting as failed with a reason starting "grader: ".
4. The strict check. A test may hand a value to `__observe__(value)` (OBSERVE), which
   returns it unchanged; the run's `expected` gives, per test, the source of the value it
   should equal, evaluated in the setup's namespace before any program runs. The sandbox
   compares the two by type and content (strictly_equal: builtin data of exact types,
   attributes as object.__getattribute__ reads them), so that no __eq__, __hash__ or
   __getattr__ of the value's decides, and reports the first test whose value differs
   (Outcome.first_unequal). So a value that passes `assert value ==
   expected` by an `__eq__` that always says True, or a list subclass that lies about
   equality, passes its test (the tests keep their meaning) and is seen by the check. The
   check walks the expected value, inside the run's time limit: it costs about what the
   comparison itself does.

Not guaranteed: code running in the child shares an interpreter with the runner, so code
written against this runner (digging the nonce out of its frame, rebinding `__observe__`
while a test runs, patching builtins the check uses) could forge a pass or hide a value
from the strict check, as in-interpreter code can fool any oracle that shares its
interpreter (the benchmark's too). Without root, programs run under the caller's uid and
could write the caller's files; without user namespaces, they could open sockets. Pool
records both (network_isolated, uid_isolated).
"""

import builtins
import contextlib
import ctypes
import json
import math
import os
import queue
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from types import CodeType
from typing import Literal, NamedTuple, NoReturn

MODULE_DIR = Path(__file__).resolve().parent
OBSERVE = "__observe__"
FAULT = "grader: "  # opens the reason of a run that failed by the sandbox's fault, not the program's


class Run(NamedTuple):
    """One program run in the sandbox: setup code, then the program, then each test statement."""

    setup: str
    program: str
    tests: tuple[str, ...]
    expected: tuple[str | None, ...] = ()
    """Per test, the source of the value it hands to __observe__ should strictly equal; None or
    absent: no check for that test."""


Ending = Literal["passed", "test", "error", "exit", "time", "died", "fault"]


class Outcome(NamedTuple):
    ended: Ending
    """How the run ended: "passed" (every test passed); "test" (an exception of any kind in a
    test); "error" (an Exception in the setup or the program, before the tests); "exit" (there,
    a BaseException that is no Exception: SystemExit, KeyboardInterrupt, one of the program's
    own); "time" (past the time or the wall-clock limit); "died" (the process ended without a
    report: os._exit, a signal); "fault" (the sandbox's own failure, reason "grader: ...")."""
    reason: str | None
    """Why the run failed ("test 2/5: AssertionError: ...", "time limit: ...", "grader: ..."); None if it passed."""
    exception: str | None = None
    """The name of the type of the exception that failed the run (SystemExit included); None if
    it passed or ended otherwise (a limit, os._exit, a signal)."""
    first_unequal: int | None = None
    """Of a passed run: the first test (from 1) whose observed value is not strictly equal to its expected one."""

    @property
    def passed(self) -> bool:
        return self.ended == "passed"


def wall_clock_s(timeout_s: float) -> float:
    """The wall-clock limit of a run whose time limit is timeout_s. The time limit counts CPU
    seconds (the benchmark's 3 s, which it applies to an idle machine), so that an outcome does
    not depend on how busy the machine is; the wall clock only stops programs that wait idle."""
    return 2 * timeout_s + 1


# ----------------------------------------------------------------------------
# The strict check

# Builtin scalar types whose == is the builtin one. bool, int and float compare by value
# across each other (True == 1 == 1.0), as == does.
NUMBERS = (bool, int, float)
SCALARS = (type(None), str, bytes, complex, *NUMBERS)
# The standard library's dicts, compared as dicts (a Counter of the right counts is an honest answer).
DICTS = (dict, Counter, OrderedDict, defaultdict)
BUILTIN_KINDS = frozenset((*SCALARS, list, tuple, set, frozenset, *DICTS))


def strictly_equal(value: object, expected: object) -> bool:
    """Whether value == expected holds as Python decides it for builtin data, without calling
    any method of value's: scalars, lists, tuples, sets and dicts must be of those exact types
    (or the standard library's dict classes, or numpy scalars), and are compared by content;
    where expected is an object of a class of its own (ListNode, TreeNode), value may be any
    object whose attributes of the same names (read past any __getattr__) are strictly equal.
    Walks expected (which must be acyclic), so a cyclic value costs no more than expected's size."""
    todo = [(value, expected)]
    while todo:
        value, expected = todo.pop()
        kind, expected_kind = type(value), type(expected)
        if kind not in BUILTIN_KINDS:
            value = _unwrap_numpy(value)
            kind = type(value)
        if expected_kind in NUMBERS:
            if kind not in NUMBERS or value != expected:
                return False
        elif expected_kind in SCALARS:
            if kind is not expected_kind or value != expected:
                return False
        elif expected_kind in (list, tuple):
            if kind is not expected_kind or len(value) != len(expected):
                return False
            todo.extend(zip(value, expected))
        elif expected_kind in (set, frozenset):
            # Set equality hashes and compares elements: only once they are known to be builtin data.
            if kind not in (set, frozenset) or not all(map(_hashable_data, value)) or value != expected:
                return False
        elif expected_kind in DICTS:
            if kind not in DICTS or not all(map(_hashable_data, value)) or len(value) != len(expected):
                return False
            for key, item in expected.items():
                if key not in value:
                    return False
                todo.append((dict.__getitem__(value, key), item))
        else:
            for name, item in vars(expected).items():
                try:
                    todo.append((object.__getattribute__(value, name), item))
                except AttributeError:
                    return False
    return True


def _hashable_data(value: object) -> bool:
    """Builtin hashable data only (scalars, tuples and frozensets of them): safe to hash and compare."""
    todo = [value]
    while todo:
        value = todo.pop()
        if type(value) in (tuple, frozenset):
            todo.extend(value)
        elif type(value) not in SCALARS:
            return False
    return True


def _unwrap_numpy(value: object) -> object:
    """A numpy scalar as the Python scalar it holds (numpy's own code, not the program's); else value."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic) and type(value).__module__ == "numpy":
        return value.item()
    return value


# ----------------------------------------------------------------------------
# The pool: the caller's side

WORKER_START_S = 60.0
OUTER_GRACE_S = 5.0  # beyond a run's wall-clock limit, for the worker's work around it, before it counts as hung
# Hash randomisation off in workers, so that outcomes are reproducible.
WORKER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def _logger():
    """loguru's logger, imported on first use: workers import this module and must start fast."""
    from loguru import logger

    return logger


class Pool:
    """A pool of pre-warmed sandbox workers, one per core by default. timeout_s is each run's
    time limit in CPU seconds (see wall_clock_s), memory_mb its address-space limit. Use it as
    a context manager, or call close()."""

    def __init__(self, workers: int | None = None, timeout_s: float = 3.0, memory_mb: int = 1024):
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        n = workers or len(os.sched_getaffinity(0))  # the cores this process may use (taskset, containers)
        self._threads = ThreadPoolExecutor(n, thread_name_prefix="sandbox")
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        started = list(self._threads.map(lambda _: _Worker(timeout_s, memory_mb), range(n)))
        for worker in started:
            self._idle.put(worker)
        self.network_isolated = all(w.network_isolated for w in started)
        self.uid_isolated = all(w.uid_isolated for w in started)
        logger = _logger()
        logger.info(f"sandbox: {n} workers, network isolation {self.network_isolated}, sandbox uid {self.uid_isolated}")
        if not self.network_isolated:
            logger.warning("sandbox: no network namespace available here, programs can open sockets")
        if not self.uid_isolated:
            logger.warning(
                "sandbox: programs run under your own uid (needs root to change): they can write your files, "
                "signal your processes, and share your process-count limit"
            )

    def run(self, runs: Sequence[Run]) -> list[Outcome]:
        """Every run in its own child, in parallel; the outcomes in input order. Identical runs
        (common within a GRPO group once a policy converges) run once."""
        unique = list(dict.fromkeys(runs))
        outcomes = dict(zip(unique, self._threads.map(self._run, unique)))
        return [outcomes[run] for run in runs]

    def _run(self, run: Run) -> Outcome:
        worker = self._idle.get()
        try:
            if worker.proc.poll() is not None:  # died between runs: no fault of this one
                worker = self._replace(worker, "it had exited")
            return worker.run(run)
        except (OSError, EOFError, ValueError) as e:  # dead, hung (TimeoutError is an OSError) or garbled
            worker = self._replace(worker, repr(e))
            return Outcome("fault", f"{FAULT}worker failed ({type(e).__name__}) and was replaced")
        finally:
            self._idle.put(worker)

    def _replace(self, worker: "_Worker", why: str) -> "_Worker":
        _logger().warning(f"sandbox: replacing worker {worker.proc.pid}: {why}")
        worker.kill()
        return _Worker(self.timeout_s, self.memory_mb)

    def close(self) -> None:
        self._threads.shutdown()
        while not self._idle.empty():
            self._idle.get().kill()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Worker:
    """One sandbox worker process (running _worker_main) and the pipes to it."""

    def __init__(self, timeout_s: float, memory_mb: int):
        self.timeout_s = timeout_s
        # The caller's module path, not its environment: the worker imports what the caller
        # could (packages carried on PYTHONPATH included) without inheriting its variables.
        search_path = [str(MODULE_DIR), *sys.path]
        boot = f"import sys; sys.path[:0] = {search_path!r}; import sandbox; sandbox._worker_main({timeout_s!r}, {memory_mb!r})"
        self.proc = subprocess.Popen(
            [sys.executable, "-s", "-P", "-c", boot],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=WORKER_ENV,
            start_new_session=True,  # the caller's Ctrl-C is for the caller; workers exit when their stdin closes
        )
        hello = self._receive(time.monotonic() + WORKER_START_S)
        self.network_isolated, self.uid_isolated = hello["network_isolated"], hello["uid_isolated"]

    def run(self, run: Run) -> Outcome:
        self.proc.stdin.write(json.dumps(run._asdict()).encode() + b"\n")
        self.proc.stdin.flush()
        return Outcome(**self._receive(time.monotonic() + wall_clock_s(self.timeout_s) + OUTER_GRACE_S))

    def _receive(self, deadline: float) -> dict:
        """One JSON line from the worker; TimeoutError past the deadline, EOFError if it exited."""
        fd, data = self.proc.stdout.fileno(), b""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not data.endswith(b"\n"):
            if not poller.poll(max(0, math.ceil((deadline - time.monotonic()) * 1000))):
                raise TimeoutError("no answer in time")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("the worker exited")
            data += chunk
        return json.loads(data)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()


# ----------------------------------------------------------------------------
# The worker: what it does for each run

REPORT_FD = 3  # where the child writes its verdict; stdout and stderr are the program's
OUTPUT_TAIL = 2000  # bytes of a program's output kept, to explain a run that died without a report
REPORT_CAP = 1 << 16  # bytes of the report pipe kept (a program may write junk there too)
MAX_PROCESSES = 4  # per sandbox uid; a program needs 1, a few threads are tolerated, fork bombs are not
MAX_FILE_BYTES = 16 << 20
SANDBOX_UID_BASE = 2_000_000_000  # + the worker's pid: a uid no account and no other worker uses

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 8, 36, 38
CAP_DAC_READ_SEARCH, LINUX_CAPABILITY_VERSION_3 = 2, 0x20080522
libc = ctypes.CDLL(None, use_errno=True)
NOT_CHECKED = object()  # a test's expected value when it has none, or its source failed to evaluate


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _prctl(option: int, value: int) -> None:
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value})")


def _worker_main(timeout_s: float, memory_mb: int) -> None:
    """A worker's loop: one Run as a JSON line on stdin, one Outcome as a JSON line on stdout."""
    # A fresh network namespace holds only a downed loopback; every program forked from here inherits it.
    network_isolated = libc.unshare(CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET) == 0
    _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a run become our children, so _kill_tree finds them
    uid = SANDBOX_UID_BASE + os.getpid() if os.geteuid() == 0 else None
    if uid is not None and not _sandboxed(Run("", "", ()), timeout_s, memory_mb, uid).passed:
        uid = None  # e.g. a container that maps no spare uids
    _send({"network_isolated": network_isolated, "uid_isolated": uid is not None})
    for line in sys.stdin.buffer:
        _send(_sandboxed(Run(**json.loads(line)), timeout_s, memory_mb, uid)._asdict())


def _send(message: dict) -> None:
    sys.stdout.buffer.write(json.dumps(message).encode() + b"\n")
    sys.stdout.buffer.flush()


@lru_cache(maxsize=None)
def _setup(setup: str) -> tuple[CodeType, dict]:
    """Setup code, compiled and run once in the worker so that every child forks with its imports
    loaded; and the namespace it ran in, where no program has run, for the expected values."""
    code = compile(setup, "<setup>", "exec")
    namespace = {"__name__": "__setup__"}
    exec(code, namespace)
    return code, namespace


@lru_cache(maxsize=1024)
def _compiled_tests(tests: tuple[str, ...]) -> tuple[CodeType, ...]:
    return tuple(compile(test, f"<test {i}>", "exec", optimize=0) for i, test in enumerate(tests, 1))


@lru_cache(maxsize=1024)
def _expected_values(setup: str, expected: tuple[str | None, ...], n_tests: int) -> tuple[object, ...]:
    """Per test, its expected value, evaluated in the setup's namespace; NOT_CHECKED where it has
    none, or where its source fails or gives a value the strict check cannot judge (one not
    strictly equal to itself: NaN, a type it does not know), so that no honest value is judged
    unequal for the check's own want of knowledge."""
    _, namespace = _setup(setup)
    values = []
    for source in expected[:n_tests] + (None,) * (n_tests - len(expected)):
        try:
            value = NOT_CHECKED if source is None else eval(source, namespace)
            values.append(value if value is NOT_CHECKED or strictly_equal(value, value) else NOT_CHECKED)
        except Exception:
            values.append(NOT_CHECKED)
    return tuple(values)


def _sandboxed(run: Run, timeout_s: float, memory_mb: int, uid: int | None) -> Outcome:
    """Run one program in a forked, limited child; afterwards kill everything it started."""
    tests = _compiled_tests(tuple(run.tests))
    setup, _ = _setup(run.setup)
    expected = _expected_values(run.setup, tuple(run.expected), len(tests))
    workdir = tempfile.mkdtemp(prefix="grader-")
    if uid is not None:
        os.chown(workdir, uid, uid)
    report_r, report_w = os.pipe()
    output_r, output_w = os.pipe()
    nonce = os.urandom(16).hex()
    deadline = time.monotonic() + wall_clock_s(timeout_s)
    cpu_before = _reaped_cpu_s()
    pid = os.fork()
    if pid == 0:
        _child(run.program, setup, tests, expected, nonce, workdir, report_w, output_w, uid, timeout_s, memory_mb)
    os.close(report_w)
    os.close(output_w)
    report, output, timed_out = _collect(report_r, output_r, deadline)
    status = _kill_tree(pid)
    cpu_s = _reaped_cpu_s() - cpu_before  # the child's and every descendant's, orphans included
    os.close(report_r)
    os.close(output_r)
    shutil.rmtree(workdir, ignore_errors=True)
    return _verdict(report, output, timed_out, status, cpu_s, nonce, timeout_s)


def _child(
    program: str,
    setup: CodeType,
    tests: tuple[CodeType, ...],
    expected: tuple[object, ...],
    nonce: str,
    workdir: str,
    report_w: int,
    output_w: int,
    uid: int | None,
    timeout_s: float,
    memory_mb: int,
) -> NoReturn:
    try:
        _enter_sandbox(workdir, report_w, output_w, uid, timeout_s, memory_mb)
        _execute(program, setup, tests, expected, nonce)
    finally:
        os._exit(0)  # no cleanup handlers of the worker's (or the program's) may run here


def _enter_sandbox(workdir: str, report_w: int, output_w: int, uid: int | None, timeout_s: float, memory_mb: int) -> None:
    os.setsid()  # a process group of its own, which the worker kills as a whole
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.dup2(output_w, 1)
    os.dup2(output_w, 2)
    os.dup2(report_w, REPORT_FD)
    os.closerange(REPORT_FD + 1, os.sysconf("SC_OPEN_MAX"))  # the worker's pipes among them
    os.chdir(workdir)
    tempfile.tempdir = workdir  # a program's temporary files go with its directory
    for limit, value in [
        (resource.RLIMIT_AS, memory_mb << 20),
        # The time limit is judged on the measured CPU time; this backstop lies a second beyond it,
        # so that a program it kills has measurably overrun.
        (resource.RLIMIT_CPU, math.ceil(timeout_s) + 1),
        (resource.RLIMIT_NPROC, MAX_PROCESSES),  # counted per uid: only binding under the sandbox uid, or for non-root
        (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
        (resource.RLIMIT_CORE, 0),
    ]:
        resource.setrlimit(limit, (value, value))
    if uid is not None:
        _drop_privileges(uid)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary hands privileges back
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the worker; set after setuid, which clears it


def _drop_privileges(uid: int) -> None:
    """Become `uid`, keeping only CAP_DAC_READ_SEARCH: the program can still import from every
    directory (the interpreter may live under /root) but writes only where anyone may."""
    _prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    caps = (_CapData * 2)()
    caps[0].effective = caps[0].permitted = 1 << CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(_CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), caps) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _observer(expected: object, test_no: int, unequal: list[int]) -> Callable[[object], object]:
    """The __observe__ of one test: notes the test in `unequal` when the value is not strictly
    equal to the expected one, and returns the value unchanged, so the test means what it did."""

    def observe(value: object) -> object:
        if expected is not NOT_CHECKED:
            try:
                equal = strictly_equal(value, expected)
            except BaseException:  # the value's attributes raised: not plain data, and no business of the test's
                equal = False
            if not equal:
                unequal.append(test_no)
        return value

    return observe


def _execute(program: str, setup: CodeType, tests: tuple[CodeType, ...], expected: tuple[object, ...], nonce: str) -> None:
    """Run setup, program and tests here; report "ok" only after the last test passed.

    The report is one line after the nonce: "ok N", N the first test whose observed value was
    not strictly equal to its expected one (0: none), or "failed ENDED EXCEPTION REASON" (ENDED
    as in Outcome.ended)."""
    # Taken before the program runs, which may replace builtins or os functions.
    write, run, numbered, observer = os.write, exec, enumerate(tests, 1), _observer
    restore_builtins, saved_builtins = builtins.__dict__.update, dict(builtins.__dict__)
    namespace = {"__builtins__": builtins.__dict__}  # what exec(code, {}) gives the code: no __name__ of its own
    unequal: list[int] = []
    failed_at = 0  # 0: the program itself
    try:
        run(setup, namespace)
        run(compile(program, "<completion>", "exec"), namespace)
        for failed_at, test in numbered:
            namespace[OBSERVE] = observer(expected[failed_at - 1], failed_at, unequal)
            run(test, namespace)
        message = f"ok {unequal[0] if unequal else 0}"
    except BaseException as exc:  # SystemExit and KeyboardInterrupt included: any escape fails the run
        restore_builtins(saved_builtins)
        where = f"test {failed_at}/{len(tests)}" if failed_at else "program"
        ended = "test" if failed_at else "error" if issubclass(type(exc), Exception) else "exit"
        name = "".join(type(exc).__name__.split()) or "?"  # one word, whatever a program named its class
        message = f"failed {ended} {name} " + f"{where}: {type(exc).__name__}: {exc}"[:300].replace("\n", " ")
    write(REPORT_FD, f"{nonce} {message}\n".encode())


def _collect(report_r: int, output_r: int, deadline: float) -> tuple[bytes, bytes, bool]:
    """Read the report until every writer closed it or the deadline passed, draining the output
    meanwhile (so a flood never blocks the program). Returns report, output tail, timed out."""
    report, output = b"", b""
    poller = select.poll()
    for fd in (report_r, output_r):
        poller.register(fd, select.POLLIN)
    report_open = True
    while report_open:
        left = deadline - time.monotonic()
        if left <= 0:
            return report, output, True
        for fd, _ in poller.poll(math.ceil(left * 1000)):
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                poller.unregister(fd)
                report_open = report_open and fd != report_r
            elif fd == report_r:
                report = (report + chunk)[-REPORT_CAP:]
            else:
                output = (output + chunk)[-OUTPUT_TAIL:]
    return report, output, False


def _kill_tree(pid: int) -> int:
    """SIGKILL the run's process group and every descendant that left it, reap them all; the
    child's wait status."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    # Descendants outside the group were re-parented to this worker (a child subreaper).
    while orphans := _children():
        for orphan in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(orphan, signal.SIGKILL)
        for orphan in orphans:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(orphan, 0)
    return status


def _reaped_cpu_s() -> float:
    """CPU seconds of every process this worker has reaped (the child's own count covers only the
    descendants it waited for itself: a grandchild whose parent exited is reaped here, and must
    count against the run's time limit as well)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _children() -> list[int]:
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN: the group kill must do
        return []


def _verdict(report: bytes, output: bytes, timed_out: bool, status: int, cpu_s: float, nonce: str, timeout_s: float) -> Outcome:
    mark = f"{nonce} "
    messages = [line[len(mark) :] for line in report.decode(errors="replace").splitlines() if line.startswith(mark)]
    failures = [m.split(" ", 3)[1:] for m in messages if m.startswith("failed ")]
    if failures:
        ended, exception, reason = failures[0]
        return Outcome(ended, reason, exception)
    if cpu_s >= timeout_s:
        return Outcome("time", f"time limit: {cpu_s:.1f} s of CPU, {timeout_s:g} s allowed")
    if messages:
        first_unequal = int(messages[0].removeprefix("ok "))
        return Outcome("passed", None, None, first_unequal or None)
    if timed_out:
        return Outcome("time", f"wall-clock limit: still running after {wall_clock_s(timeout_s):g} s")
    if os.WIFSIGNALED(status):
        died = f"killed by signal {os.WTERMSIG(status)}"
    else:
        died = f"exited with code {os.WEXITSTATUS(status)}"
    last_output = output.decode(errors="replace").strip().splitlines()[-1:]
    return Outcome("died", f"{died} before the tests finished" + "".join(f" ({line[:200]})" for line in last_output))
