"""Activation checkpointing per micro-batch (projected_grpo/activations.py): the fewest layers
that fit, what the probe measures, and gradients that do not depend on the choice (issue 21)."""

from dataclasses import replace

import pytest
import torch

from benchmarks.bench_step import largest_rel_diff
from projected_grpo.activations import ActivationBytes, Checkpointing, checkpoint_first, decoder_layers, enable_checkpointing
from projected_grpo.models import load_model
from projected_grpo.svd_adapter import DEFAULT_TARGETS, delta_grads, merged, wrap_svd
from test_packing import rollouts
from train import PRESETS, backward_parts, learner_checkpointing, micro_batches, probe_batch, probe_loss

COST = ActivationBytes(layer=100.0, kept=10.0, rest=50.0, largest=20.0)  # bytes per token


def test_the_fewest_layers_that_fit_are_checkpointed():
    free = [0]
    c = Checkpointing("auto", 4, COST, lambda: free[0])
    # 1,000 tokens need 1000 x (50 + 40 + (4 - k) x 100 + 10 k) bytes: 490 kB at k = 0, 130 kB at k = 4.
    for budget, k in ((10**9, 0), (400_000, 1), (310_000, 2), (220_000, 3), (130_000, 4), (1_000, 4)):
        free[0] = (budget + 1) / 0.85
        assert c.layers_for(1000) == k, budget
        assert COST.need(1000, 4, k) <= budget or k == 4
        assert k == 0 or COST.need(1000, 4, k - 1) > budget  # the fewest
    free[0] = 300_000 / 0.85
    assert [c.layers_for(t) for t in (100, 500, 700, 1000, 2000, 3000)] == [0, 0, 1, 3, 4, 4]  # more tokens, more layers; all where none fits
    assert Checkpointing("always", 4).layers_for(10) == 4 and Checkpointing("never", 4).layers_for(10**9) == 0


def test_the_token_cap_is_cut_to_recompute_nothing_down_to_its_floor_then_to_what_fits():
    free = [0]
    c = Checkpointing("auto", 4, COST, lambda: free[0], smallest=1024)
    usable = lambda n: free.__setitem__(0, n / 0.85 + 1)  # noqa: E731
    # A token needs 490 bytes with no layer checkpointed (50 + 40 + 4 x 100), 130 with every layer.
    usable(16384 * 490)
    assert c.tokens_for(16384) == 16384 and c.layers_for(16384) == 0  # it all fits as it is: the preset's cap
    usable(5000 * 490)
    assert c.tokens_for(16384) == 4864 and c.layers_for(4864) == 0  # the multiple of 256 tokens that recomputes nothing
    assert COST.need(4864, 4, 0) <= 0.85 * free[0] < COST.need(4864 + 256, 4, 0)
    usable(800 * 490)  # 768 tokens would fit unrecomputed, under the floor: recompute instead, 3,015 tokens fit so
    assert c.tokens_for(16384) == 2816 and c.layers_for(2816) == 4
    assert c.tokens_for(512) == 512 and c.layers_for(512) == 0  # a preset's cap under the floor is its own floor
    free[0] = 0
    assert c.tokens_for(16384) == 256  # nothing fits: one step's worth, not zero
    # The floor at the preset's cap: that cap, with layers recomputed, wherever every layer recomputed fits.
    keep = Checkpointing("auto", 4, COST, lambda: free[0], smallest=16384)
    usable(5000 * 490)
    assert keep.tokens_for(16384) == 16384 and keep.layers_for(16384) == 4
    usable(5000 * 130)
    assert keep.tokens_for(16384) == 4864 and keep.layers_for(4864) == 4  # the multiple of 256 that fits with every layer recomputed
    assert Checkpointing("always", 4).tokens_for(16384) == 16384 == Checkpointing("never", 4).tokens_for(16384)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cpu")
    enable_checkpointing(model)
    adapters = wrap_svd(model, DEFAULT_TARGETS, tmp_path_factory.mktemp("svd"))
    gen = torch.Generator().manual_seed(5)
    for a in adapters.values():
        a.delta_S.data = 0.05 * torch.randn(a.rank, generator=gen)
    return model, tokenizer, adapters


def test_the_probe_counts_what_the_forward_keeps_and_leaves_no_trace(tiny):
    model, _, adapters = tiny
    before = {n: a.delta_S.detach().clone() for n, a in adapters.items()}
    for a in adapters.values():
        a.delta_S.grad = None
    c = learner_checkpointing(model, adapters, replace(PRESETS["smoke"][1], grad_checkpointing="auto"))
    cfg = model.config
    # fp32: a layer keeps at least its two norms' inputs and the MLP's gate, up and their product
    # (in SwiGLU's backward); a checkpointed one exactly its input; outside them the LM head's
    # fp32 logits over the vocabulary at every position, which are also the largest tensor.
    assert c.cost.layer >= 4 * (2 * cfg.hidden_size + 3 * cfg.intermediate_size)
    assert c.cost.kept == 4 * cfg.hidden_size
    assert c.cost.largest >= 0.99 * 4 * cfg.vocab_size and c.cost.rest >= c.cost.largest
    assert c.n_layers == len(decoder_layers(model)) == cfg.num_hidden_layers
    assert all(a.delta_S.grad is None and torch.equal(a.delta_S, before[n]) for n, a in adapters.items())
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))
    assert not any(a.merged for a in adapters.values())


def test_gradients_are_the_same_whatever_is_checkpointed(tiny):
    """No layer, the memory rule's choice per micro-batch, and every layer: the same loss and delta_S gradients."""
    model, tokenizer, adapters = tiny
    cfg = replace(PRESETS["smoke"][1], kl_beta=0.1, learner_tokens=1000)  # rows of two sequences
    batch = rollouts(model, tokenizer)
    n = len(decoder_layers(model))
    tokens = micro_batches([r for r in batch if not r.teacher], cfg, cfg.learner_tokens)[0].ids.shape[1]  # the first, longest row
    auto = Checkpointing("auto", n, COST, lambda: (COST.need(tokens, n, 1) + 1) / 0.85)  # room for it with 1 layer checkpointed
    results = []
    # and every layer checkpointed with room for 256 tokens a micro-batch: smaller micro-batches, the same sums
    capped = Checkpointing("auto", n, COST, lambda: (COST.need(256, n, n) + 1) / 0.85)
    for c in (Checkpointing("never", n), auto, Checkpointing("always", n), capped):
        for a in adapters.values():
            a.delta_S.grad = None
        seen = []
        apply = c.apply
        c.apply = lambda model, t, apply=apply: seen.append(apply(model, t)) or seen[-1]
        g_s, sums = backward_parts(model, adapters, batch, cfg, 42.0, c)
        results.append((g_s, {k: g.clone() for k, g in delta_grads(adapters).items()}, sums["loss"], seen))
    assert results[0][3] == [0] * len(results[0][3]) and results[2][3] == [n] * len(results[2][3])
    assert results[1][3][0] == 1 and 0 in results[1][3]  # the longest row 1 layer, a short one none
    assert len(results[3][3]) > len(results[0][3]) and all(k == n for k in results[3][3])  # more micro-batches, all checkpointed
    # The same micro-batches, whatever layers are recomputed: the same sums (bit-equal on the CPUs
    # seen; recomputing replays the same ops). Smaller micro-batches add the same terms in another
    # order: equal to fp32's rounding, read against the largest entry as test_packing reads it (an
    # elementwise tolerance failed on an AMD EPYC, 1.7e-4 relative on a small entry where the
    # largest difference was 9e-6 of the largest entry).
    for (g_s, g, loss, _), same_rows in zip(results[1:], (True, True, False)):
        assert loss == pytest.approx(results[0][2], rel=1e-6 if same_rows else 1e-5)
        worst = max(largest_rel_diff(g, results[0][1]), largest_rel_diff(g_s, results[0][0]))
        assert worst < (1e-6 if same_rows else 1e-4), worst


def test_apply_flags_the_first_k_layers(tiny):
    model, _, _ = tiny
    n = len(decoder_layers(model))
    c = Checkpointing("auto", n, COST, lambda: (COST.need(1000, n, 1) + 1) / 0.85)
    assert c.apply(model, 1000) == 1
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [True] + [False] * (n - 1)
    checkpoint_first(model, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the caching allocator's counters are the yardstick")
def test_measured_bytes_match_the_allocator_on_cuda(tmp_path):
    """The probe's count against what the allocator holds after the same forward, on tiny-random-qwen3."""
    model, _, _ = load_model("tiny-random-qwen3", "cuda")
    enable_checkpointing(model)
    adapters = wrap_svd(model, DEFAULT_TARGETS, tmp_path)
    cfg = replace(PRESETS["smoke"][1], device="cuda", grad_checkpointing="auto")
    c = learner_checkpointing(model, adapters, cfg)
    b = probe_batch(model.config.vocab_size, "cuda")
    with merged(adapters):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        loss = probe_loss(model, b, cfg)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - start
        del loss
    tokens = b.ids.shape[1]
    predicted = c.cost.need(tokens, c.n_layers, 0) - 2 * tokens * c.cost.largest
    assert 0.8 * held <= predicted <= 1.25 * held, (predicted, held)
