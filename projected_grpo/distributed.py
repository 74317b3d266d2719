"""The process group of a run: one process per GPU under torchrun, or a single process.

    python train.py full ...                                   # one process: no process group
    torchrun --nproc-per-node 8 train.py full ...              # one node, 8 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank R \\
        --master-addr HOST --master-port 29500 train.py full ... # two nodes

`init` joins the group that torchrun describes in its environment variables (WORLD_SIZE,
RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT): NCCL with device
cuda:LOCAL_RANK on CUDA, gloo on CPU. Without WORLD_SIZE (plain `python`) it starts nothing
and every helper below is what a world of one process needs: rank 0 of 1, collectives that
return their input, a barrier that returns at once.

Guarantees:
- `all_reduce_sum` sums dicts of tensors over the ranks in ONE collective over one flat
  buffer (per-module gradients are small: ~0.5M entries for Qwen3-4B; one call, not one
  per module) and every rank gets the same bits. It returns once the sum is complete (on
  CUDA the host waits for the caller's stream, not the device), so a timer around it
  measures the collective.
- `gather_objects` gives every rank every rank's object, in rank order.
- `main_first` runs a block on rank 0, then on the other ranks: a cache that rank 0 builds
  on a miss (a model built offline, the SVD cache, v_hack, the teacher pool) is built once
  and read by the others, provided it lives on a filesystem every rank sees.
- `share` is rank r's contiguous part of n items, and refuses an n the world size does not
  divide (every rank must do the same amount of work per step).
- After `init`, ranks other than 0 print nothing: loguru's sinks are removed and tqdm
  bars are disabled (their errors still raise).
"""

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from functools import partialmethod

import torch
import torch.distributed as dist
from jaxtyping import Float
from loguru import logger
from torch import Tensor
from tqdm import tqdm

# On a cache miss rank 0 alone computes (the SVD of every weight, v_hack's extraction) while the
# others wait in a barrier: longer than the collectives' default timeout (10 min for NCCL).
TIMEOUT = timedelta(hours=2)


def init(device: str) -> None:
    """Join torchrun's process group, if there is one, on `device` (cpu, or cuda: this rank's GPU)."""
    if "WORLD_SIZE" not in os.environ:
        return
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(f"--device {device}: under torchrun pass --device cuda (or auto); rank r takes cuda:LOCAL_RANK")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this rank's GPU
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    if not is_main():
        logger.remove()
        tqdm.__init__ = partialmethod(tqdm.__init__, disable=True)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_world_size() -> int:
    """Processes of this run on this node (they share its CPU cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The block runs on rank 0, then (after a barrier) on every other rank."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def share(n: int, flag: str) -> slice:
    """This rank's contiguous part of n items; `flag` names the option that set n, for the error."""
    world = world_size()
    if n % world:
        fits = max(w for w in range(1, world + 1) if n % w == 0)
        raise ValueError(f"{flag} {n} is not divisible by the world size {world} (every rank takes the same number of items): "
                         f"pass {flag} {n + world - n % world} (a multiple of {world}), or run a number of processes that divides {n} (e.g. {fits})")
    k = n // world
    return slice(rank() * k, (rank() + 1) * k)


def all_reduce_sum(*parts: dict[str, Float[Tensor, "..."]]) -> tuple[dict[str, Tensor], ...]:
    """Each dict summed over the ranks (new tensors, views of one buffer; the inputs as they are
    in a world of one), all in one collective. Every tensor must have the same dtype and device."""
    if not dist.is_initialized():
        return parts
    flat = torch.cat([t.reshape(-1) for part in parts for t in part.values()])
    dist.all_reduce(flat)
    if flat.is_cuda:
        # This stream only: a device-wide synchronize would also wait for the one-step-off
        # sampler's side stream, and the timer around this call would count its decoding.
        torch.cuda.current_stream().synchronize()
    out, offset = [], 0
    for part in parts:
        summed = {}
        for name, t in part.items():
            summed[name] = flat[offset : offset + t.numel()].view_as(t)
            offset += t.numel()
        out.append(summed)
    return tuple(out)


def gather_objects(obj: object) -> list:
    """Every rank's `obj` (picklable; keep it small), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (what the others pass is ignored; tensors must be on the CPU)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
