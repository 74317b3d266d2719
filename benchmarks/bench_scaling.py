"""Scaling of one training run over N GPUs, measured on this machine with torchrun.

For each N: `torchrun --standalone --nproc-per-node N train.py PRESET --model random-qwen3-4b
--steps STEPS` into a runs folder of its own (random-qwen3-4b ends completions on a random set
of token ids, so lengths spread as a real model's do: projected_grpo/models.py). From its log.jsonl, the
first step left out (it compiles and captures the decode graphs):

- step seconds; generation and learner seconds per rank (slowest rank shown); seconds of the
  gradient all-reduce; peak GPU memory per rank;
- the scaling efficiency t_1 / (N t_N): the global batch is the same at every N (strong
  scaling), so 1.0 is perfect;
- global-batch checks against N = 1: the logged world size is N and the logged rollouts per
  step are the whole batch's at every N. Beside them cin_s and the p95 of its empirical null
  (means over the steps with a live student group): both come from the all-reduced gradients,
  but rank r samples from its own stream, so at N > 1 they come from other rollouts and can
  agree with N = 1 only in distribution. tests/test_distributed.py checks the all-reduced
  gradients they are computed from against one process on the same rollouts.

    uv run python benchmarks/bench_scaling.py --nprocs 1 2          # what `just bench-scaling` runs
    uv run python benchmarks/bench_scaling.py --preset full --steps 2 \
        --extra="--problems data/problems_rl.jsonl --teacher-mix 0.25"

Random weights never pass a test, so a group is live (and the learner has work) only through
the teacher rollouts the `fast` preset mixes in; `full` mixes none, hence --teacher-mix above.

Results of every N measured into --out are kept in scaling.json and the table covers them all,
so N = 1 and N = 2 may be measured by separate invocations on the same machine.
"""

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tyro

from projected_grpo.metrics import KEY  # noqa: E402  (the log keys)
from projected_grpo.paths import OUT, REPO_ROOT  # noqa: E402


@dataclass
class Args:
    nprocs: tuple[int, ...] = (1, 2)
    """Process (GPU) counts to run, one after another."""
    preset: str = "fast"
    """train.py preset."""
    model: str = "random-qwen3-4b"
    """Model the preset runs."""
    steps: int = 3
    """Optimizer steps per run (the first is left out of the means)."""
    extra: str = ""
    """More train.py flags, one string: --extra="--prompts-per-step 16 --teacher-mix 0"."""
    out: Path = OUT / "bench" / "scaling"
    """Folder of the runs and scaling.json."""


def run(args: Args, n: int) -> dict:
    runs_dir = args.out / f"n{n}"
    before = set(runs_dir.glob("*")) if runs_dir.exists() else set()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "train.py", args.preset, "--model", args.model,
           "--steps", str(args.steps), "--checkpoint-every", str(10 * args.steps), "--runs-dir", str(runs_dir), *shlex.split(args.extra)]
    print("$ " + " ".join(cmd), flush=True)
    env = os.environ | {"NCCL_NVLS_ENABLE": "0"}  # NVLink multicast stays off (a shared host's GPUs)
    subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True)
    (run_dir,) = set(runs_dir.glob("*")) - before
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    measured = lambda key: mean(xs) if (xs := [r[key] for r in rows if r[key] is not None]) else None  # noqa: E731  (None: no live student group)
    per_rank = lambda key: [mean([r[key][i] for r in timed]) for i in range(n)]  # noqa: E731
    return {
        "n": n, "run": str(run_dir), "steps_timed": len(timed),
        "step_s": mean([r[KEY.time.step] for r in timed]),
        "gen_s_ranks": per_rank(KEY.time.gen_ranks),
        "learn_s_ranks": per_rank(KEY.time.learn_ranks),
        "allreduce_s": mean([r[KEY.time.allreduce] for r in timed]),
        "peak_gib_ranks": [max(r[KEY.memory.peak_gib_ranks][i] or 0.0 for r in rows) for i in range(n)],
        "world_size_logged": sorted({r[KEY.dist.world_size] for r in rows}),
        "rollouts_per_step": sorted({r[KEY.rollout.rollouts] for r in rows}),
        "len_s": mean([r[KEY.rollout.len_s] for r in timed]),
        "cin_s": measured(KEY.hackward.cin_s),
        "null_s_p95": measured(KEY.hackward.null_s_p95),
    }


def main(args: Args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scaling.json"
    results = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
    for n in args.nprocs:
        results[n] = run(args, n)
        path.write_text(json.dumps(results, indent=2))
    base = results.get(1)
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"\n{args.preset} on {args.model}: seconds per step (first step left out), slowest rank's parts")
    print(f"{'N':>3} {'step s':>8} {'gen s':>7} {'learn s':>8} {'allreduce s':>12} {'peak GiB':>9} {'efficiency':>11} {'rollouts':>9} {'len':>6} {'cin_s':>7} {'null95':>7}")
    for n, r in sorted(results.items()):
        eff = base["step_s"] / (n * r["step_s"]) if base else float("nan")
        r["efficiency"] = eff
        print(f"{n:>3} {r['step_s']:>8.1f} {max(r['gen_s_ranks']):>7.1f} {max(r['learn_s_ranks']):>8.1f} {r['allreduce_s']:>12.4f} "
              f"{max(r['peak_gib_ranks']):>9.1f} {eff:>11.2f} {','.join(map(str, r['rollouts_per_step'])):>9} {r['len_s']:>6.0f} {fmt(r.get('cin_s')):>7} {fmt(r.get('null_s_p95')):>7}")
        if r["world_size_logged"] != [n]:
            print(f"    ! N={n} logged world size {r['world_size_logged']}")
        if base and r["rollouts_per_step"] != base["rollouts_per_step"]:
            print(f"    ! N={n} logged {r['rollouts_per_step']} rollouts per step, N=1 {base['rollouts_per_step']}: not the global batch")
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)) and 0)
