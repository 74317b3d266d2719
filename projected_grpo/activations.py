"""Activation checkpointing decided per micro-batch: recompute only as many decoder layers as
the free memory requires.

The learner's forward keeps tensors for its backward in proportion to its tokens. `measure`
counts them once, on a probe micro-batch run through the learner's own forward, with
saved-tensor hooks (exact, on any device): per token, what one decoder layer keeps, what it
keeps instead when checkpointed (its input), what the rest of the forward keeps (embedding,
LM head on every position, loss), and the largest single tensor (its gradient is the
backward's largest transient). `Checkpointing.layers_for(tokens)` then checkpoints the fewest
layers k (the first k) such that

    tokens x (rest + (L - k) x layer + k x kept + 2 x largest) <= HEADROOM x free

where free is the device's free memory now (CUDA: the driver's free plus the caching
allocator's reserved but unused; CPU: the host's available memory). Where even k = L does not
fit, `Checkpointing.tokens_for` lowers the micro-batch's token cap to what does. Before that,
it cuts the cap to the most tokens that fit with no layer checkpointed, where that leaves at
least `Checkpointing.smallest` tokens (NO_RECOMPUTE_FLOOR): a packed micro-batch has no padding,
so smaller ones cost only launches, while each checkpointed layer costs its forward again.

Guarantees:
- Checkpointing changes what is kept, never what is computed: the gradients are those of any
  other k, and of any token cap (tests/test_activations.py).
- "always" checkpoints every layer and "never" none, whatever the memory; "auto" measures.
- The probe scores every position (a real micro-batch scores only completions), so `rest` is
  an upper bound; it runs before any learner step and leaves no gradient behind.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
from loguru import logger
from torch import Tensor

Policy = Literal["auto", "always", "never"]
TOKEN_STEP = 256  # a micro-batch's token cap, when memory sets it, is a multiple of this (few distinct caps to log)
HEADROOM = 0.85  # of the free memory a micro-batch may plan for: the allocator's fragmentation and the backward's smaller transients
# The fewest tokens a micro-batch is cut to so that it recomputes no layer: matmuls over fewer
# tokens than this are taken to run too far below the card's peak to beat recomputing (a guess:
# the H100 measured 6.4k-token micro-batches 1.11x faster than 16k with 29 of 36 layers
# recomputed, journal 2026-12-06; nothing smaller). bench_step's learner row times it against the cap kept.
NO_RECOMPUTE_FLOOR = 4096
GIB = 2**30


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes per token the learner's forward keeps for backward (see the module docstring)."""

    layer: float  # one decoder layer, not checkpointed
    kept: float  # one decoder layer, checkpointed: its input
    rest: float  # everything outside the decoder layers
    largest: float  # the largest single kept tensor

    def need(self, tokens: int, layers: int, checkpointed: int) -> float:
        """Bytes a micro-batch of `tokens` needs with `checkpointed` of its `layers` checkpointed."""
        return tokens * (self.rest + (layers - checkpointed) * self.layer + checkpointed * self.kept + 2 * self.largest)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.layers


def enable_checkpointing(model: nn.Module) -> None:
    """Give every decoder layer HF's (non-reentrant) checkpoint function, every layer switched
    off: `Checkpointing.apply` switches them per micro-batch. (transformers 5.2x renamed the
    call; the old name still works there, with a warning.)"""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpoint_first(model, 0)


def checkpoint_first(model: nn.Module, k: int) -> None:
    """The first k decoder layers recompute their activations in backward, the others keep them
    (each needs the function `enable_checkpointing` gave it)."""
    for i, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = i < k


def measure(model: nn.Module, forward: Callable[[], Tensor], tokens: int) -> ActivationBytes:
    """What `forward()` (the learner's loss on a probe of `tokens` tokens, grad enabled, no layer
    checkpointed) keeps for backward, per token. A storage is counted once, at its full size,
    in the layer that first kept it; parameters and buffers (weights saved by reference) are
    not activations and are not counted."""
    frozen = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    layers = decoder_layers(model)
    where: list[int | None] = [None]  # the decoder layer running now
    kept_bytes = torch.zeros(len(layers) + 1, dtype=torch.float64)  # per layer, then the rest
    inputs = [0] * len(layers)
    seen, largest = set(), [0]

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in frozen and storage.data_ptr() not in seen and storage.nbytes():
            seen.add(storage.data_ptr())
            kept_bytes[-1 if where[0] is None else where[0]] += storage.nbytes()
            largest[0] = max(largest[0], storage.nbytes())
        return t

    def enter(i: int):
        def hook(module, args, kwargs):
            where[0] = i
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[i] = hidden.numel() * hidden.element_size()
        return hook

    def leave(module, args, output):
        where[0] = None

    handles = [h for i, layer in enumerate(layers) for h in (layer.register_forward_pre_hook(enter(i), with_kwargs=True), layer.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
        del loss  # frees the graph: the probe leaves no gradient
    finally:
        for h in handles:
            h.remove()
    per_layer = kept_bytes[:-1]
    return ActivationBytes(layer=per_layer.mean().item() / tokens, kept=sum(inputs) / len(inputs) / tokens, rest=kept_bytes[-1].item() / tokens, largest=largest[0] / tokens)


def free_bytes(device: torch.device) -> int:
    """Memory a micro-batch can take now: on CUDA the driver's free memory plus the caching
    allocator's reserved but unallocated blocks; on CPU the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil  # here, not at the top: GPU images may lack it, and CUDA never needs it

    return psutil.virtual_memory().available


@dataclass
class Checkpointing:
    """How many decoder layers each micro-batch checkpoints (`apply`), by policy."""

    policy: Policy
    n_layers: int
    cost: ActivationBytes | None = None  # measured for "auto"
    free: Callable[[], int] | None = None  # free memory now, for "auto"
    smallest: int = NO_RECOMPUTE_FLOOR  # tokens_for's floor for micro-batches that recompute nothing (a preset's cap: never cut for that)
    said: set[int] = field(default_factory=set)  # decisions already logged
    capped: set[int] = field(default_factory=set)  # token caps already logged

    def layers_for(self, tokens: int) -> int:
        """The fewest layers to checkpoint for a micro-batch of `tokens` (all of them where even that does not fit)."""
        if self.policy != "auto":
            return self.n_layers if self.policy == "always" else 0
        budget = HEADROOM * self.free()
        k = next((k for k in range(self.n_layers + 1) if self.cost.need(tokens, self.n_layers, k) <= budget), self.n_layers)
        if k not in self.said:
            self.said.add(k)
            need = self.cost.need(tokens, self.n_layers, k) / GIB
            fits = "fits" if need <= budget / GIB else "does NOT fit even so: lower --learner-tokens"
            logger.info(f"activation checkpointing: {k}/{self.n_layers} layers for a micro-batch of {tokens:,} tokens "
                        f"(keeps {need:.1f} GiB for backward of {budget / GIB:.1f} GiB usable: {fits})")
        return k

    def tokens_for(self, tokens: int) -> int:
        """The learner's micro-batch token cap for a preset's `tokens`, a multiple of TOKEN_STEP:
        the most that fit with no layer checkpointed, where that is at least `smallest` (or all
        of `tokens`); else `tokens`, or the most that fit with every layer checkpointed where
        `tokens` would not (the learner then packs smaller micro-batches: the same sums).
        One-step-off shares the card with the sampler: on an H100 (2026-12-06) 14 GiB stayed
        usable beside it, where a 16k-token micro-batch needs 31 GiB with every layer recomputed."""
        if self.policy != "auto":
            return tokens
        budget = HEADROOM * self.free()
        most = lambda k: max(TOKEN_STEP, int(budget // self.cost.need(TOKEN_STEP, self.n_layers, k)) * TOKEN_STEP)  # noqa: E731
        if (whole := most(0)) >= min(tokens, self.smallest):
            cap, how = min(tokens, whole), "no layer"
        else:
            cap, how = min(tokens, most(self.n_layers)), "every layer"
        if cap < tokens and cap not in self.capped:
            self.capped.add(cap)
            logger.info(f"learner micro-batches of at most {cap:,} tokens, not {tokens:,}, {how} recomputed: {budget / GIB:.1f} GiB usable, "
                        f"{self.cost.need(tokens, self.n_layers, 0) / GIB:.1f} GiB needed for {tokens:,} with no layer recomputed, "
                        f"{self.cost.need(tokens, self.n_layers, self.n_layers) / GIB:.1f} GiB with every layer")
        return cap

    def apply(self, model: nn.Module, tokens: int) -> int:
        """Set the first k decoder layers of `model` to checkpoint (the others not) for a micro-batch of `tokens`; returns k."""
        k = self.layers_for(tokens)
        checkpoint_first(model, k)
        return k
