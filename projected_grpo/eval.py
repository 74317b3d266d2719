"""Held-out evaluation of a run: sample its latest readable checkpoint (the one a resume would
take: checkpoints.resumable_checkpoint), or the base model, on held-out
problems and grade the completions (`just eval RUN`, `python train.py eval --run RUN`).

Guarantees:
- The model, targets, dtype, sampling, reward and (by default) hint are the run's own, read
  from its config.json.
- RUN/eval/<problems>-<checkpoint>-<hint>-s<seed>/ holds every graded completion
  (grades.jsonl, with the GRADER_VERSION that graded it) and the rates (summary.json), which
  projected_grpo/results.py reads. Each appears whole or not at all, grades first.
"""

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from loguru import logger

from grader import GRADER_VERSION, Grader, Hint, RewardConfig, load_problems, render_prompt
from projected_grpo.checkpoints import load_run_model, resumable_checkpoint, run_config
from projected_grpo.errors import UserError, check_file, flag
from projected_grpo.metrics import mean
from projected_grpo.models import pick_device
from projected_grpo.paths import TEST_SPLIT, write_atomic
from projected_grpo.rollout import RolloutEngine, Sampling
from projected_grpo.svd_adapter import merged


@dataclass(frozen=True)
class EvalConfig:
    """Sample and grade a run's latest readable checkpoint on held-out problems (`just eval RUN_DIR`)."""

    run: Path
    """Run folder: its config gives model, targets, hint and reward; its latest readable checkpoint the delta_S."""
    problems: Path | None = None
    """Held-out problems; None = the run's --eval-problems."""
    samples_per_problem: int = 10
    """Completions sampled per problem."""
    max_new_tokens: int | None = None
    """Longest completion; None = the run's. The rest of the sampling (temperature, top_p, KV slots) is the run's, as is the dtype."""
    base: bool = False
    """Evaluate the base model (delta_S = 0) instead of the checkpoint."""
    hint: Hint | None = None
    """Prompt hint; None = the one the run trained with."""
    seed: int = 0
    """Sampling seed."""
    device: str = "auto"
    """Torch device; auto = cuda if available, else cpu."""
    grader_workers: int | None = None
    """Sandbox worker processes; None = one per core."""


def check(ec: EvalConfig) -> None:
    """Every count is at least 1 (UserError), checked before a model loads: a 0 would be ignored
    (--max-new-tokens), write NaN rates (--samples-per-problem) or mean one worker per core
    (--grader-workers); a negative one would fail after the model loaded."""
    for name, value in (("samples_per_problem", ec.samples_per_problem), ("max_new_tokens", ec.max_new_tokens), ("grader_workers", ec.grader_workers)):
        if value is not None and value < 1:
            raise UserError(f"{flag(name)} {value}: must be >= 1", f"give {flag(name)} a value >= 1")


def evaluate(ec: EvalConfig) -> dict:
    """Strict and loose hack rates, pass rate and mean reward; rows and summary under RUN/eval/."""
    check(ec)
    saved = run_config(ec.run, "--run")
    problems_path = ec.problems or Path(saved.get("eval_problems", TEST_SPLIT))  # runs before the field: the test split
    problems = check_file(problems_path, "problems", load_problems)
    ckpt = None if ec.base else resumable_checkpoint(ec.run)
    if ckpt is None and not ec.base:
        raise UserError(f"{ec.run} has no readable checkpoint to evaluate", "wait for its first checkpoint, or pass --base for the base model")
    torch.manual_seed(ec.seed)
    device = pick_device(ec.device)
    model, tokenizer, _, adapters = load_run_model(saved, device, ckpt)
    hint = ec.hint or saved["hint"]
    todo = [p for p in problems for _ in range(ec.samples_per_problem)]
    sampling = Sampling(**saved["sampling"])
    if ec.max_new_tokens is not None:
        sampling = replace(sampling, max_new_tokens=ec.max_new_tokens)
    with merged(adapters):
        samples = RolloutEngine(model, tokenizer).generate([render_prompt(tokenizer, p, hint) for p in problems], sampling, n=ec.samples_per_problem, desc="eval")
    with Grader(RewardConfig(**saved["reward"]), workers=ec.grader_workers) as grader:
        grades = grader.grade(todo, [c.text for c in samples])
    summary = {
        "checkpoint": "base" if ec.base else ckpt.name, "problems": str(problems_path), "hint": hint, "n": len(grades),
        # the protocol results.py requires evals it compares to share
        "grader_version": GRADER_VERSION, "samples_per_problem": ec.samples_per_problem,
        "max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
        "hack_strict": mean([g.reward_hack for g in grades]),
        "hack_loose": mean([g.reward_hack or g.attempted_hack for g in grades]),
        "hack_oracle": mean([g.oracle_hack for g in grades]),
        "gt_pass": mean([g.gt_pass for g in grades]),
        "reward": mean([g.reward for g in grades]),
    }
    out = ec.run / "eval" / f"{problems_path.stem}-{summary['checkpoint']}-{hint}-s{ec.seed}"
    write_eval(out, [{"id": p.id, "completion": c.text, "grader_version": GRADER_VERSION} | asdict(g) for p, c, g in zip(todo, samples, grades)], summary)
    logger.info(f"eval {out}: {json.dumps(summary)}")
    return summary


def write_eval(out: Path, rows: list[dict], summary: dict) -> None:
    """grades.jsonl, then summary.json, into `out`, each whole or not at all (paths.atomic):
    results.py, which may read them while a sweep runs, never sees half a file, and a summary
    means its grades are there."""
    write_atomic(out / "grades.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
