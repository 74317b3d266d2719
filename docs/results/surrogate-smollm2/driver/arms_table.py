"""The journal's per-run table of the positive control (exploratory, beside results.md's
preregistered one): per run folder under each RUNS_DIR, whole-run means of the gradient share
the arm removed (hackward/removed), cin_s and cout, the first step with hack_s >= 0.5 (onset),
hack_s over the last 10 steps, the held-out eval at the last checkpoint, and the run's step
times summed (wall seconds on a GPU it shared with the sweep's other runs).

    python docs/results/surrogate-smollm2/driver/arms_table.py RUNS_DIR [RUNS_DIR ...]
"""
import json
import math
import sys
from pathlib import Path

ONSET = 0.5


def mean(values: list) -> float:
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def row(run: Path) -> str:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    col = lambda key: [r.get(key) for r in rows]  # noqa: E731
    onset = next((r["step"] for r in rows if r["rollout/hack_s"] >= ONSET), "-")
    last = rows[-1]["step"]
    evals = sorted((run / "eval").glob(f"*step_{last:06d}*/summary.json")) if (run / "eval").is_dir() else []
    held_out = "; ".join(f"{e['hack_strict']:.3f} / {e['gt_pass']:.3f}" for e in (json.loads(p.read_text()) for p in evals)) or "-"
    return (f"| {run.name} | {last} | {mean(col('hackward/removed')):.3f} | {mean(col('hackward/cin_s')):.3f} | {mean(col('hackward/null_s_p95')):.3f} "
            f"| {mean(col('hackward/cout')):.1e} | {onset} | {mean(col('rollout/hack_s')[-10:]):.3f} | {held_out} | {sum(col('time/step')):.0f} |")


if __name__ == "__main__":
    print("| run | steps | removed (mean) | cin_s (mean) | null_s p95 (mean) | cout (mean) | first step hack_s >= 0.5 "
          "| hack_s last 10 | held-out strict / pass | seconds |")
    print("|---" * 10 + "|")
    seen = set()  # publish.sh's runs/ links phase A's runs: each run once, where both folders are named
    for runs in sys.argv[1:]:
        for run in sorted(p for p in Path(runs).iterdir() if (p / "log.jsonl").is_file() and (p / "log.jsonl").stat().st_size):
            if run.resolve() not in seen:
                seen.add(run.resolve())
                print(row(run))
