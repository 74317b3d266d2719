"""The rollout engine: prompts in, sampled completions and the sampler's log-probs out.

Used by training, eval, build-pool and the benchmark alike. The engine runs the model's own
modules (embedding, norms, rotary embedding, o and down projections, MLP activation, LM head;
SVD adapters as they are, merged or not) and owns only the KV cache, attention, sampling and
two fused projections:

- Fused projections: one matmul for Q, K and V and one for gate and up, on their weights
  concatenated at the start of each generate call (after training merged delta_S into them)
  and freed when it returns (meanwhile a second copy of those weights: 65% of a Qwen3 layer,
  4.7 GB for Qwen3-4B in bf16).
  Only where exact: each fused projection computes F.linear(x, weight, bias) with its weight as
  stored, so the fused matmul computes the same dot products (rounding may differ with the
  kernel); a group with any other module (an adapter whose delta is on but not merged into
  its weight) runs its modules as they are.
- Snapshots: `layer_weights(snapshot=True)` copies every projection (Q/K/V and gate/up
  stacked, o and down cloned); a generate call given it reads no weight of the model's, so
  another thread may merge and unmerge the model's weights meanwhile (one-step-off training
  samples the next step while this one learns). The engine never changes the model's
  train/eval mode either: no module it runs depends on it (no dropout: its own attention).
- KV cache: `batch` slots of (longest prompt + max_new_tokens) positions, head-major
  ([slot, K/V head, position, dim]: a window is one strided block per head), one sequence
  per slot at its own length (no padding). Attention is grouped-query on the K/V heads as
  stored (the query heads of a group are folded into the query-length axis, so K and V are
  never copied out to every query head) and reads the cache only up to the next multiple
  of KV_WINDOW past the longest live sequence. With `attention="flex"` each slot's decode
  reads only its own KV_WINDOW blocks up to its position (FlexAttention, a BlockMask built
  from the positions on the device); used in the compiled decode layer (CUDA with `compile`)
  and on CPU (eager, for the tests); elsewhere the step uses SDPA. Prefill always uses SDPA.
- Continuous batching: when a sequence ends its slot is refilled with a waiting one (once
  at least REFILL of the slots are free, so a prefill serves several), so a batch is not
  held by its longest sequence. A prompt sampled n times is prefilled once and its K/V
  copied to its slots. Once nothing waits and at most half of the decoded slots are live,
  the live ones move into the lower half and decoding continues on it alone (the step reads
  every decoded slot's K/V window, live or not, so the tail of long completions would
  otherwise cost as much per token as the full batch).
- The decode step (transformer, sampling rounds, and the commit of every accepted token to its
  slot's state: output, position, count, end) leaves the host two flags to read (a row to redraw,
  a sequence that ended): one device sync per token; the host redraws the rare rows the rounds
  left outside the nucleus and finishes ended sequences. On CUDA that step is replayed as a CUDA graph,
  one per (decoded slots, KV window), and with `compile` one decoder layer is torch.compile'd (regional
  compilation: one compile serves all layers, whose fused weights are its arguments; the slot
  count, KV window and cache capacity are dynamic sizes from its first compile, so later
  shapes and calls reuse it; the few recompiles left, such as one slot, which dynamo
  specializes, are allowed up to RECOMPILE_LIMIT). On CPU the same functions run eagerly.

Guarantees:
- Exact sampling from softmax(logits / T) cut to the nucleus of mass top_p, without a sort:
  a token is drawn from the full softmax by an exponential race (argmax p_i / E_i), and kept
  if the mass of strictly more probable tokens is < top_p (HF's TopP rule), else redrawn.
  Accepted draws are distributed exactly as the nucleus distribution; HF's rule and this
  one differ only on exact ties and on float rounding at the nucleus boundary.
  temperature 0 is greedy (log-probs then at temperature 1).
- Recorded log-probs are log softmax(logits / T)[token], the quantity the learner scores
  (models.completion_logprobs); top_p's cut is not in them.
- Every (prompt, sample) comes back once, in input order, with its own prompt; a completion
  ends at its first EOS (kept) or after max_new_tokens (then `truncated`).
Supports decoder-only Llama-family stacks (Qwen3 with its q/k norms, Llama, SmolLM2) with
full attention in every layer.
"""

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from tqdm import tqdm

from projected_grpo.ahead import compiled_code
from projected_grpo.svd_adapter import SVDLinear

KV_WINDOW = 128  # decode reads the KV cache in windows of this many positions (a CUDA graph per window and slot count), flex in blocks of as many
REFILL = 1 / 8  # refill free slots once this fraction of the batch is free (or nothing is live)
PREFILL_TOKENS = 16384  # prompt tokens per prefill forward (bounds its activation memory)
# Compiles of the decode layer an engine may make: at dynamo's default of 8 a training run's
# later shapes ran uncompiled (before mark_dynamic_sizes, each new size recompiled it once).
RECOMPILE_LIMIT = 64
# Exponential-race draws per graphed decode step (fixed shapes) before the rejected rows are
# redrawn on the host; 1 on CPU, where a race over the vocabulary costs more than a redraw.
DRAW_ROUNDS = 2
# Driver memory a graph capture should find free: its private pool grows only from the driver,
# never from the caching allocator's blocks, so where less is free those blocks go back first.
CAPTURE_RESERVE = 2 * 2**30
# (weight, bias) of projections concatenated on the output axis: one matmul computes them all.
Stacked = tuple[Float[Tensor, "_out _in"], Float[Tensor, " _out"] | None]  # "_": each projection its own sizes


class LayerWeights(NamedTuple):
    """A decoder layer's projections as the engine computes them: each a (weight, bias) that one
    F.linear applies, or None where the layer's own module runs."""

    qkv: Stacked | None  # Q, K and V stacked
    gate_up: Stacked | None  # gate and up stacked
    o: Stacked | None = None  # o_proj and down_proj: copies of their own in a snapshot, else None
    down: Stacked | None = None


@dataclass(frozen=True)
class Sampling:
    """How rollouts are sampled."""

    max_new_tokens: int = 1536
    """Longest completion in tokens."""
    temperature: float = 0.7
    """Sampling temperature; 0 = greedy."""
    top_p: float = 0.95
    """Nucleus sampling mass (1 = no cut)."""
    batch: int = 64
    """Sequences decoded at once (KV-cache slots)."""
    compile: bool = True
    """CUDA: torch.compile the decode step's decoder layer, once per engine (one compile serves every layer; ~15 s on first use on an H200, journal 2026-11-30), before graphing the step; ignored on CPU."""


class ShapeTime(NamedTuple):
    """The decode steps one generate call ran at one shape, and their wall seconds (the step's
    replay, its one sync, redraws and finishing ended sequences; its graph's making apart)."""

    slots: int  # decoded slots [0, active)
    window: int  # KV positions each read
    steps: int
    seconds: float


class GraphTime(NamedTuple):
    """The making of one decode step's CUDA graph in a generate call (GRAPH_PARTS): a shape this
    engine made a graph for in an earlier call (`met`) finds its compiled code, cuDNN plans and
    kernels' choices made; a new one pays for them."""

    slots: int
    window: int
    met: bool
    seconds: float


@dataclass(frozen=True)
class CallStats:
    """How full one generate call kept its decode steps, and where its wall time went: a mean of
    live slots far below `slots` says the call waited on its longest sequences (the drained
    tail), not on throughput; `shapes` says what a step cost at each slot count and KV window."""

    sequences: int
    slots: int  # KV slots (Sampling.batch, or fewer sequences)
    prefills: int  # prefill forwards (refills of free slots, in chunks of PREFILL_TOKENS)
    decode_steps: int
    live_slot_steps: int  # live slots summed over the decode steps: the tokens they made (each sequence's first comes from its prefill)
    seconds: dict[str, float]  # wall seconds by part (CALL_PARTS)
    shapes: tuple[ShapeTime, ...]  # the decode steps by shape, in the order first met
    graphs: tuple[GraphTime, ...]  # the CUDA graphs this call made, in order (none on CPU)

    @property
    def mean_live(self) -> float:
        return self.live_slot_steps / max(self.decode_steps, 1)

    @property
    def graph_seconds(self) -> float:
        """Wall seconds this call spent making CUDA graphs (GRAPH_PARTS, the span `graphs` times)."""
        return sum(self.seconds[p] for p in GRAPH_PARTS)


# A generate call's parts, timed on the host: each part ends in a device sync (the step's flags,
# finish_ended's read, the graph parts' stream syncs) or, for compact's copies, in the next part's.
# The graph parts make each new (slots, window) graph: room (make_room_for_capture), warmup (the
# dry run, where a new shape compiles), capture (recording and instantiating the graph).
GRAPH_PARTS = ("room", "warmup", "capture")
CALL_PARTS = ("prefill", *GRAPH_PARTS, "decode", "compact")


class CallClock:
    """Wall seconds of one generate call's parts (CALL_PARTS) and of its decode steps per shape."""

    def __init__(self):
        self.seconds = dict.fromkeys(CALL_PARTS, 0.0)
        self.shapes: dict[tuple[int, int], list] = {}  # (slots, window) -> [steps, seconds]
        self.graphs: list[GraphTime] = []

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - start

    @contextmanager
    def step(self, slots: int, window: int) -> Iterator[None]:
        """One decode step at this shape; the making of its graph inside it is timed in the graph parts."""
        graphs = lambda: sum(self.seconds[p] for p in GRAPH_PARTS)  # noqa: E731
        start, before = time.perf_counter(), graphs()
        yield
        seconds = time.perf_counter() - start - (graphs() - before)
        self.seconds["decode"] += seconds
        shape = self.shapes.setdefault((slots, window), [0, 0.0])
        shape[0], shape[1] = shape[0] + 1, shape[1] + seconds

    @contextmanager
    def graph(self, slots: int, window: int, met: bool) -> Iterator[None]:
        """The making of one graph (its parts timed inside it, on `part`)."""
        start = time.perf_counter()
        yield
        self.graphs.append(GraphTime(slots, window, met, time.perf_counter() - start))

    def shape_times(self) -> tuple[ShapeTime, ...]:
        return tuple(ShapeTime(slots, window, steps, seconds) for (slots, window), (steps, seconds) in self.shapes.items())


@dataclass
class Completion:
    prompt_ids: list[int]
    completion_ids: list[int]  # up to and including EOS
    text: str
    logprobs: Float[Tensor, " n"]  # sampler's log p(token) at the sampling temperature (at 1 when greedy)
    truncated: bool  # ended at max_new_tokens before its EOS


# ----------------------------------------------------------------------------
# Sampling


def _race(probs: Float[Tensor, "b v"]) -> Int[Tensor, " b"]:
    """One exact draw per row: argmax p_i / E_i with E_i ~ Exp(1) picks i with probability p_i."""
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def in_nucleus(probs: Float[Tensor, "b v"], tokens: Int[Tensor, " b"], top_p: float) -> Bool[Tensor, " b"]:
    """Whether each token is in its row's top_p nucleus: the mass of strictly more probable tokens is < top_p."""
    p = probs.gather(1, tokens[:, None])
    return (probs * (probs > p)).sum(-1) < top_p


def draw(logits: Float[Tensor, "b v"], temperature: float, top_p: float, rounds: int = 1) -> tuple[Int[Tensor, " b"], Float[Tensor, " b"], Bool[Tensor, " b"]]:
    """Up to `rounds` nucleus draws per row; returns tokens, their log-probs at `temperature`, and
    which rows got a token inside the nucleus (the others must be redrawn: see `sample_tokens`)."""
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, logits.float().log_softmax(-1).gather(1, tokens[:, None])[:, 0], torch.ones_like(tokens, dtype=torch.bool)
    logp = (logits.float() / temperature).log_softmax(-1)
    probs = logp.exp()
    tokens = _race(probs)
    accepted = torch.ones_like(tokens, dtype=torch.bool)
    if top_p < 1:
        accepted = in_nucleus(probs, tokens, top_p)
        for _ in range(rounds - 1):
            again = _race(probs)
            take = ~accepted & in_nucleus(probs, again, top_p)
            tokens = torch.where(take, again, tokens)
            accepted = accepted | take
    return tokens, logp.gather(1, tokens[:, None])[:, 0], accepted


def sample_tokens(logits: Float[Tensor, "b v"], temperature: float, top_p: float) -> tuple[Int[Tensor, " b"], Float[Tensor, " b"]]:
    """Exact nucleus samples of softmax(logits / temperature) and their log-probs at `temperature`:
    the rows `draw` leaves outside the nucleus are drawn again until every row is accepted."""
    tokens, logprobs, accepted = draw(logits, temperature, top_p)
    while not bool(accepted.all()):
        rows = (~accepted).nonzero()[:, 0]
        t, lp, ok = draw(logits[rows], temperature, top_p)
        tokens[rows], logprobs[rows], accepted[rows] = t, lp, ok
    return tokens, logprobs


# ----------------------------------------------------------------------------
# The engine


def make_room_for_capture(device: torch.device) -> bool:
    """Hand the caching allocator's unused blocks back to the driver where it has less than
    CAPTURE_RESERVE free; returns whether it did. A graph's private pool cannot use those blocks:
    on an 80 GiB card `fast` ran out in a capture at step 8 with 34 GiB cached by the learner's
    last step and 2 MiB free (2026-12-06). Only then, not per capture as torch.cuda.graph does:
    emptying the cache synchronizes, and would stall a learner on another thread (--one-step-off)."""
    if torch.cuda.mem_get_info(device)[0] >= CAPTURE_RESERVE:
        return False
    torch.cuda.empty_cache()
    return True


def kv_window(positions: int) -> int:
    """The KV window that holds this many positions: decode reads the cache in KV_WINDOW steps."""
    return -(-positions // KV_WINDOW) * KV_WINDOW


def live_blocks(positions: Int[Tensor, " b"], q_len: int, window: int) -> BlockMask:
    """What flex decode reads: per slot, the KV_WINDOW blocks up to its position (kv_num_blocks =
    position // KV_WINDOW + 1 of kv_indices 0, 1, ...) and, in them, positions 0..position, for
    `q_len` query rows (the folded query heads). Made from the device tensor `positions` alone
    (no Python ints but the shapes), so a CUDA graph's replay reads each step's positions."""
    b, blocks = positions.shape[0], -(-window // KV_WINDOW)  # the last one partial where the window is the cache's capacity
    kv_num_blocks = (positions // KV_WINDOW + 1).to(torch.int32)[:, None, None]
    kv_indices = torch.arange(blocks, dtype=torch.int32, device=positions.device).expand(b, 1, 1, blocks).contiguous()
    # A lambda, not a def: flex tells a mask_mod by its arity, which BEARTYPE=1's wrapper of every def hides.
    causal = lambda b, h, q_idx, kv_idx: kv_idx <= positions[b]  # noqa: E731
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=KV_WINDOW, mask_mod=causal, seq_lengths=(q_len, window), compute_q_blocks=False)


def mark_dynamic_sizes(per_slot: list[Tensor], mask: Tensor | BlockMask, caches: list[Tensor]) -> None:
    """Mark the sizes the compiled decode layer sees change as dynamic before its first compile:
    the slots (dim 0 of every per-slot tensor, the mask and the caches), the KV window (the SDPA
    mask's last dim) and the cache's capacity (dim 2 of K and V: each call's longest prompt plus
    max_new_tokens). Left to dynamo, each size's first change recompiles the layer: a new
    capacity in a second generate call did (a CPU probe, 2026-12-06), so the bench's steady step
    paid for compiles a long run pays once."""
    for t in (*per_slot, *caches):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    for t in caches:
        torch._dynamo.maybe_mark_dynamic(t, 2)
    if isinstance(mask, Tensor):  # a BlockMask (flex) carries its sizes in its own tensors
        torch._dynamo.maybe_mark_dynamic(mask, 0)
        torch._dynamo.maybe_mark_dynamic(mask, 3)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on [b, t, heads, d] (HF's apply_rotary_pos_emb, heads on axis 2)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _exact_linear(module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) if the module computes exactly F.linear(x, weight, bias), else None: a plain
    nn.Linear (not a subclass, which may compute something else), or an SVD adapter whose delta
    is folded into its base's weight (merged) or switched off (reference_mode)."""
    if isinstance(module, SVDLinear) and (module.merged or not module.delta_enabled):
        module = module.base
    return (module.weight, module.bias) if type(module) is nn.Linear else None


def _stack(*modules: nn.Module) -> Stacked | None:
    """The modules' weights (and biases) concatenated, if each is exact and all or none have a
    bias; else None, and the caller runs the modules themselves."""
    parts = [_exact_linear(m) for m in modules]
    if any(p is None for p in parts):
        return None
    biases = [b for _, b in parts if b is not None]
    if 0 < len(biases) < len(parts):
        return None
    return torch.cat([w for w, _ in parts]), torch.cat(biases) if biases else None


class RolloutEngine:
    """Samples completions from an HF Llama-family causal LM (see the module docstring);
    `fuse=False` runs every projection's own module (the benchmark's and tests' baseline);
    `attention` is the decode step's: "flex" reads each slot's own KV blocks, "sdpa" the whole window."""

    # sdpa stays the default until the H200 measures flex (bench_step.py's decode_attention row).
    def __init__(self, model, tokenizer, fuse: bool = True, attention: Literal["sdpa", "flex"] = "sdpa"):
        config = model.config
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
            raise ValueError(f"rollout engine: {type(model).__name__} has sliding-window layers, which the engine does not implement")
        self.tokenizer = tokenizer
        self.body = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.group = config.num_attention_heads // self.n_kv
        self.qkv_split = (config.num_attention_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim)
        self.fuse, self.attention = fuse, attention
        eos = model.generation_config.eos_token_id
        self.eos = sorted(set(eos if isinstance(eos, list) else [eos]))
        self._compiled = None  # torch.compile'd decode layer, made once per engine (one compile serves every layer)
        self._graphed: set[tuple[int, int]] = set()  # (slots, window) this engine made a decode graph for, in any call
        self.last_call: CallStats | None = None  # the latest generate call's, for the benchmark

    def truncated(self, ids: list[int]) -> bool:
        """Whether a completion (sampled here, or a teacher's cut to max_new_tokens) ended
        without an EOS: the one rule for `Completion.truncated` and the teacher rollouts'."""
        return ids[-1] not in self.eos

    # -- the transformer, with the engine's attention -------------------------

    @torch.no_grad()
    def layer_weights(self, snapshot: bool = False) -> list[LayerWeights]:
        """Per layer, Q, K and V's weights stacked into one projection and gate and up's into
        another, from the weights as they are now (merged or not); None for a group that is not
        exact (`_stack`), or for every group without `fuse`. Made once per generate call and
        passed to the layer functions as arguments: a compiled, graphed step reads them as inputs.

        With `snapshot`, also o and down as copies, whatever `fuse` says: a generate call on
        these reads no weight of the model's (the module docstring's Snapshots). Every
        projection must then be exact (the LM head is: wrap_svd never adapts it), else a ValueError."""
        if not (self.fuse or snapshot):
            return [LayerWeights(None, None)] * len(self.body.layers)
        out = []
        for layer in self.body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            gated = all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))  # down(act(gate(x)) * up(x))
            w = LayerWeights(_stack(attn.q_proj, attn.k_proj, attn.v_proj), _stack(mlp.gate_proj, mlp.up_proj) if gated else None)
            if snapshot:
                w = w._replace(o=_stack(attn.o_proj), down=_stack(mlp.down_proj) if gated else None)
                if any(part is None for part in w):
                    raise ValueError("rollout engine: a snapshot needs every projection to be one stored weight (merge the adapters first) and a gated MLP")
            out.append(w)
        return out

    def _layer(self, layer, x: Tensor, cos: Tensor, sin: Tensor, attend, qkv: Stacked | None, gate_up: Stacked | None,
               o: Stacked | None, down: Stacked | None) -> Tensor:
        attn, mlp = layer.self_attn, layer.mlp
        h = layer.input_layernorm(x)
        q, k, v = F.linear(h, *qkv).split(self.qkv_split, dim=-1) if qkv is not None else (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        a = attend(q, k, v, attn.scaling)
        x = x + (F.linear(a, *o) if o is not None else attn.o_proj(a))
        h = layer.post_attention_layernorm(x)
        if gate_up is None:
            return x + mlp(h)
        gate, up = F.linear(h, *gate_up).chunk(2, dim=-1)
        a = mlp.act_fn(gate) * up
        return x + (F.linear(a, *down) if down is not None else mlp.down_proj(a))

    def _embed(self, ids: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # detach: HF's gradient checkpointing hooks the embedding so that its output requires grad
        # (for the learner), even under no_grad; layer 0 would then get a compiled graph of its own.
        x = self.body.embed_tokens(ids).detach()
        cos, sin = self.body.rotary_emb(x, positions)
        return x, cos[:, :, None], sin[:, :, None]

    def prefill(self, ids: Int[Tensor, "p t"], lengths: Int[Tensor, " p"], slots: Int[Tensor, " s"], source: Int[Tensor, " s"],
                k_cache: list[Tensor], v_cache: list[Tensor], weights: list[LayerWeights]) -> Float[Tensor, "p v"]:
        """Run right-padded prompts (causal attention; pads come after every real token, so no
        real token sees one), write prompt `source[i]`'s K/V into slot `slots[i]`, and return the
        logits after each prompt's last token."""
        t = ids.shape[1]
        x, cos, sin = self._embed(ids, torch.arange(t, device=ids.device).expand_as(ids))
        for layer, kc, vc, w in zip(self.body.layers, k_cache, v_cache, weights):
            def attend(q, k, v, scale, kc=kc, vc=vc):
                kc[slots, :, :t], vc[slots, :, :t] = k[source].transpose(1, 2), v[source].transpose(1, 2)
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True)
                return out.transpose(1, 2).flatten(2)
            x = self._layer(layer, x, cos, sin, attend, *w)
        last = x[torch.arange(len(ids), device=ids.device), lengths - 1]
        return self.lm_head(self.body.norm(last)).float()

    def decode(self, tokens: Int[Tensor, " b"], positions: Int[Tensor, " b"], k_cache: list[Tensor], v_cache: list[Tensor], window: int,
               weights: list[LayerWeights], compiled: bool = False) -> Float[Tensor, "b v"]:
        """One token per slot at its own position: write its K/V there, attend to positions
        0..position (within the first `window` of the cache), return the next-token logits.
        Flex in the compiled layer (`compiled`: CUDA with Sampling.compile) and on CPU (eager,
        for the tests); on CUDA without compile SDPA, as eager flex materialises the scores."""
        x, cos, sin = self._embed(tokens[:, None], positions[:, None])
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if self.attention == "flex" and (compiled or tokens.device.type == "cpu"):
            mask = live_blocks(positions, self.group, window)
        else:
            mask = (torch.arange(window, device=tokens.device) <= positions[:, None])[:, None, None, :]
        layer_step = self._compiled_layer() if compiled else self._decode_layer
        if compiled:
            mark_dynamic_sizes([x, cos, sin, rows, positions], mask, [*k_cache, *v_cache])
        for layer, kc, vc, w in zip(self.body.layers, k_cache, v_cache, weights):
            x = layer_step(layer, x, cos, sin, kc, vc, rows, positions, mask, *w)
        return self.lm_head(self.body.norm(x[:, 0])).float()

    def _decode_layer(self, layer, x: Tensor, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor, rows: Tensor, positions: Tensor,
                      mask: Bool[Tensor, "b 1 1 w"] | BlockMask, qkv: Stacked | None, gate_up: Stacked | None, o: Stacked | None,
                      down: Stacked | None) -> Tensor:
        b, window = x.shape[0], mask.shape[-1]

        def attend(q, k, v, scale):
            kc[rows, :, positions], vc[rows, :, positions] = k[:, 0], v[:, 0]
            # the `group` query heads sharing a K/V head act as `group` query positions
            q, keys, values = q.view(b, self.n_kv, self.group, self.head_dim), kc[:, :, :window], vc[:, :, :window]
            if isinstance(mask, BlockMask):
                out = flex_attention(q, keys, values, block_mask=mask, scale=scale)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
            return out.reshape(b, 1, -1)

        return self._layer(layer, x, cos, sin, attend, qkv, gate_up, o, down)

    def _compiled_layer(self):
        """`_decode_layer` torch.compile'd, made on first use and kept: a generate call without
        compile leaves it for the next one with."""
        if self._compiled is None:
            self._compiled = torch.compile(self._decode_layer)
        return self._compiled

    # -- the loop -------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: Sampling, n: int = 1, desc: str = "generate",
                 snapshot: list[LayerWeights] | None = None, allocated: Callable[[], None] | None = None) -> list[Completion]:
        """`n` completions of every prompt (chat-rendered text, no special tokens added), prompt-major;
        from `snapshot` (`layer_weights(snapshot=True)`) if given, else from the weights as they are;
        `allocated` as generate_ids calls it."""
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        out = self.generate_ids(ids, sampling, n, desc, snapshot, allocated)
        return [Completion(ids[i // n], c, self.tokenizer.decode(c, skip_special_tokens=True), lp, trunc) for i, (c, lp, trunc) in enumerate(out)]

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], sampling: Sampling, n: int = 1, desc: str = "generate",
                     snapshot: list[LayerWeights] | None = None, allocated: Callable[[], None] | None = None) -> list[tuple[list[int], Tensor, bool]]:
        """(completion ids, sampler log-probs, truncated) for `n` samples of every prompt, prompt-major,
        from `snapshot` if given (see `generate`). `allocated()`, if given, is called once the KV
        cache and the slots' state exist, before the first prefill (a learner sharing the device
        with this call on another thread plans its memory after it: train.sample_ahead).

        One function past a screen, on purpose: the slots' state (KV caches, next tokens,
        positions, owners) lives in this call and the closures below share it, where a class
        would scatter it over methods and attributes; the loop at the end reads top to bottom
        (compact the tail, refill free slots by prefill, decode one token, redraw, finish the ended)."""
        device = self.lm_head.weight.device
        max_new, temperature, top_p = sampling.max_new_tokens, sampling.temperature, sampling.top_p
        work = deque(divmod(i, n) for i in range(len(prompts) * n))  # (prompt, sample) in output order
        b = min(sampling.batch, len(work))
        capacity = max(map(len, prompts)) + max_new
        dtype = self.lm_head.weight.dtype
        compiled = sampling.compile and device.type == "cuda"  # on CPU the decode layer runs eagerly
        k_cache = [torch.zeros(b, self.n_kv, capacity, self.head_dim, dtype=dtype, device=device) for _ in self.body.layers]
        v_cache = [torch.zeros_like(k) for k in k_cache]
        weights = snapshot or self.layer_weights()  # this call's weights (merged or not); no copy outlives it
        eos = torch.tensor(self.eos, device=device)
        # Per slot: the token to feed next, where it goes, how many were generated, outputs so far.
        tokens = torch.zeros(b, dtype=torch.long, device=device)
        positions = torch.zeros(b, dtype=torch.long, device=device)
        n_gen = torch.zeros(b, dtype=torch.long, device=device)
        out_tokens = torch.zeros(b, max_new, dtype=torch.long, device=device)
        out_logprobs = torch.zeros(b, max_new, dtype=torch.float32, device=device)
        is_live = torch.zeros(b, dtype=torch.bool, device=device)  # the slot's sequence has not ended
        ended = torch.zeros(b, dtype=torch.bool, device=device)  # ended since the host last finished sequences
        owner: list[tuple[int, int] | None] = [None] * b  # (prompt, sample) per slot; None = free
        length = [0] * b  # host mirror of positions, for the KV window
        results: dict[tuple[int, int], tuple[list[int], Tensor, bool]] = {}
        if allocated is not None:
            allocated()

        def decode_slots(active: int, window: int) -> Tensor:
            """Next-token logits of slots [0, active), reading `window` positions of their K/V."""
            return self.decode(tokens[:active], positions[:active], [k[:active] for k in k_cache], [v[:active] for v in v_cache], window, weights, compiled)

        def commit(active: int, new: Tensor, logp: Tensor, mask: Tensor) -> None:
            """Append each masked slot's new token in [0, active) to its completion, and move it to
            the token's position; a slot that ends leaves is_live and is flagged in `ended`. Fixed
            shapes and no host sync: the CUDA graph of a decode step holds it."""
            rows = slice(0, active)
            at = n_gen[rows].clamp(max=max_new - 1)[:, None]  # an ended slot's n_gen is max_new: it writes nothing, at a valid index
            for out, value in ((out_tokens, new), (out_logprobs, logp)):
                out[rows].scatter_(1, at, torch.where(mask, value, out[rows].gather(1, at)[:, 0])[:, None])
            n_gen[rows] += mask
            positions[rows] += mask
            tokens[rows] = torch.where(mask, new, tokens[rows])
            just = mask & ((new[:, None] == eos).any(-1) | (n_gen[rows] == max_new))
            ended[rows] |= just
            is_live[rows] &= ~just

        def decode_step(active: int, window: int, rounds: int, dry: bool):
            """Decode slots [0, active), draw, commit the live rows drawn inside the nucleus (none if
            `dry`: a CUDA graph's warm-up, which must not advance the state); returns the draws, the
            logits and two flags (a live row left to redraw, a sequence ended)."""
            logits = decode_slots(active, window)
            new, logp, accepted = draw(logits, temperature, top_p, rounds)
            commit(active, new, logp, is_live[:active] & accepted & (not dry))
            flags = torch.stack(((is_live[:active] & ~accepted).any(), ended.any()))
            return new, logp, accepted, logits, flags

        rounds = DRAW_ROUNDS if device.type == "cuda" else 1
        clock = CallClock()
        step = self._stepper(lambda active, window, dry: decode_step(active, window, rounds, dry), device, clock)
        bar = tqdm(total=len(work), desc=desc, leave=False)

        def finish_ended() -> None:
            """Hand the sequences flagged in `ended` to the results and free their slots."""
            if not (done := ended.nonzero()[:, 0].tolist()):
                return
            ended.zero_()
            idx = torch.tensor(done, device=device)
            counts, toks, lps = n_gen[idx].tolist(), out_tokens[idx].cpu(), out_logprobs[idx].cpu()
            for j, slot in enumerate(done):
                c = toks[j, : counts[j]].tolist()
                results[owner[slot]] = (c, lps[j, : counts[j]], self.truncated(c))
                owner[slot] = None
            bar.update(len(done))

        def window_of(slots: list[int]) -> int:
            """The KV window these slots' next tokens read: past the longest."""
            return min(capacity, kv_window(max(length[s] for s in slots) + 1))

        def live_slots() -> list[int]:
            """Slots with a sequence (is_live on the host, rebuilt when it changes)."""
            return [s for s in range(b) if owner[s] is not None]

        def compact(active: int, live: list[int]) -> int:
            """The tail: halve the active slots while at most half are live, moving the live ones
            above the new bound into free slots below it. Returns the new bound."""
            while len(live) <= active // 2:
                active //= 2
            moving = [s for s in live if s >= active]
            if moving:
                free_below = [s for s in range(active) if owner[s] is None][: len(moving)]
                src, dst = torch.tensor(moving, device=device), torch.tensor(free_below, device=device)
                window = window_of(moving)
                for cache in (*k_cache, *v_cache):
                    cache[dst, :, :window] = cache[src, :, :window]
                for state in (tokens, positions, n_gen, out_tokens, out_logprobs, is_live):
                    state[dst] = state[src]
                is_live[src] = False
                for s, d in zip(moving, free_below):
                    owner[d], length[d], owner[s] = owner[s], length[s], None
            return active

        def refill(take: list[tuple[int, int]], free: list[int]) -> int:
            """Prefill the (prompt, sample) items `take` into the free slots and commit their first
            tokens; returns the prefill forwards it ran."""
            chunks = self._prefill_chunks(take, prompts)
            for chunk in chunks:
                slots_here = free[: len(chunk)]
                free = free[len(chunk) :]
                unique = sorted({p for p, _ in chunk})
                padded = torch.zeros(len(unique), max(len(prompts[p]) for p in unique), dtype=torch.long)
                for i, p in enumerate(unique):
                    padded[i, : len(prompts[p])] = torch.tensor(prompts[p])
                lengths = torch.tensor([len(prompts[p]) for p in unique], device=device)
                source = torch.tensor([unique.index(p) for p, _ in chunk], device=device)
                slots = torch.tensor(slots_here, device=device)
                with compiled_code:  # a learner on another thread passes through the model apart (ahead.py; a wait counts as prefill)
                    logits = self.prefill(padded.to(device), lengths, slots, source, k_cache, v_cache, weights)
                new, logp = torch.zeros_like(tokens), torch.zeros_like(out_logprobs[:, 0])
                new[slots], logp[slots] = sample_tokens(logits[source], temperature, top_p)
                n_gen[slots], is_live[slots] = 0, True
                positions[slots] = lengths[source] - 1  # the last prompt token's: the commit moves it to the first new token's
                mask = torch.zeros_like(is_live)
                mask[slots] = True
                commit(b, new, logp, mask)
                for slot, item in zip(slots_here, chunk):
                    owner[slot], length[slot] = item, len(prompts[item[0]])
            return len(chunks)

        def redraw(active: int, new: Tensor, logp: Tensor, accepted: Tensor, logits: Tensor) -> bool:
            """Draw again the live rows the step's rounds left outside the nucleus (in place of its
            outputs) and commit them. Returns whether a sequence has ended."""
            rows = (is_live[:active] & ~accepted).nonzero()[:, 0]
            new[rows], logp[rows] = sample_tokens(logits[rows], temperature, top_p)
            mask = torch.zeros_like(accepted)
            mask[rows] = True
            commit(active, new, logp, mask)
            return bool(ended.any())

        live = live_slots()
        active = b  # decode runs on slots [0, active)
        prefills = decode_steps = live_slot_steps = 0
        while work or live:
            if not work and len(live) <= active // 2:
                with clock.part("compact"):
                    active = compact(active, live)
                live = live_slots()
            free = [s for s in range(b) if owner[s] is None]
            if work and free and (len(free) >= max(1, int(b * REFILL)) or len(free) == b):
                with clock.part("prefill"):
                    prefills += refill([work.popleft() for _ in range(min(len(free), len(work)))], free)
                    finish_ended()
                live = live_slots()
                continue
            with clock.step(active, window := window_of(live)):
                new, logp, accepted, logits, flags = step(active, window)
                rejected, any_ended = flags.tolist()  # the step's one sync
                if rejected:
                    any_ended = redraw(active, new, logp, accepted, logits)
                if any_ended:
                    finish_ended()
            for s in live:
                length[s] += 1
            decode_steps, live_slot_steps = decode_steps + 1, live_slot_steps + len(live)
            if any_ended:
                live = live_slots()
        bar.close()
        self.last_call = CallStats(len(prompts) * n, b, prefills, decode_steps, live_slot_steps, clock.seconds, clock.shape_times(), tuple(clock.graphs))
        return [results[item] for item in (divmod(i, n) for i in range(len(prompts) * n))]

    def _prefill_chunks(self, take: list[tuple[int, int]], prompts: list[list[int]]) -> list[list[tuple[int, int]]]:
        """Split (prompt, sample) items into prefills of at most PREFILL_TOKENS distinct prompt tokens."""
        chunks, seen, tokens = [[]], set(), 0
        for item in take:
            if item[0] not in seen:
                if tokens and tokens + len(prompts[item[0]]) > PREFILL_TOKENS:
                    chunks.append([])
                    seen, tokens = set(), 0
                seen.add(item[0])
                tokens += len(prompts[item[0]])
            chunks[-1].append(item)
        return chunks

    def _stepper(self, run, device: torch.device, clock: CallClock):
        """step(active, window): run(active, window, dry=False); on CUDA replayed from CUDA graphs
        over the calling generate_ids' state tensors (KV caches, tokens, positions, outputs: the
        same storage for the whole call), captured lazily per (active slots, KV window) after a
        dry run (the warm-up), the making timed on `clock` (each graph, and by GRAPH_PARTS)."""
        if device.type != "cuda":
            return lambda active, window: run(active, window, False)
        pool = torch.cuda.graph_pool_handle()
        graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}

        def capture(active: int, window: int) -> tuple[torch.cuda.CUDAGraph, tuple]:
            with clock.part("room"):
                make_room_for_capture(device)
            side, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                # Warm-up, where a new shape compiles: dry, so it commits nothing (it rewrites the same K/V).
                with clock.part("warmup"), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    run(active, window, True)
                    side.synchronize()
                # Captured with capture_begin/end, not under torch.cuda.graph, whose device-wide
                # synchronize and empty_cache per capture would stall a learner running on
                # another thread (--one-step-off) and hand back its cached memory (make_room_for_capture
                # does that only when the driver runs short); thread_local: that learner's
                # allocations stay legal during the capture.
                with clock.part("capture"):
                    graph.capture_begin(pool, capture_error_mode="thread_local")
                    try:
                        outputs = run(active, window, False)
                    finally:
                        graph.capture_end()
                    side.synchronize()
            torch.cuda.current_stream().wait_stream(side)
            return graph, outputs

        def step(active: int, window: int):
            if (shape := (active, window)) not in graphs:
                # a learner on another thread passes through the model apart (ahead.py); a wait counts in this decode step, not as making
                with compiled_code, clock.graph(active, window, met=shape in self._graphed):
                    graphs[shape] = capture(active, window)
                self._graphed.add(shape)
            graph, outputs = graphs[shape]
            graph.replay()
            return outputs

        return step
