"""The model the method trains: an HF causal LM whose Linears are rewritten in SVD coordinates.

Every target Linear keeps its frozen weight W = U diag(S) Vh and gains one trainable
vector delta_S (length r = min(d_in, d_out), fp32 master copy, zeros at start):

    y = W x + U ((Vh x) * delta_S)

Guarantees:
- At delta_S = 0 the logits equal the unwrapped model's bit for bit (the added term is an
  exact zero), so `reference_mode` gives the KL reference model for free.
- The fp32 SVD of each weight is cached on disk under a hash of the weight's bytes; an
  entry that does not reconstruct its weight within `SVD_TOLERANCE` is recomputed.
- `merge` folds U diag(delta_S) Vh into the weights (plain Linears, no extra matmuls for
  rollouts) and `unmerge` restores the original weight tensors exactly.

"""

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from loguru import logger
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Relative Frobenius error ||W - U diag(S) Vh|| / ||W|| a cached or fresh SVD must meet.
SVD_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------
# The adapter


class SVDLinear(nn.Module):
    """A frozen Linear plus a trainable diagonal delta_S in its own singular basis."""

    def __init__(self, base: nn.Linear, U: Float[Tensor, "d_out r"], S: Float[Tensor, " r"], Vh: Float[Tensor, "r d_in"], weight_key: str):
        super().__init__()
        self.base = base
        self.weight_key = weight_key
        dtype, device = base.weight.dtype, base.weight.device
        self.register_buffer("U", U.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("S", S.to(device=device, dtype=torch.float32), persistent=False)
        self.register_buffer("Vh", Vh.to(device=device, dtype=dtype), persistent=False)
        # fp32 master copy whatever the model dtype: Adam's small steps survive bf16 rounding.
        self.delta_S = nn.Parameter(torch.zeros(S.shape[0], device=device, dtype=torch.float32))
        self.delta_enabled = True
        self.merged_from: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.delta_S.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.delta_enabled or self.merged_from is not None:
            return y
        h = F.linear(x, self.Vh) * self.delta_S.to(x.dtype)
        return y + F.linear(h, self.U)

    # Both write into the weight's own storage: a compiled, CUDA-graphed decode step keeps
    # reading the same addresses.
    @torch.no_grad()
    def merge(self) -> None:
        assert self.merged_from is None, "already merged"
        W = self.base.weight
        self.merged_from = W.detach().clone()
        W.copy_(W.float() + (self.U.float() * self.delta_S) @ self.Vh.float())

    @torch.no_grad()
    def unmerge(self) -> None:
        assert self.merged_from is not None, "not merged"
        self.base.weight.copy_(self.merged_from)
        self.merged_from = None


def weight_key(W: Tensor) -> str:
    """Hash of a weight's shape, dtype and bytes: the SVD cache key and the model fingerprint."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(W.shape)}|{W.dtype}".encode())
    h.update(W.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def svd_error(W: Float[Tensor, "d_out d_in"], U: Float[Tensor, "d_out r"], S: Float[Tensor, " r"], Vh: Float[Tensor, "r d_in"]) -> float:
    """Relative Frobenius reconstruction error of an SVD, computed in fp32."""
    W = W.float()
    return ((W - (U * S) @ Vh).norm() / W.norm().clamp_min(1e-30)).item()


def svd_fp32(W: Float[Tensor, "d_out d_in"]) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in fp32 (gesvda on CUDA: ~8x faster than the default driver and more
    accurate on these shapes); falls back to fp64 if the result misses SVD_TOLERANCE."""
    Wf = W.detach().float()
    driver = "gesvda" if Wf.is_cuda else None
    U, S, Vh = torch.linalg.svd(Wf, full_matrices=False, driver=driver)
    if svd_error(Wf, U, S, Vh) > SVD_TOLERANCE:
        U, S, Vh = (t.float() for t in torch.linalg.svd(Wf.double(), full_matrices=False))
    return U, S, Vh


def cached_svd(W: Tensor, cache_dir: Path) -> tuple[Tensor, Tensor, Tensor, str]:
    """SVD of W from `cache_dir` if a valid entry exists, else computed and saved.
    Returns U, S, Vh on W's device and the weight's key."""
    key = weight_key(W)
    path = cache_dir / f"{key}.safetensors"
    if path.exists():
        try:
            t = load_file(path, device=str(W.device))
            U, S, Vh = t["U"], t["S"], t["Vh"]
            err = svd_error(W, U, S, Vh)
            if err <= SVD_TOLERANCE:
                return U, S, Vh, key
            logger.warning(f"SVD cache entry {path} reconstructs its weight with error {err:.2e} > {SVD_TOLERANCE:.0e}; recomputing")
        except Exception as e:  # a truncated or foreign file is a cache miss, not a crash
            logger.warning(f"SVD cache entry {path} is unreadable ({type(e).__name__}: {e}); recomputing")
    U, S, Vh = svd_fp32(W)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"U": U.contiguous(), "S": S.contiguous(), "Vh": Vh.contiguous()}, tmp)
    tmp.replace(path)
    return U, S, Vh, key


def wrap_svd(model: nn.Module, targets: tuple[str, ...] | list[str], cache_dir: Path) -> dict[str, SVDLinear]:
    """Replace every nn.Linear whose last name component is in `targets` by an SVDLinear.
    Freezes every base parameter; returns the adapters by module name, in model order."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets and "lm_head" not in n]
    if not names:
        raise ValueError(f"no nn.Linear in the model matches targets {list(targets)}")
    adapters = {}
    for name in tqdm(names, desc="svd", leave=False):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        adapter = SVDLinear(base, *cached_svd(base.weight, cache_dir))
        setattr(parent, child, adapter)
        adapters[name] = adapter
    n_delta = sum(a.rank for a in adapters.values())
    logger.info(f"SVD adapter on {len(adapters)} Linears ({', '.join(targets)}): {n_delta:,} delta_S entries; cache {cache_dir}")
    return adapters


def model_fingerprint(adapters: dict[str, SVDLinear]) -> str:
    """One hash over every adapted module's name and weight key: which model, which weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, a in adapters.items():
        h.update(f"{name}={a.weight_key};".encode())
    return h.hexdigest()


@contextlib.contextmanager
def reference_mode(adapters: dict[str, SVDLinear]) -> Iterator[None]:
    """The base model: every delta branch off, which equals delta_S = 0 exactly."""
    assert all(a.merged_from is None for a in adapters.values()), "reference_mode needs unmerged weights"
    for a in adapters.values():
        a.delta_enabled = False
    try:
        yield
    finally:
        for a in adapters.values():
            a.delta_enabled = True


@contextlib.contextmanager
def merged(adapters: dict[str, SVDLinear]) -> Iterator[None]:
    """delta_S folded into the weights for the duration (rollouts on plain Linears)."""
    for a in adapters.values():
        a.merge()
    try:
        yield
    finally:
        for a in adapters.values():
            a.unmerge()


def delta_state(adapters: dict[str, SVDLinear]) -> dict[str, Tensor]:
    return {name: a.delta_S.detach() for name, a in adapters.items()}


def load_delta(adapters: dict[str, SVDLinear], path: Path) -> None:
    """delta_S of every adapter from a checkpoint's delta_S.safetensors (names must match)."""
    saved = load_file(path)
    if saved.keys() != adapters.keys():
        raise ValueError(f"{path} holds delta_S for other modules than this model's adapters ({len(saved)} vs {len(adapters)} modules)")
    for name, t in saved.items():
        adapters[name].delta_S.data.copy_(t)


def delta_grads(adapters: dict[str, SVDLinear]) -> dict[str, Tensor]:
    """The current .grad of every delta_S (zeros where none was accumulated)."""
    return {name: a.delta_S.grad if a.delta_S.grad is not None else torch.zeros_like(a.delta_S) for name, a in adapters.items()}
