"""A run's checkpoints: checkpoints/step_NNNNNN/ in its run folder (`checkpoint_dir`, the one
place that spells the name).

Guarantees:
- A checkpoint is written to a temporary folder and renamed (paths.atomic): `checkpoints`
  sees only complete ones.
- `resumable_checkpoint` is the one choice of "the latest checkpoint": the latest whose files
  all read. A resume, and eval and export without --step, take it.
- Everything in it is the run's, none of it a rank's (random streams derive from the step:
  train.stream_seed), so a run resumes from it at any world size; at the same world size on
  CPU, a resumed run equals an uninterrupted one bit for bit.
"""

import json
from pathlib import Path

import torch
from loguru import logger
from safetensors.torch import load_file, save_file
from torch import Tensor

from projected_grpo.errors import UserError, unreadable_file
from projected_grpo.models import load_model
from projected_grpo.paths import TMP, atomic
from projected_grpo.svd_adapter import SVDLinear, delta_state, load_delta, wrap_svd

PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    """The folder name of step `step`'s checkpoint, step_NNNNNN (an eval's summary.json records it)."""
    return f"{PREFIX}{step:06d}"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of step `step` of a run lies."""
    return run_dir / "checkpoints" / checkpoint_name(step)


def checkpoint_step(ckpt: Path) -> int:
    """The step of a checkpoint folder (checkpoint_dir's inverse)."""
    return int(ckpt.name.removeprefix(PREFIX))


def save_checkpoint(run_dir: Path, step: int, adapters: dict[str, SVDLinear], optimizer, scheduler, prompt_gen: torch.Generator, order: list[int],
                    rows: list[dict], bases: dict[str, dict[str, Tensor]], grads: dict[str, dict[str, Tensor]]) -> Path:
    """checkpoints/step_NNNNNN/: delta_S.safetensors; bases.safetensors (`v_hack.<module>`, and
    `arm.<module>` for the basis the arm projects onto: what a resume or a later analysis
    needs); grads.safetensors (`g_s.<module>`, `g_t.<module>`: this step's student and teacher
    gradients, to re-measure against any basis); state.pt (optimizer, scheduler, prompt order
    and generator, log rows)."""
    final = checkpoint_dir(run_dir, step)
    with atomic(final) as tmp:
        tmp.mkdir()
        flat = lambda groups: {f"{g}.{n}": t.detach().cpu().clone() for g, d in groups.items() for n, t in d.items()}  # clone: the arm may share v_hack
        save_file({n: t.contiguous().cpu() for n, t in delta_state(adapters).items()}, tmp / "delta_S.safetensors", metadata={"step": str(step)})
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
    bases = load_file(ckpt / "bases.safetensors")  # read once, for both groups
    return group_of(bases, "v_hack"), group_of(bases, "arm"), state["order"], state["rows"], state["step"]


def group_of(tensors: dict[str, Tensor], group: str) -> dict[str, Tensor]:
    """The `<group>.<module>` tensors of a checkpoint file's contents, by module name."""
    return {k.split(".", 1)[1]: t for k, t in tensors.items() if k.startswith(group + ".")}


def load_group(path: Path, group: str) -> dict[str, Tensor]:
    """The `<group>.<module>` tensors of a checkpoint file, by module name."""
    return group_of(load_file(path), group)


def run_config(run_dir: Path, given_as: str = "") -> dict:
    """The config.json a run folder was started with; a folder without one is a UserError
    (`given_as`: the flag that named it, for the message)."""
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{given_as + ' ' if given_as else ''}{run_dir} is not a run folder (it has no config.json)", "give the folder train.py made for the run")
    return json.loads((run_dir / "config.json").read_text())


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob(PREFIX + "*") if TMP not in p.name)


def unreadable(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (its first unreadable file, named), or None."""
    readers = {"delta_S.safetensors": load_file, "bases.safetensors": load_file, "state.pt": lambda p: torch.load(p, map_location="cpu", weights_only=False)}
    for name, read in readers.items():
        try:
            read(ckpt / name)
        except Exception as e:  # whatever safetensors, zip or pickle raise on a truncated or foreign file
            return unreadable_file(ckpt / name, e)
    return None


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The latest checkpoint whose files all read (None if there is none); each unreadable later
    one is reported by name."""
    for ckpt in reversed(checkpoints(run_dir)):
        why = unreadable(ckpt)
        if why is None:
            return ckpt
        logger.warning(f"{why}: taking the checkpoint before it")
    return None


def load_run_model(saved: dict, device: str, ckpt: Path | None) -> tuple[torch.nn.Module, object, torch.dtype, dict[str, SVDLinear]]:
    """A run's model as its config.json (`saved`) names it (model, dtype, targets, SVD cache),
    wrapped in its adapters, with `ckpt`'s delta_S loaded (None: delta_S = 0, the base model);
    returns the model, its tokenizer, its dtype and the adapters."""
    model, tokenizer, dtype = load_model(saved["model"], device, saved.get("dtype", "auto"))
    adapters = wrap_svd(model, tuple(saved["targets"]), Path(saved["cache_dir"]) / "svd")
    if ckpt is not None:
        load_delta(adapters, ckpt / "delta_S.safetensors")
    return model, tokenizer, dtype, adapters
