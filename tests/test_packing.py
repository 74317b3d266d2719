"""The learner's packed rows (projected_grpo/packing.py) on merged weights against the padded
adapter path they replaced (benchmarks/bench_step.py's baseline): the same log-probs and the
same delta_S gradients (issue 21)."""

import threading
import time
from dataclasses import replace

import pytest
import torch

from extract import load_pairs, pair_gradients
from grader import load_problems, render_prompt
from projected_grpo import packing
from projected_grpo.ahead import compiled_code
from projected_grpo.activations import Checkpointing, decoder_layers, enable_checkpointing
from projected_grpo.models import completion_logprobs, load_model
from projected_grpo.paths import DATA
from projected_grpo.rollout import RolloutEngine, Sampling
from projected_grpo.svd_adapter import DEFAULT_TARGETS, delta_grads, wrap_svd
from benchmarks.bench_step import largest_rel_diff, padded_backward
from train import PRESETS, Rollout, backward_parts, compile_learner, learner_checkpointing


def test_plan_puts_every_sequence_once_longest_first_within_budget():
    lengths = [5, 30, 7, 12, 3, 9, 40, 1]
    batches = packing.plan(lengths, budget=20)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [[lengths[i] for i in b] for b in batches] == [[40], [30], [12], [9, 7], [5, 3, 1]]  # over budget alone; filled in order
    assert all(sum(lengths[i] for i in b) <= 20 for b in batches if len(b) > 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cpu")
    adapters = wrap_svd(model, DEFAULT_TARGETS, tmp_path_factory.mktemp("svd"))
    gen = torch.Generator().manual_seed(3)
    for a in adapters.values():  # the policy away from the reference, so KL and delta_S's gradient are not trivial
        a.delta_S.data = 0.05 * torch.randn(a.rank, generator=gen)
    return model, tokenizer, adapters


def test_a_packed_row_scores_each_sequence_as_if_alone(tiny):
    model, _, _ = tiny
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(10, 1000, (n,), generator=gen).tolist() for n in (9, 4, 13)]
    ids, positions, spans = packing.pack(sequences, "cpu")
    assert spans.bounds == (0, 9, 13, 26) and spans.max_len == 13 and positions[0, 9:13].tolist() == [0, 1, 2, 3]
    with torch.no_grad():
        packed = completion_logprobs(model, ids, torch.ones_like(ids), torch.ones(1, 25, dtype=torch.bool), 0.7, positions, spans)[0]
        for s, start in zip(sequences, spans.bounds):
            alone = completion_logprobs(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long), torch.ones(1, len(s) - 1, dtype=torch.bool), 0.7)[0]
            torch.testing.assert_close(packed[start : start + len(s) - 1], alone, rtol=1e-5, atol=1e-5)


def rollouts(model, tokenizer) -> list[Rollout]:
    """Sampled students (sampler log-probs recorded) of 3 problems and a teacher text for each, with
    advantages of both signs: lengths differ, so packed rows and padded batches differ too."""
    problems = load_problems(DATA / "problems_rl.jsonl")[:3]
    torch.manual_seed(0)
    samples = RolloutEngine(model, tokenizer).generate([render_prompt(tokenizer, p, "run_tests") for p in problems], Sampling(max_new_tokens=7, temperature=1.0, top_p=1.0), n=2)
    out = [Rollout(problems[i // 2], c.prompt_ids, c.completion_ids, c.text, False, c.logprobs, c.truncated) for i, c in enumerate(samples)]
    teacher_ids = tokenizer("def run_tests():\n    pass", add_special_tokens=False)["input_ids"]
    out += [Rollout(p, out[2 * i].prompt_ids, teacher_ids[: 3 + i], "", True, None, True) for i, p in enumerate(problems)]
    for j, r in enumerate(out):
        r.advantage = (-1.0) ** j * (0.5 + 0.25 * j)
    return out


@pytest.mark.parametrize("loss_norm", ["constant", "sequence_mean"])
def test_packed_merged_learner_equals_the_padded_adapter_path(tiny, loss_norm):
    model, tokenizer, adapters = tiny
    cfg = replace(PRESETS["smoke"][1], kl_beta=0.1, learner_tokens=400, loss_norm=loss_norm)  # 2-3 rollouts a row
    batch, denominator = rollouts(model, tokenizer), 6.0 * 7
    for a in adapters.values():
        a.delta_S.grad = None
    g_s, sums = backward_parts(model, adapters, batch, cfg, denominator, learner_checkpointing(model, adapters, cfg))
    packed = {n: g.clone() for n, g in delta_grads(adapters).items()}
    assert len(packing.plan([len(r.prompt_ids) + len(r.completion_ids) for r in batch[:6]], cfg.learner_tokens)) > 1  # several rows

    for a in adapters.values():
        a.delta_S.grad = None
    loss = padded_backward(model, adapters, batch[:6], cfg, denominator)
    padded_s = {n: g.clone() for n, g in delta_grads(adapters).items()}
    loss += padded_backward(model, adapters, batch[6:], cfg, denominator)
    padded = delta_grads(adapters)

    assert sums["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert sums["student_tokens"] == sum(len(r.completion_ids) for r in batch[:6])
    worst, worst_s = largest_rel_diff(packed, padded), largest_rel_diff(g_s, padded_s)
    assert max(worst, worst_s) < 1e-4, (worst, worst_s)


def test_compiled_decoder_layers_give_the_eager_learners_sums_and_gradients(tmp_path):
    """compile_learner leaves a CPU run's layers eager; a CUDA run's (Config.learner_compile),
    here compiled on CPU: over several packed rows, KL on (the reference's no-grad pass runs
    compiled too), the same sums and delta_S gradients as the eager layers, to fp32 rounding;
    and the layers did run compiled."""
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cpu")  # its own: the layers stay compiled
    enable_checkpointing(model)
    adapters = wrap_svd(model, DEFAULT_TARGETS, tmp_path)
    gen = torch.Generator().manual_seed(4)
    for a in adapters.values():
        a.delta_S.data = 0.05 * torch.randn(a.rank, generator=gen)
    cfg = replace(PRESETS["smoke"][1], kl_beta=0.1, learner_tokens=400)
    batch, checkpointing = rollouts(model, tokenizer), learner_checkpointing(model, adapters, cfg)
    assert checkpointing.layers_for(400) == 0

    def learn(checkpointing: Checkpointing) -> tuple[dict, dict]:
        for a in adapters.values():
            a.delta_S.grad = None
        _, sums = backward_parts(model, adapters, batch, cfg, 6.0 * 7, checkpointing)
        return {n: g.clone() for n, g in delta_grads(adapters).items()}, sums

    eager, eager_sums = learn(checkpointing)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_learner(model, cfg)
    learn(checkpointing)
    assert not torch._dynamo.utils.counters["frames"]["ok"]  # on CPU: still eager
    compile_learner(model, replace(cfg, device="cuda"))  # what a CUDA run's Config asks for; compiling runs on any device
    # as picked (none recomputed here), then every layer recomputed: checkpoint() around the compiled call
    for c in (checkpointing, Checkpointing("always", len(decoder_layers(model)))):
        compiled, compiled_sums = learn(c)
        assert compiled_sums == pytest.approx(eager_sums, rel=1e-5, abs=1e-5)  # logp_gap: a sum of ~1e-6 roundings
        worst = largest_rel_diff(compiled, eager)
        assert worst < 1e-4, (c.policy, worst)
    assert torch._dynamo.utils.counters["frames"]["ok"] >= 2  # the policy's passes and the reference's ran compiled


def test_the_learner_an_extraction_and_a_prefill_wait_while_another_thread_holds_compiled_code(tiny):
    """Each pass through the model outside a CUDA graph waits for compiled_code (projected_grpo/ahead.py:
    with --one-step-off, a compile on one thread and a compiled layer called on the other failed on
    an H100): the learner's reference and policy passes, an extraction's, the engine's prefill."""
    model, tokenizer, adapters = tiny
    cfg = replace(PRESETS["smoke"][1], kl_beta=0.1, learner_tokens=400)
    batch, pairs = rollouts(model, tokenizer), load_pairs(DATA / "pairs.jsonl", {p.id: p for p in load_problems(DATA / "problems.jsonl")})[:1]
    let_go, seen = threading.Event(), []  # per pass (its final norm), whether the other thread had let go by then
    hook = model.base_model.norm.register_forward_pre_hook(lambda *_: seen.append(let_go.is_set()))

    def while_held(work) -> list[bool]:
        held = threading.Event()

        def hold():
            with compiled_code:
                held.set()
                time.sleep(1.0)  # the work, started meanwhile, would reach the norm in milliseconds
                let_go.set()

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait()
        seen.clear()
        before = compiled_code.waited().get(threading.current_thread().name, 0.0)
        work()
        holder.join()
        let_go.clear()
        assert compiled_code.waited()[threading.current_thread().name] - before > 0.5  # the wait is counted, to this thread
        return list(seen)

    try:
        learner = while_held(lambda: backward_parts(model, adapters, batch, cfg, 6.0 * 7, Checkpointing("never", len(decoder_layers(model)))))
        assert len(learner) >= 4 and all(learner)  # the reference's no-grad passes and the policy's, each waited
        assert all(while_held(lambda: pair_gradients(model, adapters, tokenizer, pairs, 1.0)))  # hack and clean
        prompt = render_prompt(tokenizer, batch[0].problem, "run_tests")
        assert while_held(lambda: RolloutEngine(model, tokenizer).generate([prompt], Sampling(max_new_tokens=2), n=1))[0]  # its prefill (then CPU decode)
    finally:  # the model is the module's: leave it as found
        hook.remove()
        for a in adapters.values():
            a.delta_S.grad = None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch's varlen flash kernel runs there only")
def test_varlen_kernel_equals_one_sdpa_per_sequence():
    if packing.VARLEN is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    _, _, spans = packing.pack([[1] * n for n in (9, 4, 13)], "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, 26, 64, generator=gen, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2))
    flash = packing.attend(q, k, v, spans, None)  # bf16 on CUDA: the varlen kernel
    loop = packing.attend(*(x.detach().float().requires_grad_() for x in (q, k, v)), spans, None)  # fp32: one SDPA per sequence
    torch.testing.assert_close(flash.float(), loop, rtol=2e-2, atol=2e-2)
    flash.float().square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_a_second_base_leaves_a_loaded_models_attention_alone(tiny, monkeypatch):
    """Attention names are looked up process-wide: registering packed rows over another base (a
    second load_model, e.g. a bf16 teacher on flash_attention_2 beside an fp32 policy on sdpa;
    flex_attention stands in on CPU) must leave the first model on its own masks and attention."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    model, _, _ = tiny
    name = model.config._attn_implementation
    assert packing.register("sdpa") == name  # idempotent: the same name for the same base
    assert packing.register("flex_attention") != name
    assert ALL_MASK_ATTENTION_FUNCTIONS[name] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    calls = []
    for base in ("sdpa", "flex_attention"):
        real = ALL_ATTENTION_FUNCTIONS[base]
        monkeypatch.setitem(AttentionInterface._global_mapping, base, lambda *a, real=real, base=base, **k: calls.append(base) or real(*a, **k))
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])  # left padding: a real mask
    with torch.no_grad():
        model(input_ids=ids, attention_mask=(ids != 0).long())
    assert calls == ["sdpa"] * model.config.num_hidden_layers
