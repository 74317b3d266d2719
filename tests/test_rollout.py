"""The rollout engine against the reference implementation: HF `generate` (exact greedy
outputs, the same sampling distribution), the learner (recorded log-probs), and its own
promises (every sequence once with its own prompt, EOS and max length)."""

import contextlib
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import jaxtyping
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.attention.flex_attention import create_mask, flex_attention
from transformers import LlamaConfig, LlamaForCausalLM, TopPLogitsWarper

from projected_grpo import rollout
from projected_grpo.ahead import Ahead
from projected_grpo.models import completion_logprobs, load_model
from projected_grpo.rollout import CALL_PARTS, GRAPH_PARTS, KV_WINDOW, RolloutEngine, Sampling, _stack, in_nucleus, live_blocks, sample_tokens
from projected_grpo.svd_adapter import DEFAULT_TARGETS, SVDLinear, merged, reference_mode, unwrap_svd, wrap_svd


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cpu")
    return model, tokenizer


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 50000, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_hf_generate_through_slot_reuse(tiny):
    """5 prompts x 2 samples through 3 slots: refills, ragged lengths, a prompt prefilled once for two slots."""
    model, tokenizer = tiny
    prompts = prompts_of([5, 17, 3, 30, 9])
    out = RolloutEngine(model, tokenizer).generate_ids(prompts, Sampling(max_new_tokens=12, temperature=0.0, top_p=1.0, batch=3), n=2)
    assert len(out) == 10
    for i, (completion, logprobs, truncated) in enumerate(out):
        expected = hf_greedy(model, prompts[i // 2], 12)
        assert completion == expected[: len(completion)] and len(logprobs) == len(completion)
        assert truncated == (len(completion) == 12)


def test_eos_ends_each_sequence_and_every_sample_returns_once(tiny):
    """With a third of the vocabulary as EOS, sequences end at different lengths and slots are refilled mid-run."""
    model, tokenizer = tiny
    engine = RolloutEngine(model, tokenizer)
    engine.eos = list(range(0, model.config.vocab_size, 3))
    prompts = prompts_of([4, 8, 12, 16, 6, 10])
    torch.manual_seed(0)
    out = engine.generate_ids(prompts, Sampling(max_new_tokens=10, temperature=1.0, top_p=1.0, batch=4), n=3)
    eos = set(engine.eos)
    assert len(out) == 18
    lengths = []
    for completion, logprobs, truncated in out:
        assert 1 <= len(completion) <= 10 and len(logprobs) == len(completion)
        assert not eos & set(completion[:-1])  # EOS only as the last token
        assert truncated == (completion[-1] not in eos) == engine.truncated(completion) and (not truncated or len(completion) == 10)
        lengths.append(len(completion))
    assert len(set(lengths)) > 2  # the test exercises ragged ends, not one length
    # Each sample continues its own prompt: greedy decoding with the same EOS set equals HF's.
    engine_greedy = engine.generate_ids(prompts, Sampling(max_new_tokens=10, temperature=0.0, top_p=1.0, batch=4), n=1)
    for p, (completion, _, _) in zip(prompts, engine_greedy):
        ref = hf_greedy(model, p, 10)
        cut = next((j + 1 for j, t in enumerate(ref) if t in eos), len(ref))
        assert completion == ref[:cut]


def test_tail_moves_to_fewer_slots_and_keeps_every_sequence(tiny):
    """Once nothing waits and at most half the decoded slots are live, decoding continues on
    fewer slots (their K/V moved down): greedy outputs still equal HF's, sequence by sequence."""
    model, tokenizer = tiny
    engine = RolloutEngine(model, tokenizer)
    engine.eos = list(range(0, model.config.vocab_size, 17))  # lengths spread geometrically (mean ~17)
    prompts = prompts_of([3 + (7 * i) % 23 for i in range(12)], seed=1)
    decoded_slots = []
    decode = engine.decode
    engine.decode = lambda tokens, *args: decoded_slots.append(len(tokens)) or decode(tokens, *args)
    out = engine.generate_ids(prompts, Sampling(max_new_tokens=40, temperature=0.0, top_p=1.0, batch=8), n=1)
    assert {8, 4} <= set(decoded_slots) and decoded_slots == sorted(decoded_slots, reverse=True)
    eos = set(engine.eos)
    for p, (completion, logprobs, truncated) in zip(prompts, out):
        ref = hf_greedy(model, p, 40)
        cut = next((j + 1 for j, t in enumerate(ref) if t in eos), len(ref))
        assert completion == ref[:cut] and len(logprobs) == len(completion) and truncated == (cut == 40 and ref[39] not in eos)


def test_a_dry_decode_step_changes_no_state(tiny, monkeypatch):
    """A CUDA graph is captured after a dry run of its decode step (the warm-up): run on CPU before
    every step, dry runs leave every output as it was (greedy, EOS ends, refills, the tail's moves)."""
    model, tokenizer = tiny
    engine = RolloutEngine(model, tokenizer)
    engine.eos = list(range(0, model.config.vocab_size, 3))
    prompts = prompts_of([3 + (7 * i) % 23 for i in range(12)], seed=1)
    sampling = Sampling(max_new_tokens=40, temperature=0.0, top_p=1.0, batch=8)
    expected = engine.generate_ids(prompts, sampling)
    dry_runs = []

    def warmed(self, run, device, clock):
        def step(active, window):
            dry_runs.append(active)
            run(active, window, True)
            return run(active, window, False)
        return step

    monkeypatch.setattr(RolloutEngine, "_stepper", warmed)
    out = engine.generate_ids(prompts, sampling)
    assert len(set(dry_runs)) > 1 and any(1 < len(c) < 40 for c, _, _ in out)  # through EOS ends in decode, refills and the tail
    for (c, lp, trunc), (c_ref, lp_ref, trunc_ref) in zip(out, expected):
        assert c == c_ref and torch.equal(lp, lp_ref) and trunc == trunc_ref


def test_decoder_layers_see_no_grad_inputs_with_gradient_checkpointing_on():
    """train.py turns on HF's gradient checkpointing, which hooks the embedding so that its output
    requires grad even under no_grad: the engine's layer inputs must not (on CUDA, layer 0 would
    get a compiled decode graph of its own for every batch size and KV window)."""
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cpu")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seen = []
    for layer in model.model.layers:
        layer.input_layernorm.register_forward_pre_hook(lambda module, args: seen.append(args[0].requires_grad))
    RolloutEngine(model, tokenizer).generate_ids(prompts_of([5, 9]), Sampling(max_new_tokens=4, temperature=1.0, top_p=1.0, batch=2))
    assert len(seen) == 4 * len(model.model.layers)  # a prefill and 3 decode steps
    assert not any(seen)


def causal_prefix(positions: torch.Tensor, q_len: int, window: int) -> torch.Tensor:
    """[slot, 1, q_len, window]: each slot's positions 0..position, what decode must read."""
    return (torch.arange(window) <= positions[:, None])[:, None, None, :].expand(-1, 1, q_len, -1)


def test_live_blocks_cover_each_slots_causal_prefix():
    """Per slot, the blocks up to its position's, and within them the mask hides what is past it;
    a window at the cache's capacity may end inside a block."""
    positions, window = torch.tensor([0, 127, 128, 300, 509, 5]), 4 * KV_WINDOW - 2
    mask = live_blocks(positions, 2, window)
    assert mask.kv_num_blocks[:, 0, 0].tolist() == [1, 1, 2, 3, 4, 1]
    assert mask.shape == (6, 1, 2, window)
    blocks = mask.to_dense().repeat_interleave(KV_WINDOW, dim=-1)[..., :window].bool()  # [slot, 1, 1, window]: the blocks read
    dense = blocks & create_mask(mask.mask_mod, 6, 1, 2, window, device="cpu")
    assert torch.equal(dense, causal_prefix(positions, 2, window))


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU kernels need a C++ compiler")
def test_compiled_flex_reads_no_block_past_a_slots_own():
    """Compiled flex (inductor's CPU kernel, which skips blocks as the CUDA one does) reads no
    block past a slot's kv_num_blocks: with NaN there, its output is SDPA's over the prefix.
    Steps with new positions (a new BlockMask each, as decode makes) reuse the one compile."""
    gen = torch.Generator().manual_seed(0)
    window = 4 * KV_WINDOW - 2  # the last block partial, as at the cache's capacity
    q, k, v = (torch.randn(5, 2, s, 16, generator=gen) for s in (2, window, window))
    counter = CompileCounterWithBackend("inductor")
    attend = torch.compile(flex_attention, backend=counter, fullgraph=True)
    for step in range(3):
        positions = torch.tensor([3, 126, 255, 256, 500]) + step  # slot 1 crosses into its second block
        poisoned = v.clone()
        for slot, p in enumerate(positions.tolist()):
            poisoned[slot, :, (p // KV_WINDOW + 1) * KV_WINDOW :] = float("nan")
        out = attend(q, k, poisoned, block_mask=live_blocks(positions, 2, window), scale=0.25)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_prefix(positions, 2, window), scale=0.25)
        assert torch.allclose(out, ref, rtol=0, atol=1e-6), (out - ref).abs().max()
    assert counter.frame_count == 1


def test_flex_decode_equals_sdpa(tiny, monkeypatch):
    """Flex decode (each slot reads its own KV blocks) against SDPA (the whole window, masked),
    from the same seed: the same tokens and log-probs within fp32 rounding, on ragged prompts x 2
    through 4 slots (EOS ends, refills, the tail on 2 and 1 slots), slots in different
    128-position blocks at once. Sampled at temperature 1, not greedy: greedy on the random
    tiny model falls into loops that never meet an EOS, so every slot would end together."""
    model, tokenizer = tiny
    prompts = prompts_of([5, 100, 126, 140, 20, 120, 260, 60], seed=2)  # under, at and past the first block
    sampling = Sampling(max_new_tokens=40, temperature=1.0, top_p=1.0, batch=4)
    steps = []
    made = live_blocks
    monkeypatch.setattr(rollout, "live_blocks", lambda positions, q_len, window: steps.append(positions.clone()) or made(positions, q_len, window))
    outs = []
    for attention in ("flex", "sdpa"):
        engine = RolloutEngine(model, tokenizer, attention=attention)
        engine.eos = list(range(0, model.config.vocab_size, 17))  # lengths spread geometrically (mean ~17)
        torch.manual_seed(2)
        outs.append(engine.generate_ids(prompts, sampling, n=2))
    for (c_flex, lp_flex, t_flex), (c, lp, t) in zip(*outs):
        assert c_flex == c and t_flex == t and torch.allclose(lp_flex, lp, rtol=0, atol=1e-5), (lp_flex - lp).abs().max()
    blocks = [set((p // KV_WINDOW + 1).tolist()) for p in steps]
    assert any(len(b) > 1 for b in blocks) and set().union(*blocks) == {1, 2, 3}
    assert {len(p) for p in steps} == {4, 2, 1}  # refills, then the tail


@contextlib.contextmanager
def svd_wrapped(model, cache: Path) -> Iterator[dict[str, SVDLinear]]:
    """The model's Linears as SVD adapters with a large random delta_S; unwrapped on exit (the module-scoped model is shared)."""
    adapters = wrap_svd(model, DEFAULT_TARGETS, cache)
    try:
        torch.manual_seed(0)
        for a in adapters.values():
            torch.nn.init.normal_(a.delta_S, std=0.5)
        yield adapters
    finally:
        unwrap_svd(model, adapters)


def assert_scored_as_the_learner(model, prompts: list[list[int]], out: list, n: int, temperature: float) -> None:
    """Every recorded log-prob equals the learner's (its own modules, HF attention) on the same tokens."""
    for i, (completion, logprobs, _) in enumerate(out):
        p = prompts[i // n]
        ids = torch.tensor([p + completion])
        mask = torch.zeros(1, ids.shape[1] - 1, dtype=torch.bool)
        mask[0, len(p) - 1 :] = True
        with torch.no_grad():
            ref = completion_logprobs(model, ids, torch.ones_like(ids), mask, temperature)[mask]
        assert torch.allclose(ref, logprobs, atol=1e-4), (ref - logprobs).abs().max()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logprobs_match_the_learner(tiny, tmp_path, temperature):
    """Sampler (merged weights, engine attention, KV cache) vs learner (adapter path, HF attention)."""
    model, tokenizer = tiny
    prompts = prompts_of([7, 21, 13])
    with svd_wrapped(model, tmp_path / "svd") as adapters:
        with merged(adapters):
            out = RolloutEngine(model, tokenizer).generate_ids(prompts, Sampling(max_new_tokens=12, temperature=temperature, top_p=0.95, batch=2), n=2)
        assert_scored_as_the_learner(model, prompts, out, 2, temperature)


def all_fused(engine: RolloutEngine) -> bool:
    return all(w.qkv is not None and w.gate_up is not None for w in engine.layer_weights())


def fused_vs_modules(model, tokenizer, prompts: list[list[int]]) -> list:
    """The engine's samples with fused projections; asserts that they are the per-module path's:
    the same tokens (same seed) and log-probs within fp32 rounding."""
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.95, batch=2)
    outs = []
    for fuse in (True, False):
        torch.manual_seed(0)
        outs.append(RolloutEngine(model, tokenizer, fuse=fuse).generate_ids(prompts, sampling, n=2))
    for (c_fused, lp_fused, _), (c, lp, _) in zip(*outs):
        assert c_fused == c and torch.allclose(lp_fused, lp, rtol=0, atol=1e-5), (lp_fused - lp).abs().max()
    return outs[0]


def test_fused_projections_compute_what_the_modules_do(tiny, tmp_path):
    """One matmul for Q, K, V and one for gate and up: the per-module path's tokens and log-probs
    on the plain model, on adapters with a large delta_S merged (the fused weights are the merged
    ones: its samples differ from the plain model's), and on a Llama with biases on every projection."""
    model, tokenizer = tiny
    prompts = prompts_of([7, 21, 13])
    assert all_fused(RolloutEngine(model, tokenizer))
    plain = fused_vs_modules(model, tokenizer, prompts)
    with svd_wrapped(model, tmp_path / "svd") as adapters, merged(adapters):
        assert all_fused(RolloutEngine(model, tokenizer))
        tuned = fused_vs_modules(model, tokenizer, prompts)
    assert [c for c, _, _ in tuned] != [c for c, _, _ in plain]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, attention_bias=True, mlp_bias=True, eos_token_id=0)
    llama = LlamaForCausalLM(config).eval()
    for m in llama.modules():  # HF zeroes biases at init: random ones, so that a dropped or misplaced bias shows
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias, std=0.5)
    assert all_fused(RolloutEngine(llama, tokenizer)) and llama.model.layers[0].self_attn.q_proj.bias is not None
    fused_vs_modules(llama, tokenizer, prompts)


def test_a_snapshot_samples_what_the_merged_weights_did_whatever_they_are_now(tiny, tmp_path):
    """A snapshot (every projection copied, o and down too) samples what the engine samples from
    the merged weights it was taken of, bit for bit, after those weights were unmerged and merged
    again at another delta_S (what a learner on another thread does meanwhile); sampling leaves
    the model's train/eval mode alone. Unmerged adapters with their delta on refuse a snapshot."""
    model, tokenizer = tiny
    prompts = prompts_of([7, 21, 13])
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.95, batch=2)
    engine = RolloutEngine(model, tokenizer)
    with svd_wrapped(model, tmp_path / "svd") as adapters:
        with merged(adapters):
            torch.manual_seed(0)
            expected = engine.generate_ids(prompts, sampling, n=2)
            snapshot = engine.layer_weights(snapshot=True)
        assert all(w.o is not None and w.down is not None for w in snapshot)
        with torch.no_grad():
            for a in adapters.values():
                a.delta_S.mul_(-1.0)
        model.train()
        for live in (False, True):  # the model's own weights: unmerged, then merged at the new delta_S
            with merged(adapters) if live else contextlib.nullcontext():
                torch.manual_seed(0)
                out = engine.generate_ids(prompts, sampling, n=2, snapshot=snapshot)
            assert all(c == c_exp and torch.equal(lp, lp_exp) for (c, lp, _), (c_exp, lp_exp, _) in zip(out, expected))
        assert model.training
        model.eval()
        with pytest.raises(ValueError, match="merge the adapters"):
            engine.layer_weights(snapshot=True)


def test_inexact_projections_run_their_modules(tiny, tmp_path):
    """Unmerged adapters with their delta on compute W x + U ((Vh x) * delta_S), not one stored
    weight: no group is fused, and the samples still score as the learner does. With the delta
    off (reference_mode) they are the base Linears and fuse. Projections of which only some have
    a bias, or a Linear subclass, do not stack."""
    model, tokenizer = tiny
    prompts = prompts_of([7, 21, 13])
    with svd_wrapped(model, tmp_path / "svd") as adapters:
        engine = RolloutEngine(model, tokenizer)
        assert all(w.qkv is None and w.gate_up is None for w in engine.layer_weights())
        torch.manual_seed(0)
        out = engine.generate_ids(prompts, Sampling(max_new_tokens=12, temperature=1.0, top_p=0.95, batch=2), n=2)
        assert_scored_as_the_learner(model, prompts, out, 2, 1.0)
        with reference_mode(adapters):
            assert all_fused(engine)
    with_bias, subclass = torch.nn.Linear(8, 4), type("LinearSubclass", (torch.nn.Linear,), {})
    assert _stack(with_bias, torch.nn.Linear(8, 2)) is not None
    assert _stack(with_bias, torch.nn.Linear(8, 2, bias=False)) is None and _stack(with_bias, subclass(8, 2)) is None


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper tail of Pearson's chi-square (Wilson-Hilferty normal approximation)."""
    n, k = counts.sum(), (probs > 0).sum().item()
    keep = probs > 0
    stat = (((counts[keep] - n * probs[keep]) ** 2) / (n * probs[keep])).sum().item()
    df = k - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampler_draws_the_hf_nucleus_distribution_exactly():
    """The sort-free sampler vs HF's TopP warper on logits with a known nucleus: no draw
    outside it, frequencies consistent with its renormalised probabilities."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 500, generator=gen) * 1.5
    temperature, top_p = 0.7, 0.9
    warped = TopPLogitsWarper(top_p)(None, logits / temperature)
    nucleus = warped.softmax(-1)[0]
    assert 5 < (nucleus > 0).sum() < 400  # a real cut: neither everything nor one token
    torch.manual_seed(0)
    tokens, logprobs = sample_tokens(logits.expand(20000, -1), temperature, top_p)
    assert bool((nucleus[tokens] > 0).all())
    assert torch.allclose(logprobs, (logits[0] / temperature).log_softmax(-1)[tokens])
    assert chi_square_p(torch.bincount(tokens, minlength=500).float(), nucleus) > 1e-3
    # The same frequencies fail against the un-cut softmax: the test can tell the two apart.
    assert chi_square_p(torch.bincount(tokens, minlength=500).float(), (logits[0] / temperature).softmax(-1)) < 1e-6


def test_nucleus_membership_is_hf_rule():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = logits.softmax(-1)
    kept = TopPLogitsWarper(0.8)(None, logits.clone()) > -math.inf
    members = torch.stack([in_nucleus(probs, torch.tensor([t]), 0.8) for t in range(5)], dim=1)
    assert torch.equal(members, kept)


def test_engine_first_tokens_follow_hf_generate_distribution(tiny):
    """End to end on the tiny model given a random, larger LM head (a nucleus of tens of tokens,
    not 150k): the first two sampled tokens of the engine and of HF generate (temperature 0.7,
    top_p 0.9) have the same distribution."""
    model, tokenizer = tiny
    sharp, _, _ = load_model("tiny-random-qwen3", "cpu")
    sharp.config.tie_word_embeddings = False
    head = torch.randn(sharp.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    sharp.lm_head.weight = torch.nn.Parameter(head)
    prompt = prompts_of([6])[0]
    n = 400
    torch.manual_seed(1)
    out = RolloutEngine(sharp, tokenizer).generate_ids([prompt], Sampling(max_new_tokens=2, temperature=0.7, top_p=0.9, batch=200), n=n)
    ids = torch.tensor([prompt] * n)
    torch.manual_seed(2)
    ref = sharp.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=2, min_new_tokens=2, pad_token_id=0)[:, len(prompt):]
    with torch.no_grad():
        logits = sharp(torch.tensor([prompt])).logits[:, -1]
    nucleus = TopPLogitsWarper(0.9)(None, logits / 0.7).softmax(-1)[0]
    first_engine = torch.tensor([c[0] for c, _, _ in out])
    assert bool((nucleus[first_engine] > 0).all()) and bool((nucleus[ref[:, 0]] > 0).all())
    for first in (first_engine, ref[:, 0]):
        assert chi_square_p(torch.bincount(first, minlength=len(nucleus)).float(), nucleus) > 1e-3
    # Second token: a two-sample test over the tokens both samplers drew at least 5 times in all.
    second_engine = torch.tensor([c[1] for c, _, _ in out if len(c) > 1])
    a, b = (torch.bincount(s, minlength=len(nucleus)).float() for s in (second_engine, ref[:, 1]))
    common = (a + b) >= 10
    pooled = (a + b)[common] / (a + b)[common].sum()
    assert common.sum() >= 3
    assert chi_square_p(a[common], pooled) > 1e-4 and chi_square_p(b[common], pooled) > 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the decode layer is compiled there only")
def test_a_call_without_compile_keeps_the_engines_compiled_layer():
    """The compiled decode layer is made once per engine: a generate call with compile=False
    between two with compile=True does not drop it, and the second compiled call reuses it."""
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cuda")
    engine = RolloutEngine(model, tokenizer)
    layers = []
    for compile in (True, False, True):
        engine.generate_ids(prompts_of([7, 20]), Sampling(max_new_tokens=4, temperature=0.0, top_p=1.0, batch=2, compile=compile))
        layers.append(engine._compiled)
    assert layers[0] is not None and layers[0] is layers[1] is layers[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled decode step replayed as CUDA graphs")
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_on_cuda_matches_the_learner(compile):
    """The CUDA path (graphs per KV window, optionally compiled) scores what it samples as the
    learner does, across KV windows and slot refills (bf16: a tolerance for kernel numerics)."""
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cuda")
    engine = RolloutEngine(model, tokenizer)
    assert all_fused(engine)  # the graphed, compiled step runs the fused projections
    engine.eos = []
    prompts = prompts_of([7, 300, 40, 600])
    torch.manual_seed(0)
    out = engine.generate_ids(prompts, Sampling(max_new_tokens=300, temperature=0.7, top_p=0.95, batch=3, compile=compile), n=2)
    diffs = []
    for i, (completion, logprobs, truncated) in enumerate(out):
        p = prompts[i // 2]
        assert len(completion) == 300 and truncated
        ids = torch.tensor([p + completion], device="cuda")
        mask = torch.zeros(1, ids.shape[1] - 1, dtype=torch.bool, device="cuda")
        mask[0, len(p) - 1 :] = True
        with torch.no_grad():
            ref = completion_logprobs(model, ids, torch.ones_like(ids), mask, 0.7)[mask].cpu()
        diffs.append((ref - logprobs).abs())
    diffs = torch.cat(diffs)
    assert diffs.mean() < 0.02 and diffs.max() < 0.25, (diffs.mean(), diffs.max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled decode step replayed as CUDA graphs")
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_flex_decode_on_cuda_equals_sdpa(compile, monkeypatch):
    """The CUDA path with flex (in the compiled layer, graphed; without compile the step falls
    back to SDPA) against SDPA, in fp32 so that the two kernels agree to rounding: the same
    greedy tokens and log-probs, across KV windows, refills and the tail, with slots in blocks far apart."""
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cuda", "float32")
    prompts = prompts_of([7, 300, 40, 600, 130])
    made, masks = live_blocks, []
    monkeypatch.setattr(rollout, "live_blocks", lambda *args: masks.append(args) or made(*args))
    outs = []
    for attention in ("flex", "sdpa"):
        engine = RolloutEngine(model, tokenizer, attention=attention)
        engine.eos = []
        outs.append(engine.generate_ids(prompts, Sampling(max_new_tokens=300, temperature=0.0, top_p=1.0, batch=3, compile=compile), n=2))
    assert bool(masks) == compile  # made during warm-up and capture only: replays read the positions in place
    for (c_flex, lp_flex, _), (c, lp, _) in zip(*outs):
        assert c_flex == c and torch.allclose(lp_flex, lp, rtol=0, atol=1e-4), (lp_flex - lp).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled decode step replayed as CUDA graphs")
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_on_cuda_on_a_background_thread_equals_the_main_threads(compile, tmp_path):
    """--one-step-off samples on a background thread (its own stream; graphs captured and the
    snapshot's layer compiled there) while the main thread merges, unmerges and multiplies: the
    same tokens and log-probs as the main thread's from the same weights (fp32: kernels agree)."""
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cuda", "float32")
    engine = RolloutEngine(model, tokenizer)
    engine.eos = []
    prompts = prompts_of([7, 300, 40, 600])
    sampling = Sampling(max_new_tokens=300, temperature=0.7, top_p=0.95, batch=3, compile=compile)

    def seeded(snapshot=None):
        torch.manual_seed(0)
        return engine.generate_ids(prompts, sampling, n=2, snapshot=snapshot)

    with svd_wrapped(model, tmp_path / "svd") as adapters:
        with merged(adapters):
            expected, snapshot = seeded(), engine.layer_weights(snapshot=True)
        first = engine.last_call
        x = torch.randn(2048, 2048, device="cuda", generator=torch.Generator("cuda").manual_seed(1))  # not the sampler's generator
        ahead = Ahead("cuda", seeded, snapshot)
        for _ in range(50):
            with merged(adapters):
                x = torch.tanh(x @ x)
        out = ahead.result()
    for (c, lp, _), (c_exp, lp_exp, _) in zip(out, expected):
        assert c == c_exp and torch.allclose(lp, lp_exp, rtol=0, atol=1e-4), (lp - lp_exp).abs().max()
    # The graphs of both calls, remade in each: every shape new to the fresh engine, then every one met.
    shapes = lambda call: [(g.slots, g.window) for g in call.graphs]  # noqa: E731
    assert first.graphs and not any(g.met for g in first.graphs) and all(g.seconds > 0 for g in first.graphs)
    assert shapes(engine.last_call) == shapes(first) and all(g.met for g in engine.last_call.graphs)


def test_a_capture_gets_the_cached_blocks_back_only_when_the_driver_runs_short(monkeypatch):
    """make_room_for_capture's decision, with the driver's free memory stubbed: below the reserve
    the cache is emptied, at or above it never (emptying synchronizes the device)."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    for free, expect in ((rollout.CAPTURE_RESERVE - 1, True), (rollout.CAPTURE_RESERVE, False), (10 * rollout.CAPTURE_RESERVE, False)):
        emptied.clear()
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 * 2**30))
        assert rollout.make_room_for_capture(torch.device("cuda")) is expect
        assert emptied == ([True] if expect else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the driver's free memory and the caching allocator")
def test_make_room_for_capture_on_cuda_returns_the_cached_blocks():
    """With the driver left short by blocks the allocator caches (freed tensors), the call hands
    them back: the driver's free memory rises by at least what was cached."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0]
    blocks = []
    while free - sum(b.numel() for b in blocks) > rollout.CAPTURE_RESERVE // 2:
        blocks.append(torch.empty(rollout.CAPTURE_RESERVE // 2, dtype=torch.uint8, device=device))
    cached = sum(b.numel() for b in blocks)
    del blocks
    assert torch.cuda.mem_get_info(device)[0] < rollout.CAPTURE_RESERVE  # freed, still cached
    assert rollout.make_room_for_capture(device)
    assert torch.cuda.mem_get_info(device)[0] >= cached


def test_allocated_is_called_once_before_the_first_forward(monkeypatch):
    """generate_ids' `allocated` (one-step-off's learner waits for it before it plans its memory):
    called once, after the KV cache exists and before any prefill or decode; the output unchanged."""
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cpu")
    engine = RolloutEngine(model, tokenizer)
    prompts, sampling = prompts_of([5, 30, 12]), Sampling(max_new_tokens=6, batch=2)
    events = []
    for name in ("prefill", "decode"):
        forward = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, forward=forward, name=name, **kw: events.append(name) or forward(*a, **kw))
    torch.manual_seed(0)
    out = engine.generate_ids(prompts, sampling, n=2, allocated=lambda: events.append("allocated"))
    torch.manual_seed(0)
    assert events.count("allocated") == 1 and events[0] == "allocated" and "decode" in events
    assert [c for c, _, _ in engine.generate_ids(prompts, sampling, n=2)] == [c for c, _, _ in out]


def test_a_calls_stats_count_its_decode_steps_and_tokens_and_time_its_parts():
    """engine.last_call: every token but each sequence's first (its prefill's) comes from a
    decode step, one per live slot; with more sequences than slots the slots are refilled. Its
    seconds split the call's wall time into parts, and its decode steps by shape add up to them."""
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cpu")
    engine = RolloutEngine(model, tokenizer)
    prompts, sampling = prompts_of([5, 30, 12]), Sampling(max_new_tokens=9, batch=4)
    start = time.perf_counter()
    out = engine.generate_ids(prompts, sampling, n=3)
    wall = time.perf_counter() - start
    stats = engine.last_call
    assert stats.sequences == 9 and stats.slots == 4 and stats.prefills >= 2  # 9 sequences through 4 slots: refilled
    assert stats.live_slot_steps == sum(len(c) for c, _, _ in out) - len(out)
    assert max(len(c) for c, _, _ in out) - 1 <= stats.decode_steps <= stats.live_slot_steps
    assert 0 < stats.mean_live <= 4
    assert set(stats.seconds) == set(CALL_PARTS) and all(stats.seconds[p] == 0 for p in GRAPH_PARTS) and stats.graphs == ()  # no graphs on CPU
    assert stats.seconds["prefill"] > 0 and stats.seconds["decode"] > 0 and sum(stats.seconds.values()) <= wall
    assert sum(s.steps for s in stats.shapes) == stats.decode_steps and len({(s.slots, s.window) for s in stats.shapes}) == len(stats.shapes)
    assert math.isclose(sum(s.seconds for s in stats.shapes), stats.seconds["decode"], rel_tol=1e-9)
    assert {s.slots for s in stats.shapes} <= {1, 2, 4} and {s.window for s in stats.shapes} == {30 + 9}  # the tail halves the slots; a window past the cache's capacity reads all of it


def test_the_compiled_decode_layer_does_not_recompile_for_a_new_call(tiny, monkeypatch):
    """The sizes that change between decode steps and between generate calls (slots, KV window,
    the cache's capacity: each call's longest prompt plus max_new_tokens) are marked dynamic
    before the layer's first compile, so calls after the first compile nothing; left to dynamo,
    a second call with a new capacity recompiled it (2 frames here)."""
    model, tokenizer = tiny
    engine = RolloutEngine(model, tokenizer)
    counter = CompileCounterWithBackend("eager")  # dynamo's decisions, without inductor's codegen
    engine._compiled = torch.compile(engine._decode_layer, backend=counter)
    # The layer as runs have it: BEARTYPE=1's shape checks keep state dynamo guards on (14 frames
    # a call with them on), and runs go without.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    weights, frames = engine.layer_weights(), []
    for capacity in (640, 700, 768):  # three calls
        before = counter.frame_count
        for slots, window in ((8, 128), (8, 256), (8, 384), (4, 384), (4, 512), (2, 512), (1, 512)):  # a call's steps: windows grow, the tail halves the slots
            k_cache = [torch.zeros(slots, engine.n_kv, capacity, engine.head_dim) for _ in engine.body.layers]
            tokens, positions = torch.randint(100, 1000, (slots,)), torch.full((slots,), window - 5)
            with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=rollout.RECOMPILE_LIMIT):
                engine.decode(tokens, positions, k_cache, [torch.zeros_like(k) for k in k_cache], window, weights, compiled=True)
        frames.append(counter.frame_count - before)
    assert frames[0] > 0 and frames[1:] == [0, 0], frames
