"""`--report-to`: every log.jsonl row (with --one-step-off also the importance weights beside it,
metrics.OFF_POLICY_KEYS) goes to TensorBoard (RUN/tensorboard, through torch's writer) or Weights &
Biases (the `wandb` extra), with the run's config. log.jsonl stays the record that results.py reads;
a tracker is a view of it.

Guarantees:
- Every numeric key of a row is logged under its log.jsonl name at the row's step; a per-rank list
  goes as `key/0`, `key/1`, ...; None (a metric undefined at that step) is skipped.
- A resumed run continues its own TensorBoard log: events at or after the first redone step are
  purged, so the curve holds each step once (wandb resumes the same run id).
"""

import importlib.util
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

ReportTo = Literal["none", "tensorboard", "wandb"]
WANDB_PROJECT = "projected_grpo"


def scalars(row: dict) -> dict[str, float]:
    """A log row's numbers by tracker key (see Guarantees)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and key != "step":
                out[f"{key}/{i}" if isinstance(value, list) else key] = float(v)
    return out


def missing_package(report_to: ReportTo) -> tuple[str, str] | None:
    """(what is missing, how to install it) for a tracker whose package is not installed; None if it is."""
    module, fix = {"tensorboard": ("tensorboard", "uv sync"), "wandb": ("wandb", "uv sync --extra wandb, or --report-to none")}.get(report_to, (None, None))
    return None if module is None or importlib.util.find_spec(module) else (f"--report-to {report_to} needs the {module} package", fix)


@contextmanager
def tracker(report_to: ReportTo, run_dir: Path, config: dict, first_step: int) -> Iterator[Callable[[dict], None]]:
    """A function that logs one row; the tracker is flushed and closed on exit."""
    if report_to == "none":
        yield lambda row: None
    elif report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir / "tensorboard", purge_step=first_step)
        if first_step == 1:
            writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```")
        def log(row: dict) -> None:
            for key, value in scalars(row).items():
                writer.add_scalar(key, value, row["step"])

        try:
            yield log
        finally:
            writer.close()
    else:
        import wandb

        id_file = run_dir / "wandb_id"  # one wandb run per run folder, across resumes
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        run = wandb.init(project=WANDB_PROJECT, name=run_dir.name, id=run_id, resume="allow", dir=run_dir, config=config)
        try:
            yield lambda row: run.log(scalars(row), step=row["step"])
        finally:
            run.finish()
