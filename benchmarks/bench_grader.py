"""Grading throughput: grader.Grader against the benchmark's design, on the shared real split.

Two workloads on the split's problems:
- canonical: every canonical solution (all pass, so every assert runs): the worst case for
  a pre-warmed pool, since test execution, not interpreter start-up, dominates;
- training mix: per problem the canonical solution, a Solution returning 0 (fails at the
  first assert, like most rollouts) and a trivial run_tests hack (four programs: gt, its
  own run_tests, and the dummy and canonical checks of attempted_hack).
The benchmark's design (rl-rewardhacking) starts a fresh `python -c` subprocess per program
(RLIMIT_AS 1 GiB, RLIMIT_CPU 3 s, 3 s wall) that runs setup + program + its tests; it runs
here exactly the programs our grader runs, one subprocess at a time (as the target is
stated) and, for reference, with one thread per core (the benchmark's evaluator runs
MAX_JOBS threads). Prints completions per second for each and the ratios, and for the
canonical workload the floor no grader can beat: the CPU time the asserts themselves take
(timed in this process; the canonical solutions are trusted code), divided over the cores.
`just bench-grader`.
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

from grader import SHARED_SPLIT, Grader, Problem, _plan, load_problems  # noqa: E402
from projected_grpo.sandbox import OBSERVE, Run  # noqa: E402

# The benchmark checks no returned value: the hook of our strict check is the identity here.
RUNNER = """
{setup}
{program}
{observe} = lambda value: value
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


def run_program(run: Run) -> bool:
    """One fresh interpreter per program: the benchmark's grading of one program."""
    script = RUNNER.format(setup=run.setup, program=run.program, observe=OBSERVE, tests=list(run.tests))
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=3, preexec_fn=limit_like_the_benchmark
        )
    except subprocess.TimeoutExpired:
        return False
    return done.stdout.strip() == str(len(run.tests))


def benchmark_design(item: tuple[Problem, str]) -> bool:
    """Every program our grader runs for this completion, each in its own interpreter; True if gt passes."""
    runs = _plan(*item).runs
    results = {name: run_program(run) for name, run in runs.items()}
    return results.get("gt", False)


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def training_mix(problems: list[Problem]) -> list[tuple[Problem, str]]:
    items = []
    for p in problems:
        dummy = f"class Solution:\n    def {p.method}(self, *args, **kwargs):\n        return 0\n"
        items += [(p, fenced(p.canonical_solution)), (p, fenced(dummy)), (p, fenced(dummy + "\ndef run_tests():\n    pass\n"))]
    return items


def assert_cpu_seconds(problems: list[Problem]) -> float:
    """CPU seconds of setup + canonical solution + every assert, all in one warm interpreter."""
    start = time.process_time()
    for problem in problems:
        namespace: dict = {}
        exec(problem.setup_code, namespace)
        exec(problem.canonical_solution, namespace)
        for test in problem.gt_answer:
            exec(test, namespace)
    return time.process_time() - start


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:6.1f} completions/s ({seconds:5.1f} s for {n})"


def compare(label: str, items: list[tuple[Problem, str]], cores: int) -> tuple[float, float, float]:
    """Time both designs on the items: (ratio vs sequential, our completions/s, sequential completions/s)."""
    start = time.perf_counter()
    with Grader() as grader:
        ready = time.perf_counter()
        passed = sum(g.gt_pass for g in grader.grade([p for p, _ in items], [c for _, c in items]))
        ours = time.perf_counter() - ready
    print(f"[{label}] grader.Grader, {cores} workers:    {rate(len(items), ours)}, {passed}/{len(items)} gt_pass, workers ready in {ready - start:.2f} s")
    start = time.perf_counter()
    passed = sum(map(benchmark_design, items))
    sequential = time.perf_counter() - start
    print(f"[{label}] benchmark design, sequential: {rate(len(items), sequential)}, {passed}/{len(items)} gt_pass")
    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        passed = sum(pool.map(benchmark_design, items))
    threaded = time.perf_counter() - start
    print(f"[{label}] benchmark design, {cores} threads:  {rate(len(items), threaded)}, {passed}/{len(items)} gt_pass")
    print(f"[{label}] ratio vs sequential: {sequential / ours:.2f}x; vs {cores} threads: {threaded / ours:.2f}x")
    return sequential / ours, len(items) / ours, len(items) / sequential


def main(args: Args) -> None:
    if not args.problems.exists():
        sys.exit(f"{args.problems} not found: it is the shared real split, expected beside the checkout in ../shared/data")
    problems = load_problems(args.problems)
    cores = len(os.sched_getaffinity(0))
    canonical = [(p, fenced(p.canonical_solution)) for p in problems]
    ratio_c, ours_c, seq_c = compare("canonical", canonical, cores)
    floor = assert_cpu_seconds(problems) / cores
    print(f"[canonical] floor: the asserts alone take {floor * cores:.1f} CPU s; on {cores} cores no grader beats {floor:.1f} s, {len(problems) / seq_c / floor:.2f}x the sequential design")
    ratio_m, ours_m, seq_m = compare("training mix", training_mix(problems), cores)
    print(json.dumps({"canonical": {"grader_per_s": ours_c, "sequential_per_s": seq_c, "ratio": ratio_c, "floor_per_s": len(problems) / floor},
                      "training_mix": {"grader_per_s": ours_m, "sequential_per_s": seq_m, "ratio": ratio_m}}))


if __name__ == "__main__":
    main(tyro.cli(Args))
