"""A run's checkpoints: checkpoints/step_NNNNNN/ in its run folder.

Guarantees:
- A checkpoint is written to a temporary folder and renamed (paths.atomic): `last_checkpoint`
  sees only complete ones.
- Everything in it is the run's, none of it a rank's (random streams derive from the step:
  train.stream_seed), so a run resumes from it at any world size; at the same world size on
  CPU, a resumed run equals an uninterrupted one bit for bit.
"""

from pathlib import Path

import torch
from loguru import logger
from safetensors.torch import load_file, save_file
from torch import Tensor

from projected_grpo.paths import TMP, atomic
from projected_grpo.svd_adapter import SVDLinear, delta_state, load_delta


def save_checkpoint(run_dir: Path, step: int, adapters: dict[str, SVDLinear], optimizer, scheduler, prompt_gen: torch.Generator, order: list[int],
                    rows: list[dict], dtype: torch.dtype, bases: dict[str, dict[str, Tensor]], grads: dict[str, dict[str, Tensor]]) -> Path:
    """checkpoints/step_NNNNNN/: delta_S.safetensors; bases.safetensors (`v_hack.<module>`, and
    `arm.<module>` for the basis the arm projects onto: what a resume or a later analysis
    needs); grads.safetensors (`g_s.<module>`, `g_t.<module>`: this step's student and teacher
    gradients, to re-measure against any basis); state.pt (optimizer, scheduler, prompt order
    and generator, log rows)."""
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    with atomic(final) as tmp:
        tmp.mkdir()
        flat = lambda groups: {f"{g}.{n}": t.detach().cpu().clone() for g, d in groups.items() for n, t in d.items()}  # clone: the arm may share v_hack
        save_file({n: t.contiguous().cpu() for n, t in delta_state(adapters).items()}, tmp / "delta_S.safetensors", metadata={"step": str(step), "model_dtype": str(dtype)})
        save_file(flat(bases), tmp / "bases.safetensors")
        save_file(flat(grads), tmp / "grads.safetensors")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "prompt_gen": prompt_gen.get_state(), "order": order, "rows": rows}, tmp / "state.pt")
    return final


def load_checkpoint(ckpt: Path, adapters: dict[str, SVDLinear], optimizer, scheduler, prompt_gen: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Tensor], list[int], list[dict], int]:
    """delta_S, optimizer, scheduler and prompt generator restored from `ckpt`; returns what else it
    holds: v_hack and the arm's basis (empty for vanilla) on the CPU, the prompt order, the log
    rows and the step."""
    load_delta(adapters, ckpt / "delta_S.safetensors")
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    prompt_gen.set_state(state["prompt_gen"])
    bases = ckpt / "bases.safetensors"
    return load_group(bases, "v_hack"), load_group(bases, "arm"), state["order"], state["rows"], state["step"]


def load_group(path: Path, group: str) -> dict[str, Tensor]:
    """The `<group>.<module>` tensors of a checkpoint file, by module name."""
    return {k.split(".", 1)[1]: t for k, t in load_file(path).items() if k.startswith(group + ".")}


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*") if TMP not in p.name)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's latest complete checkpoint; None if it has none yet."""
    return (checkpoints(run_dir) or [None])[-1]


def unreadable(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (its first unreadable file, named), or None."""
    readers = {"delta_S.safetensors": load_file, "bases.safetensors": load_file, "state.pt": lambda p: torch.load(p, map_location="cpu", weights_only=False)}
    for name, read in readers.items():
        try:
            read(ckpt / name)
        except Exception as e:  # whatever safetensors, zip or pickle raise on a truncated or foreign file
            return f"{ckpt / name} is unreadable ({type(e).__name__}: {str(e)[:120]})"
    return None


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The latest checkpoint whose files all read; each unreadable later one is reported by name."""
    for ckpt in reversed(checkpoints(run_dir)):
        why = unreadable(ckpt)
        if why is None:
            return ckpt
        logger.warning(f"{why}: resuming from the checkpoint before it")
    return None
