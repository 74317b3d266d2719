"""`just export RUN [--step N]`: a run's delta_S merged into its model's weights and written as a
Hugging Face model folder (safetensors, config, tokenizer, README) that transformers, vLLM or an
evaluation suite loads without this harness.

Guarantees:
- Every adapted Linear's weight is W + U diag(delta_S) Vh, computed in fp32 and stored in the
  run's dtype: the folder's log-probs equal those of the adapter-wrapped model at that checkpoint
  within that dtype's rounding (tests/test_export.py, on the tiny model).
- An existing output folder is never overwritten; the folder appears whole or not at all.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from loguru import logger
from torch import nn

from projected_grpo.checkpoints import checkpoint_dir, checkpoint_step, checkpoints, load_run_model, resumable_checkpoint, run_config
from projected_grpo.errors import UserError, reported
from projected_grpo.models import pick_device
from projected_grpo.paths import atomic
from projected_grpo.svd_adapter import SVDLinear, unwrap_svd


@dataclass(frozen=True)
class ExportConfig:
    """Write a run's checkpoint as a plain Hugging Face model folder (delta_S merged)."""

    run: tyro.conf.Positional[Path]
    """Run folder (train.py's output): its config names the model, targets and dtype."""
    step: int | None = None
    """Checkpoint step; None = the latest readable one (the one a resume would take)."""
    out: Path | None = None
    """Output folder; None = RUN/export/step_NNNNNN."""
    device: str = "cpu"
    """Torch device for the merge; auto = cuda if available, else cpu (cpu needs no GPU; the weights end on the host either way)."""


def checkpoint_at(run: Path, step: int | None) -> Path:
    """The checkpoint folder of `step` (None = the latest readable one, as a resume takes it); a
    missing one names those there are."""
    have = checkpoints(run)
    if not have:
        raise UserError(f"{run} has no checkpoint", "export a run folder once train.py has written RUN/checkpoints/step_N")
    if step is None:
        if (latest := resumable_checkpoint(run)) is None:
            raise UserError(f"{run} has no readable checkpoint (the warnings above name each unreadable file)", "give --step N to export one whose delta_S reads")
        return latest
    wanted = checkpoint_dir(run, step)
    if wanted not in have:
        raise UserError(f"{run} has no checkpoint at step {step}", f"give --step one of {', '.join(str(checkpoint_step(p)) for p in have)}")
    return wanted


def unwrap(model: nn.Module, adapters: dict[str, SVDLinear]) -> None:
    """Put each adapter's base Linear back in its place, carrying the merged weight: the model is
    a plain transformers model again. The adapters are spent."""
    for adapter in adapters.values():
        adapter.merge()
        adapter.W_host = None  # the merge's copy of the original weight: not needed, only memory
    unwrap_svd(model, adapters)


def model_card(run: Path, ckpt: Path, saved: dict, out: Path, n_adapted: int, dtype: torch.dtype, norm: float) -> str:
    """The exported folder's README: the run, the step and the merge."""
    return (f"# {saved['model']} + delta_S of `{run.name}`, {ckpt.name}\n\n"
            f"Exported by projected_grpo from run `{run.name}` (arm `{saved.get('intervention')}`, seed {saved.get('seed')}, "
            f"preset `{saved.get('name')}`), checkpoint `{ckpt.name}`.\n\n"
            f"Each of the {n_adapted} adapted Linears ({', '.join(saved['targets'])}) holds W + U diag(delta_S) Vh, where "
            f"W = U diag(S) Vh is the base weight's SVD; merged in fp32, stored as {str(dtype).removeprefix('torch.')}. "
            f"||delta_S|| = {norm:.4g}. The rest of the model is the base model's.\n\n"
            f"Load with `AutoModelForCausalLM.from_pretrained(\"{out.name}\")`. The run's config is in `run_config.json`.\n")


def export(ec: ExportConfig) -> Path:
    saved = run_config(ec.run)
    ckpt = checkpoint_at(ec.run, ec.step)
    out = ec.out or ec.run / "export" / ckpt.name
    if out.exists():
        raise UserError(f"{out} exists", "remove it or give another --out")
    model, tokenizer, dtype, adapters = load_run_model(saved, pick_device(ec.device), ckpt)
    norm = torch.cat([a.delta_S.detach().flatten() for a in adapters.values()]).norm().item()
    unwrap(model, adapters)
    with atomic(out, replace=False) as tmp:
        model.to("cpu").save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(ec.run, ckpt, saved, out, len(adapters), dtype, norm))
        (tmp / "run_config.json").write_text(json.dumps(saved, indent=2))
    logger.info(f"exported {ckpt} to {out}")
    print(out)
    return out


if __name__ == "__main__":
    import sys

    argv = sys.argv[1:]
    reported(lambda: export(tyro.cli(ExportConfig, args=argv)), argv)
