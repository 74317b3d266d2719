"""Grading throughput: grader.Grader against the benchmark's design, on the shared real split.

Both grade the split's canonical solutions (all should pass, so every assert runs). The
benchmark's design (rl-rewardhacking) starts a fresh `python -c` subprocess per completion
(RLIMIT_AS 1 GiB, RLIMIT_CPU 3 s, 3 s wall) that runs setup + program + every assert. It is
timed here one subprocess at a time (as the issue's target is stated) and, for reference, with
one thread per core (the benchmark's own evaluator runs MAX_JOBS threads).
Prints completions per second for each and the ratios. `just bench-grader`.
"""

import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grader import SHARED_SPLIT, Grader, Problem, load_problems  # noqa: E402

RUNNER = """
{setup}
{program}
_passed = 0
for _test in {tests!r}:
    try:
        exec(_test)
    except Exception:
        break
    _passed += 1
print(_passed)
"""


@dataclass(frozen=True)
class Args:
    problems: Path = SHARED_SPLIT
    """JSONL problems; their canonical solutions are the completions graded."""


def limit_like_the_benchmark() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (3, 3))


def benchmark_design(problem: Problem) -> bool:
    """One fresh interpreter per completion: the benchmark's grading of one program."""
    script = RUNNER.format(setup=problem.setup_code, program=problem.canonical_solution, tests=list(problem.gt_answer))
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=3, preexec_fn=limit_like_the_benchmark
        )
    except subprocess.TimeoutExpired:
        return False
    return done.stdout.strip() == str(len(problem.gt_answer))


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:6.1f} completions/s ({seconds:5.1f} s for {n})"


def main(args: Args) -> None:
    if not args.problems.exists():
        sys.exit(f"{args.problems} not found: it is the shared real split, expected beside the checkout in ../shared/data")
    problems = load_problems(args.problems)
    cores = len(os.sched_getaffinity(0))
    completions = [f"```python\n{p.canonical_solution}\n```" for p in problems]

    start = time.perf_counter()
    with Grader() as grader:
        ready = time.perf_counter()
        passed = sum(g.gt_pass for g in grader.grade(problems, completions))
        ours = time.perf_counter() - ready
    print(f"grader.Grader, {cores} workers:         {rate(len(problems), ours)}, {passed}/{len(problems)} pass, workers ready in {ready - start:.2f} s")

    start = time.perf_counter()
    passed = sum(map(benchmark_design, problems))
    sequential = time.perf_counter() - start
    print(f"benchmark design, sequential:      {rate(len(problems), sequential)}, {passed}/{len(problems)} pass")

    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        passed = sum(pool.map(benchmark_design, problems))
    threaded = time.perf_counter() - start
    print(f"benchmark design, {cores} threads:       {rate(len(problems), threaded)}, {passed}/{len(problems)} pass")

    print(f"ratio vs sequential: {sequential / ours:.2f}x; vs {cores} threads: {threaded / ours:.2f}x")
    print(json.dumps({"grader_per_s": len(problems) / ours, "sequential_per_s": len(problems) / sequential, "threaded_per_s": len(problems) / threaded}))


if __name__ == "__main__":
    main(tyro.cli(Args))
