"""sandbox.py through its own API: what a worker imports, the strict check, and what an
outcome reports. Hostile programs are graded through grader.Grader in test_grader.py."""

import json
import subprocess
import sys
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path

import numpy
import pytest

from projected_grpo.sandbox import OBSERVE, Outcome, Pool, Run, strictly_equal

SETUP = """
class ListNode:
    def __init__(self, val=0, next=None):
        self.val = val
        self.next = next

def list_node(values):
    head = None
    for value in reversed(values):
        head = ListNode(value, head)
    return head
"""
# Objects that fool ==, and an honest node class of a program's own (with __slots__, no __dict__).
PROGRAM = """
class Anything:
    def __eq__(self, other):
        return True

class Liar(list):
    def __eq__(self, other):
        return True

class Node:
    __slots__ = ("val", "next")

    def __init__(self, val, next=None):
        self.val, self.next = val, next
"""


class Anything:
    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash(3)  # in 3's bucket, so that a set or dict holding it passes == too


class Liar(list):
    def __eq__(self, other: object) -> bool:
        return True


class Node:
    def __init__(self, val: object, next: "Node | None" = None):
        self.val, self.next = val, next


class Shapeshifter:
    """Claims any attribute asked for, and equality with anything."""

    def __getattr__(self, name: str) -> object:
        return Anything()

    def __eq__(self, other: object) -> bool:
        return True


def cycle() -> Node:
    node = Node(1)
    node.next = node
    return node


@pytest.mark.parametrize(
    "value, expected, equal",
    [
        (3, 3, True),
        (3.0, 3, True),  # as ==: numbers compare by value across bool, int and float
        (True, 1, True),
        (float("-inf"), float("-inf"), True),
        ("abc", "abc", True),
        (None, None, True),
        ([1, [2, (3, "x")]], [1, [2, (3, "x")]], True),
        ({"a": [1], 2: {3}}, {2: {3}, "a": [1]}, True),
        ({1, 2}, frozenset({2, 1}), True),
        (Counter(a=2), {"a": 2}, True),  # the standard library's dicts are honest answers
        (OrderedDict(a=2), {"a": 2}, True),
        (defaultdict(int, a=2), {"a": 2}, True),
        (numpy.int64(7), 7, True),
        ([numpy.float64(0.5)], [0.5], True),
        (Node(1, Node(2)), Node(1, Node(2)), True),
        (3, 4, False),
        ([1, 2], (1, 2), False),  # as ==: a list never equals a tuple
        ([1, 2], [1, 2, 3], False),
        (Anything(), 3, False),
        ([Anything()], [3], False),
        (Liar([3]), [3], False),  # by type: a list subclass decides its own equality
        ({Anything()}, {3}, False),
        ({Anything(): 1}, {3: 1}, False),
        (Node(Anything()), Node(1), False),
        (Shapeshifter(), Node(1), False),  # __getattr__ is not asked
        (None, Node(1), False),
        (cycle(), Node(1, Node(1, None)), False),  # walks the expected value: a cycle ends
    ],
)
def test_strictly_equal(value: object, expected: object, equal: bool):
    assert strictly_equal(value, expected) is equal


@pytest.fixture(scope="module")
def pool() -> Pool:
    with Pool(workers=2, timeout_s=2.0) as pool:
        yield pool


def test_a_worker_imports_only_the_sandbox():
    """Beyond what the bare interpreter loads at start-up (site's .pth hooks), a fresh worker
    holds only this module: neither grader, nor torch, nor any other package."""
    third_party = "import sys\nextra = sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names))"
    bare = subprocess.run(
        [sys.executable, "-s", "-P", "-c", f"{third_party}\nimport json\nprint(json.dumps(extra))"], capture_output=True, text=True, timeout=60
    )
    expected = sorted({*json.loads(bare.stdout), "sandbox"})
    with Pool(workers=1) as fresh:
        (outcome,) = fresh.run([Run("", third_party, (f"assert extra == {expected!r}, extra",))])
    assert outcome.passed, outcome.reason


def test_observed_values_are_checked_strictly(pool: Pool):
    tests = (
        f"assert {OBSERVE}(3) == 3",
        f"assert {OBSERVE}(Anything()) == [1, 2]",
        f"assert {OBSERVE}(Liar()) == list_node([1])",
        f"assert {OBSERVE}(Node(1, Node(2))) is not None",
        f"assert {OBSERVE}(Anything()) == 5",
    )
    expected = ("3", "[1, 2]", "[1]", "list_node([1, 2])", None)  # the last test is not checked
    honest, fooled = pool.run(
        [Run(SETUP, PROGRAM, (tests[0], tests[3], tests[4]), (expected[0], expected[3], expected[4])), Run(SETUP, PROGRAM, tests, expected)]
    )
    assert honest == Outcome("passed", None, first_unequal=None)
    assert fooled == Outcome("passed", None, first_unequal=2)


def test_an_expected_value_the_check_cannot_judge_leaves_its_test_unchecked(pool: Pool):
    """NaN equals nothing; a name the setup lacks cannot be evaluated: neither judges an honest value."""
    program = PROGRAM + "defined_by_the_program = 5\n"
    tests = (f"assert {OBSERVE}(Anything()) == float('nan')", f"assert {OBSERVE}(Anything()) == defined_by_the_program")
    (outcome,) = pool.run([Run(SETUP, program, tests, ("float('nan')", "defined_by_the_program"))])
    assert outcome == Outcome("passed", None, first_unequal=None)


def test_expected_values_are_evaluated_before_the_program_runs(pool: Pool):
    """A program that redefines the setup's helpers does not move the expected values."""
    program = PROGRAM + "list_node = lambda values: Anything()\n"
    (outcome,) = pool.run([Run(SETUP, program, (f"assert {OBSERVE}(Anything()) == list_node([1])",), ("list_node([1])",))])
    assert outcome == Outcome("passed", None, first_unequal=1)


def test_a_failed_run_names_its_exception(pool: Pool):
    runs = [
        Run("", "def run_tests(case):\n    pass\n", ("run_tests()",)),
        Run("", "", ("assert 1 == 2",)),
        Run("", "class My Error(Exception):\n    pass\n", ()),
        Run("", "import sys\nsys.exit(0)\n", ()),
        Run("", "import os\nos._exit(0)\n", ()),
    ]
    needs_argument, assertion, syntax, exit_, died = pool.run(runs)
    assert (needs_argument.exception, needs_argument.reason) == ("TypeError", "test 1/1: TypeError: run_tests() missing 1 required positional argument: 'case'")
    assert (assertion.exception, assertion.reason) == ("AssertionError", "test 1/1: AssertionError: ")
    assert syntax.exception == "SyntaxError" and syntax.reason.startswith("program: SyntaxError")
    assert exit_.exception == "SystemExit"
    assert died.exception is None and died.reason.startswith("exited with code 0")
    assert [o.ended for o in (needs_argument, assertion, syntax, exit_, died)] == ["test", "test", "error", "exit", "died"]


def test_how_a_run_ended(pool: Pool):
    """Where an exception left the run and of what kind, the time limit, and a program that is not __main__."""
    runs = [
        Run("", "class Bye(BaseException):\n    pass\n\nraise Bye\n", ()),
        Run("", "import sys\n", ("sys.exit(0)",)),
        Run("", "import os\n", ("os._exit(0)",)),
        Run("", "while True:\n    pass\n", ()),
        Run("", "assert __name__ != '__main__'\nassert isinstance(__builtins__, dict)\n", ("assert True",)),
    ]
    assert [o.ended for o in pool.run(runs)] == ["exit", "test", "died", "time", "passed"]


def test_a_forked_grandchild_counts_against_the_time_limit(pool: Pool):
    """The child forks and exits; its child, re-parented to the worker, burns more CPU than the
    limit (2 s here) and then runs the tests: a time-limit failure, not a pass."""
    program = "import os, time\nif os.fork():\n    os._exit(0)\nwhile time.process_time() < 2.3:\n    pass\n"
    (outcome,) = pool.run([Run("", program, ("assert True",))])
    assert outcome.ended == "time", outcome


def test_identical_runs_run_once_and_outcomes_keep_input_order(pool: Pool, tmp_path: Path):
    log = tmp_path / "runs.log"
    log.write_text("")
    log.chmod(0o666)  # writable by the sandbox uid too
    counted = Run("", f"open({str(log)!r}, 'a').write('ran\\n')\n", ())
    failing = Run("", "", ("assert False",))
    outcomes = pool.run([counted, failing, counted, counted])
    assert [o.passed for o in outcomes] == [True, False, True, True]
    assert log.read_text() == "ran\n"
