"""One-step-off generation against on-policy GRPO: the same run twice, from the same start.

    uv run python benchmarks/bench_off_policy.py            # what `just bench-off-policy` runs
    uv run python benchmarks/bench_off_policy.py --steps 10 --preset fast

PRESET (default `fast` on random-qwen3-4b on CUDA, teacher mix on so that groups are live;
`smoke` on tiny-random-qwen3 on CPU) runs STEPS steps through train.step on the bundled
problems (bench_step.step_config), first on-policy, then with --one-step-off: the same seed,
so the same prompts, teacher picks and sampling streams. Reported per step and arm: seconds
of the step and of its phases (gen is the sampling, or with --one-step-off the wait for the
rollouts sampled ahead), the seconds the learner (this thread) and the sampler (Ahead's
thread) waited for their turn through the model (`compiled_code`, projected_grpo/ahead.py),
loss/kl, loss/clip_frac, loss/logp_gap, the strict hack rate and, with --one-step-off,
loss/is_ratio_mean and loss/is_clipped; then the speed-up, the mean step
seconds on-policy over one-step-off, over steps 2..STEPS-1 (step 1 compiles and captures, and
samples on time in both; the last step has no next one to sample ahead, so one-step-off's
learner runs alone there: 6.5 s against 11.3-12.6 beside the sampler on an H100, 2026-12-06).
Each step's line is printed as it is done; everything goes to out/bench/off_policy.json at
the end.
"""

import json
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import tyro

from bench_step import released, step_config
from grader import Grader
from projected_grpo.ahead import AHEAD_THREAD, compiled_code
from projected_grpo.errors import UserError, reported
from projected_grpo.metrics import KEY, OFF_POLICY_KEYS, mean
from projected_grpo.models import pick_device
from projected_grpo.paths import REPO_ROOT
from train import RunState, step


@dataclass
class Args:
    preset: str | None = None
    """Preset to run; default fast on CUDA, smoke on CPU."""
    model: str | None = None
    """Model; default random-qwen3-4b on CUDA, tiny-random-qwen3 on CPU."""
    steps: int = 10
    """Steps per arm, at least 3 (the speed-up reads steps 2..steps-1)."""
    compile: bool = True
    """torch.compile the engine's decode step (CUDA)."""
    out: Path = REPO_ROOT / "out" / "bench"
    """Folder of off_policy.json."""


LOGGED = (KEY.loss.kl, KEY.loss.clip_frac, KEY.loss.logp_gap, KEY.rollout.hack_s, *OFF_POLICY_KEYS)  # the keys the comparison reads
PHASES = ("gen", "grade", "learn")
TURNS = ("learner", "sampler")  # who waits for compiled_code: this thread, the sampler's (AHEAD_THREAD)


def line(arm: str, r: dict) -> str:
    cell = lambda v: f"{'-':>7}" if v is None else f"{v:7.3f}"  # noqa: E731
    return (f"{arm:<13} {r['step']:>4} {r['step_s']:>6.1f} " + " ".join(f"{r[p + '_s']:>6.1f}" for p in PHASES) + " "
            + " ".join(f"{r[t + '_wait_s']:>6.1f}" for t in TURNS) + " " + " ".join(cell(r[k]) for k in LOGGED))


def turns_waited(since: dict[str, float]) -> dict[str, float]:
    """Seconds the learner and the sampler waited for compiled_code since `since` (a `waited()`)."""
    now, names = compiled_code.waited(), (threading.current_thread().name, AHEAD_THREAD)
    return {f"{t}_wait_s": now.get(name, 0.0) - since.get(name, 0.0) for t, name in zip(TURNS, names)}


def run_arm(cfg, work: Path, arm: str) -> list[dict]:
    """cfg's steps, on-policy or one-step-off: per step its seconds and the LOGGED keys, each
    printed as it is done (a run cut short still shows its steps)."""
    (work / arm).mkdir()
    rows = []
    with Grader(cfg.reward) as grader:
        state = RunState.start(replace(cfg, one_step_off=arm == "one_step_off"), work / arm, grader)
        while state.step < cfg.steps:
            since = compiled_code.waited()
            tracked = step(state, state.next_batch()).tracked()
            rows.append({"step": state.step, "step_s": tracked[KEY.time.step]} | {f"{p}_s": state.seconds[p] for p in PHASES}
                        | turns_waited(since) | {k: tracked.get(k) for k in LOGGED})
            print(line(arm, rows[-1]), flush=True)
    del state
    released(torch.cuda.is_available())  # the next arm's learner plans from the free memory: this arm's model and compiled engine gone
    return rows


def main(args: Args) -> dict:
    if args.steps < 3:
        raise UserError(f"--steps {args.steps} leaves no steady step to compare", "give --steps 3 or more (the speed-up reads steps 2..steps-1)")
    device = pick_device("auto")
    cuda = device == "cuda"
    preset, model = args.preset or ("fast" if cuda else "smoke"), args.model or ("random-qwen3-4b" if cuda else "tiny-random-qwen3")
    work = Path(tempfile.mkdtemp(prefix="bench_off_policy-"))
    cfg = replace(step_config(preset, model, device, args.compile, work), steps=args.steps)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# bench_off_policy: {preset} on {model}, {name}, {args.steps} steps per arm")
    print(f"{'arm':<13} {'step':>4} {'sec':>6} " + " ".join(f"{p:>6}" for p in PHASES) + " " + " ".join(f"{'w_' + t[:4]:>6}" for t in TURNS) + " "
          + " ".join(f"{k.split('/')[1][:7]:>7}" for k in LOGGED))
    arms = {arm: run_arm(cfg, work, arm) for arm in ("on_policy", "one_step_off")}
    shutil.rmtree(work)
    steady = {arm: mean([r["step_s"] for r in rows[1:-1]]) for arm, rows in arms.items()}
    report = {"preset": preset, "model": model, "device": name, "steps": args.steps, "steady_step_s": steady,
              "speedup": steady["on_policy"] / steady["one_step_off"], "arms": arms}
    print(f"steady step (steps 2..{args.steps - 1}): on-policy {steady['on_policy']:.1f} s, one-step-off {steady['one_step_off']:.1f} s: {report['speedup']:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "off_policy.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'off_policy.json'}")
    return report


if __name__ == "__main__":
    reported(lambda: main(tyro.cli(Args)), sys.argv)
