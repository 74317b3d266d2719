"""Packed rows for the learner: the sequences of a micro-batch laid end to end in one row, so no
token is padding, each attending only to itself.

    row        = s_1 s_2 ... s_n                       (prompt + completion of each rollout)
    positions  = 0 .. |s_1|-1, 0 .. |s_2|-1, ...        (rotary positions restart per sequence)
    attention  = causal within each sequence, nothing across it

The attention is an HF attention function registered over a base implementation (sdpa, or
flash_attention_2 where flash-attn is installed; `models.load_model` asks for it), under a name
of its own per base (`attention_name`): given `spans` it runs the packed row, through torch's varlen flash kernel on CUDA in fp16/bf16,
else one SDPA call per sequence; without `spans` it is the base implementation, masks and all,
so every padded forward (extraction, eval) is unchanged. A dense block-diagonal mask is
never built: over a 16k-token row it would cost more attention FLOPs than the Linears.

Guarantees:
- A packed row's log-probs equal each sequence's run alone, to float rounding (positions
  restart, attention never crosses a boundary): tests/test_packing.py.
- Registering is idempotent, and models loaded over different bases in one process (a
  tfloat32 policy on sdpa beside a bf16 teacher on flash_attention_2) each keep their own
  base's masks and attention.
- `plan` puts every index in exactly one micro-batch, longest first, each at most `budget`
  tokens unless one sequence alone is longer.
"""

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

ATTENTION = "packed"  # the name over sdpa; over another base, see attention_name


def plan(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` in micro-batches of at most `budget` tokens, filled in order of
    decreasing length (similar lengths together; a sequence over budget goes alone)."""
    batches: list[list[int]] = []
    room = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if not batches or lengths[i] > room:
            batches.append([])
            room = budget
        batches[-1].append(i)
        room -= lengths[i]
    return batches


@dataclass(frozen=True)
class Spans:
    """Where each sequence of a packed row lies: cumulative starts on the device (the varlen
    kernel's) and on the host (the per-sequence path's), and the longest length."""

    cu: Int[Tensor, " n1"]
    bounds: tuple[int, ...]
    max_len: int


def pack(sequences: list[list[int]], device: str | torch.device) -> tuple[Int[Tensor, "1 t"], Int[Tensor, "1 t"], Spans]:
    """Token ids and rotary positions of the packed row, and its spans."""
    bounds = [0]
    for s in sequences:
        bounds.append(bounds[-1] + len(s))
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    positions = torch.cat([torch.arange(len(s)) for s in sequences])
    spans = Spans(torch.tensor(bounds, dtype=torch.int32, device=device), tuple(bounds), max(map(len, sequences)))
    return ids[None].to(device), positions[None].to(device), spans


def _varlen_kernel():
    """torch's varlen attention, the keywords that make it causal, and whether it takes grouped
    KV heads and a scale; None where this torch has none. Its signature moved between releases:
    2.10 takes is_causal and no scale, later ones window_size, scale and then enable_gqa."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params, "scale" in params


VARLEN = _varlen_kernel()


def attend(query: Float[Tensor, "1 h t d"], key: Float[Tensor, "1 hk t d"], value: Float[Tensor, "1 hk t d"], spans: Spans,
           scale: float | None) -> Float[Tensor, "1 t h d"]:
    """Causal attention within each span of a packed row."""
    default_scale = scale is None or scale == query.shape[-1] ** -0.5
    if VARLEN is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and (VARLEN[3] or default_scale):
        kernel, causal, gqa, scaled = VARLEN
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (t, heads, d)
        if not gqa and k.shape[1] != q.shape[1]:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        extra = ({"enable_gqa": True} if gqa else {}) | ({"scale": scale} if scaled else {})
        return kernel(q, k, v, spans.cu, spans.cu, spans.max_len, spans.max_len, **causal, **extra)[None]
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scale, enable_gqa=True)
             for s, e in zip(spans.bounds, spans.bounds[1:])]
    return torch.cat(parts, dim=2).transpose(1, 2)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, spans: Spans | None = None,
                     base: str = "sdpa", **kwargs):
    """HF attention function: a packed row when given `spans` (its mask, all ones, unused),
    else the implementation `base` (bound per registered name by `register`)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if spans is None:
        return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    assert dropout == 0.0, "the learner runs without dropout"
    return attend(query, key, value, spans, scaling).contiguous(), None


def attention_name(base: str) -> str:
    """The attn_implementation name of packed rows over `base`. One name per base: HF looks a
    model's masks and attention up by name, process-wide, so a second model over another base
    must not re-point the first one's. No name contains "flash": transformers takes any such
    name for a flash-attn implementation of its own (and may swap in its default one)."""
    return ATTENTION if base == "sdpa" else f"{ATTENTION}_{base.replace('flash_attention', 'fa')}"


def register(base: str) -> str:
    """Make `attention_name(base)` an attn_implementation HF accepts, over `base` (its masks,
    and its attention wherever no spans are given); returns that name. Calling it again, for
    any base, changes nothing already registered."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = attention_name(base)
    ALL_ATTENTION_FUNCTIONS.register(name, functools.partial(packed_attention, base=base))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def is_packed(model) -> bool:
    """Whether `model` was loaded with a packed attention (`register`'s name over its base)."""
    return model.config._attn_implementation.startswith(ATTENTION)
