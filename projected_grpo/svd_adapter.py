"""The model the method trains: an HF causal LM whose Linears are rewritten in SVD coordinates.

Every target Linear keeps its frozen weight W = U diag(S) Vh and gains one trainable
vector delta_S (length r = min(d_in, d_out), fp32 master copy, zeros at start):

    y = W x + U ((Vh x) * delta_S)

Guarantees:
- At delta_S = 0 the logits equal the unwrapped model's bit for bit (the added term is an
  exact zero), so `reference_mode` gives the KL reference model for free.
- The SVD of each weight (computed in fp32) is cached on disk under a key of the weight's
  shape, dtype and content checksums, with U and Vh in the adapter's dtype (the model's) and
  S in fp32; an entry that does not reconstruct its weight within `svd_tolerance(dtype)` is
  recomputed, so a stale or foreign entry is never used. The weights missing from the cache
  are solved together, one batched SVD per stack of same-shape weights (`svd_batches`; a stack
  the solver refuses is split), and each result is checked alone (fp64 for any that misses
  fp32's tolerance): an entry is the same whether it was computed in a batch or alone.
- `merge` folds U diag(delta_S) Vh into the weights in place (plain Linears, no extra matmuls
  for rollouts) and `unmerge` restores the original weights bit for bit from a host copy
  (pinned CPU memory, made at the first merge: the base weights never change), so no second
  copy of the weights is kept on the GPU.
- While merged, a forward under no_grad (rollouts) is the plain `base(x)`. With grad enabled
  (the learner) it runs on the merged weight W' and still gives delta_S the gradient of the
  formula above, recovered in backward as diag(Uᵀ dL/dW V) = sum over tokens of
  (dy U) * (x Vhᵀ) (`MergedLinear`). Per token: forward 1 matmul instead of 3, backward 3
  instead of 3 (dx, dy U, x Vhᵀ vs dx, dy U, dh Vh), a recompute under activation
  checkpointing 1 instead of 3. The output is that of W' as stored (in bf16 with the fold's
  rounding: the weights the rollouts sampled from); delta_S's gradient is the formula's at
  that point, passing the rounding straight through. Backward must run before `unmerge`:
  autograd's version check on the saved weight raises otherwise, rather than differentiating
  through the wrong W.

"""

import contextlib
import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from loguru import logger
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from projected_grpo.errors import UserError, unreadable_file
from projected_grpo.paths import atomic

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAVE_BACKLOG = 8  # SVD cache entries that may wait in host memory for the writer thread
# Weight elements stacked into one batched SVD (2**27: 12 of Qwen3-4B's q_proj or o_proj, 5 of its
# MLP weights, 51 of its k_proj or v_proj). cuSOLVER's batched gesvda fails its workspace query
# past a stack size that depends on the shape (on an H100: 25 stacked 4096 x 2560 fail, 16 and
# 10 x 9728 x 2560 pass), so a stack that fails is split (`svd_fp32`); this bound keeps Qwen3-4B's
# stacks below the failures seen. The fp32 stack (512 MiB), its U, S, Vh and the workspace stay a
# few GiB beside the model.
SVD_BATCH_ELEMENTS = 2**27


def svd_tolerance(dtype: torch.dtype) -> float:
    """Relative Frobenius error ||W - U diag(S) Vh|| / ||W|| an SVD with U, Vh stored in `dtype`
    must meet: 1e-4 in fp32, twice the dtype's epsilon below it (bf16 rounding alone is ~0.3%)."""
    return max(1e-4, 2 * torch.finfo(dtype).eps)


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
        self.merged = False
        self.W_host: Tensor | None = None  # the base weight on the host, for an exact unmerge

    @property
    def rank(self) -> int:
        return self.delta_S.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.merged and torch.is_grad_enabled() and self.delta_S.requires_grad:
            return MergedLinear.apply(x, self.base.weight, self.base.bias, self.U, self.Vh, self.delta_S)
        y = self.base(x)
        if not self.delta_enabled or self.merged:
            return y
        h = F.linear(x, self.Vh) * self.delta_S.to(x.dtype)
        return y + F.linear(h, self.U)

    # Both write into the weight's own storage: a compiled, CUDA-graphed decode step keeps
    # reading the same addresses.
    @torch.no_grad()
    def merge(self) -> None:
        assert not self.merged, "already merged"
        W = self.base.weight
        if self.W_host is None:
            self.W_host = W.detach().to("cpu", copy=True)
            if W.is_cuda:
                self.W_host = self.W_host.pin_memory()
        # The update D in the weight's dtype, on tensor cores: in fp32 (no tensor cores) its
        # GEMMs took 0.37 s of a 4.06 s learner pass on an H100 (2026-12-07). D errs by a bf16
        # matmul's rounding (at most 2^-7 of |U| |delta_S| |Vh|), below the merged weight's own
        # wherever D is small against W; W + D is summed in fp32 and rounded once; at delta_S = 0
        # D is exactly 0 and W unchanged.
        W.add_((self.U * self.delta_S.to(W.dtype)) @ self.Vh)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        assert self.merged, "not merged"
        self.base.weight.copy_(self.W_host)
        self.merged = False


class MergedLinear(torch.autograd.Function):
    """y = W' x + b on the merged weight W' = W + U diag(delta_S) Vh, with delta_S's gradient
    taken from the unmerged formula: dL/d delta_S = diag(Uᵀ (dL/dW') V), summed per token as
    (dy U) * (x Vhᵀ). delta_S is an input only so that autograd routes its gradient here; W',
    b, U and Vh are frozen and get none."""

    @staticmethod
    def forward(ctx, x: Float[Tensor, "*batch d_in"], weight: Float[Tensor, "d_out d_in"], bias: Float[Tensor, " d_out"] | None,
                U: Float[Tensor, "d_out r"], Vh: Float[Tensor, "r d_in"], delta_S: Float[Tensor, " r"]) -> Float[Tensor, "*batch d_out"]:
        # x is saved instead of x Vhᵀ: one matmul fewer here (and in every checkpointed
        # recompute), one more in backward.
        ctx.save_for_backward(x, weight, U, Vh)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: Float[Tensor, "*batch d_out"]) -> tuple[Tensor | None, None, None, None, None, Tensor | None]:
        x, weight, U, Vh = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        d_delta = None
        if ctx.needs_input_grad[5]:
            # The product in the activations' dtype, the sum over tokens in fp32: a bf16
            # accumulator would lose the small per-token terms of a long batch.
            g_h = (dy @ U) * F.linear(x, Vh)
            d_delta = g_h.reshape(-1, g_h.shape[-1]).sum(0, dtype=torch.float32)
        return dx, None, None, None, None, d_delta


def weight_key(W: Tensor) -> str:
    """Hash of a weight's shape, dtype and three position-weighted checksums of its bytes,
    computed where the weight lives (hashing 8 GB of bytes on the CPU took longer than loading
    the SVD cache): the SVD cache key and the model fingerprint. Integer sums wrap exactly, so
    the key is the same on every device. Not cryptographic; the cache's reconstruction check
    catches any entry a collision would bring."""
    x = W.detach().contiguous().view(torch.uint8).flatten().to(torch.int64)
    i = torch.arange(x.numel(), device=x.device)
    sums = [x.sum(), (x * (i % 65521 + 1)).sum(), (x * ((i * 2654435761) % 4294967291 + 1)).sum()]
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(W.shape)}|{W.dtype}|{[int(v) for v in sums]}".encode())
    return h.hexdigest()


def svd_error(W: Float[Tensor, "d_out d_in"], U: Float[Tensor, "d_out r"], S: Float[Tensor, " r"], Vh: Float[Tensor, "r d_in"]) -> float:
    """Relative Frobenius reconstruction error of an SVD, computed in fp64: an fp32 matmul would run
    on TF32 where the process allows it (dtype tfloat32) and report its own rounding, ~3e-4."""
    W = W.double()
    return ((W - (U.double() * S.double()) @ Vh.double()).norm() / W.norm().clamp_min(1e-30)).item()


def svd_fp32(W: Float[Tensor, "n d_out d_in"]) -> tuple[Float[Tensor, "n d_out r"], Float[Tensor, "n r"], Float[Tensor, "n r d_in"]]:
    """Thin SVDs in fp32 of a stack of same-shape weights, in one batched call (gesvda on CUDA,
    cuSOLVER's strided-batched kernel: ~8x faster than the default driver and more accurate on
    these shapes); a stack the solver refuses is solved in two halves, and a matrix whose result
    misses fp32's tolerance is recomputed alone in fp64."""
    Wf = W.detach().float()
    driver = "gesvda" if Wf.is_cuda else None
    try:
        U, S, Vh = torch.linalg.svd(Wf, full_matrices=False, driver=driver)
    except torch.linalg.LinAlgError:
        if len(Wf) == 1:
            raise
        halves = svd_fp32(Wf[: len(Wf) // 2]), svd_fp32(Wf[len(Wf) // 2 :])
        return tuple(torch.cat(parts) for parts in zip(*halves))
    for i in range(len(Wf)):
        if svd_error(Wf[i], U[i], S[i], Vh[i]) > svd_tolerance(torch.float32):
            U[i], S[i], Vh[i] = torch.linalg.svd(Wf[i].double(), full_matrices=False)
    return U, S, Vh


def load_svd(W: Float[Tensor, "d_out d_in"], path: Path) -> tuple[Tensor, Tensor, Tensor] | None:
    """The cache entry at `path` on W's device if it exists and reconstructs W within
    `svd_tolerance(W.dtype)` with U and Vh in W's dtype; else None (with a warning if it exists)."""
    if not path.exists():
        return None
    tolerance = svd_tolerance(W.dtype)
    try:
        t = load_file(path, device=str(W.device))
        U, S, Vh = t["U"], t["S"], t["Vh"]
        err = svd_error(W, U, S, Vh)
        if err <= tolerance and U.dtype == Vh.dtype == W.dtype:
            return U, S, Vh
        logger.warning(f"SVD cache entry {path} reconstructs its weight with error {err:.2e} (tolerance {tolerance:.0e}, U in {U.dtype}); recomputing")
    except Exception as e:  # a truncated or foreign file is a cache miss, not a crash
        logger.warning(f"SVD cache entry {unreadable_file(path, e)}; recomputing")
    return None


def computed_svds(misses: list[tuple[Tensor, Path]], save: Callable[[dict[str, Tensor], Path], object],
                  batch_elements: int = SVD_BATCH_ELEMENTS) -> list[tuple[Tensor, Tensor, Tensor]]:
    """SVDs of the weights in `misses` (weight, cache path), in that order, computed per batch of
    `svd_batches`, each entry handed to `save` with its path. U and Vh in the weight's dtype, S in
    fp32, on the weight's device."""
    svds: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(misses)
    for batch in tqdm(svd_batches([W for W, _ in misses], batch_elements), desc="svd", leave=False):
        for i, (U, S, Vh) in zip(batch, split_svds(torch.stack([misses[i][0].detach() for i in batch]))):
            save({"U": U.cpu(), "S": S.cpu(), "Vh": Vh.cpu()}, misses[i][1])
            svds[i] = U, S, Vh
    return svds


def svd_batches(weights: list[Tensor], batch_elements: int = SVD_BATCH_ELEMENTS) -> list[list[int]]:
    """Indices of `weights` in batches for one `svd_fp32` call each: same shape, dtype and
    device, at most `batch_elements` elements (or a single weight) per batch."""
    groups: dict[tuple, list[int]] = {}
    for i, W in enumerate(weights):
        groups.setdefault((W.shape, W.dtype, W.device), []).append(i)
    batches = []
    for (shape, _, _), group in groups.items():
        size = max(1, batch_elements // shape.numel())
        batches += [group[start : start + size] for start in range(0, len(group), size)]
    return batches


def split_svds(Ws: Float[Tensor, "n d_out d_in"]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The SVD of each weight in a stack, U and Vh in the weights' dtype. Each tensor gets its own
    row-major storage, like an entry loaded from the cache: an adapter's buffers are the same
    whether its SVD was computed or loaded, and none keeps a whole batch's outputs alive."""
    U, S, Vh = svd_fp32(Ws)
    own = torch.contiguous_format
    return [(U[i].to(Ws.dtype, copy=True, memory_format=own), S[i].clone(memory_format=own), Vh[i].to(Ws.dtype, copy=True, memory_format=own))
            for i in range(len(Ws))]


def svd_entry(W: Tensor, cache_dir: Path) -> tuple[str, Path]:
    """The weight's key and the cache file its SVD lives in."""
    key = weight_key(W)
    return key, cache_dir / f"{key}.safetensors"


def cached_svds(weights: list[Tensor], cache_dir: Path, batch_elements: int = SVD_BATCH_ELEMENTS) -> tuple[list[tuple[Tensor, Tensor, Tensor]], list[str], int]:
    """The SVD and key of each weight, in order, through the cache in `cache_dir`: hits loaded
    one by one, then the misses computed in batches of same-shape weights of at most
    `batch_elements` elements (`computed_svds`) and saved by a writer thread. U and Vh in each
    weight's dtype, S in fp32, on its device. Also returns how many were computed."""
    entries = [svd_entry(W, cache_dir) for W in weights]
    svds = [load_svd(W, path) for W, (_, path) in tqdm(list(zip(weights, entries)), desc="svd cache", leave=False)]
    missing = [i for i, svd in enumerate(svds) if svd is None]
    with background_saves() as save:
        for i, svd in zip(missing, computed_svds([(weights[i], entries[i][1]) for i in missing], save, batch_elements)):
            svds[i] = svd
    return svds, [key for key, _ in entries], len(missing)


def save_svd(tensors: dict[str, Tensor], path: Path) -> None:
    """One SVD cache entry, written atomically (the writer thread's tasks run concurrently with the next SVD)."""
    with atomic(path) as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp)


@contextlib.contextmanager
def background_saves() -> Iterator[Callable[[dict[str, Tensor], Path], None]]:
    """A `save` that hands each entry to a writer thread running `save_svd`: cache files (~10 GB
    for Qwen3-4B) are written while the next SVDs compute. At most SAVE_BACKLOG entries wait in
    host memory; a failed write re-raises in the caller; every write is done on exit."""
    saving = deque()
    with ThreadPoolExecutor(max_workers=1) as writer:

        def save(tensors: dict[str, Tensor], path: Path) -> None:
            saving.append(writer.submit(save_svd, tensors, path))
            while len(saving) > SAVE_BACKLOG or (saving and saving[0].done()):
                saving.popleft().result()

        yield save
        for saved in saving:
            saved.result()


def wrap_svd(model: nn.Module, targets: tuple[str, ...] | list[str], cache_dir: Path, batch_elements: int = SVD_BATCH_ELEMENTS) -> dict[str, SVDLinear]:
    """Replace every nn.Linear whose last name component is in `targets` by an SVDLinear.
    Freezes every base parameter; returns the adapters by module name, in model order.
    The SVDs come from `cached_svds` (`batch_elements` 0: one SVD per weight, the benchmark's
    yardstick), then the adapters are built."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets and "lm_head" not in n]
    if not names:
        raise ValueError(f"no nn.Linear in the model matches targets {list(targets)}")
    bases = [model.get_submodule(name) for name in names]
    svds, keys, computed = cached_svds([base.weight for base in bases], cache_dir, batch_elements)
    adapters = {}
    for name, base, svd, key in zip(names, bases, svds, keys):
        adapters[name] = SVDLinear(base, *svd, key)
        model.set_submodule(name, adapters[name])
    n_delta = sum(a.rank for a in adapters.values())
    logger.info(f"SVD adapter on {len(adapters)} Linears ({', '.join(targets)}): {n_delta:,} delta_S entries, {computed} SVDs computed; cache {cache_dir}")
    return adapters


def unwrap_svd(model: nn.Module, adapters: dict[str, SVDLinear]) -> None:
    """wrap_svd undone: each adapter's base Linear back in its place (with the weight it holds now)."""
    for name, adapter in adapters.items():
        model.set_submodule(name, adapter.base)


def model_fingerprint(adapters: dict[str, SVDLinear]) -> str:
    """One hash over every adapted module's name and weight key: which model, which weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, a in adapters.items():
        h.update(f"{name}={a.weight_key};".encode())
    return h.hexdigest()


@contextlib.contextmanager
def reference_mode(adapters: dict[str, SVDLinear]) -> Iterator[None]:
    """The base model: every delta branch off, which equals delta_S = 0 exactly."""
    assert not any(a.merged for a in adapters.values()), "reference_mode needs unmerged weights"
    for a in adapters.values():
        a.delta_enabled = False
    try:
        yield
    finally:
        for a in adapters.values():
            a.delta_enabled = True


@contextlib.contextmanager
def merged(adapters: dict[str, SVDLinear]) -> Iterator[None]:
    """delta_S folded into the weights for the duration: rollouts on plain Linears, and a learner
    whose forward is one matmul per Linear (`MergedLinear`; its backward must run inside). A
    merge that fails partway unmerges the adapters merged before it."""
    done = []
    try:
        for a in adapters.values():
            a.merge()
            done.append(a)
        yield
    finally:
        for a in done:
            a.unmerge()


def delta_state(adapters: dict[str, SVDLinear]) -> dict[str, Tensor]:
    return {name: a.delta_S.detach() for name, a in adapters.items()}


def load_delta(adapters: dict[str, SVDLinear], path: Path) -> None:
    """delta_S of every adapter from a checkpoint's delta_S.safetensors (names and shapes must
    match); a file that cannot be read, or holds other modules or shapes, is a UserError naming it."""
    try:
        saved = load_file(path)
    except Exception as e:  # whatever safetensors raises on a truncated or foreign file
        raise UserError(unreadable_file(path, e), "it is truncated or not a delta_S file: use another checkpoint") from e
    elsewhere = "evaluate or export it with the run folder it came from"
    if saved.keys() != adapters.keys():
        raise UserError(f"{path} holds delta_S for other modules than this model's adapters ({len(saved)} vs {len(adapters)} modules)", elsewhere)
    # Same names, other shapes: another model of the same architecture family (copy_ would raise a bare RuntimeError).
    reshaped = [name for name, t in saved.items() if t.shape != adapters[name].delta_S.shape]
    if reshaped:
        name = reshaped[0]
        raise UserError(f"{path} holds delta_S of other shapes than this model's adapters ({len(reshaped)} modules, e.g. {name}: "
                        f"{tuple(saved[name].shape)} vs {tuple(adapters[name].delta_S.shape)})", elsewhere)
    for name, t in saved.items():
        adapters[name].delta_S.data.copy_(t)


def delta_grads(adapters: dict[str, SVDLinear]) -> dict[str, Tensor]:
    """The current .grad of every delta_S (zeros where none was accumulated)."""
    return {name: a.delta_S.grad if a.delta_S.grad is not None else torch.zeros_like(a.delta_S) for name, a in adapters.items()}
