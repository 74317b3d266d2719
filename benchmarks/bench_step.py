"""What each part of a GRPO step costs, with ratios against baselines measured in the same run.

On CUDA: the Qwen3-4B architecture with random weights (`random-qwen3-4b`, built on first
use; no hub access needed), bf16. On CPU: tiny-random-qwen3, fp32. Generation lengths are
forced (no EOS), so random weights cost what real ones would.

    uv run python benchmarks/bench_step.py               # what `just bench` runs
    uv run python benchmarks/bench_step.py --model tiny-random-qwen3 --new-tokens 32

Reported:
- SVD wrap, cold (fresh cache: SVD + save) vs warm (cache hit: load + reconstruction check).
- Generation tok/s: the plain model (baseline) vs the adapter merged into the weights (what
  rollouts use) vs the adapter's hooked path (U diag(delta_S) Vh as extra matmuls) vs merged
  with a static KV cache and compiled decode step (`static_cache_bucket`; its first call,
  the compile, is reported apart).
- Learner: forward+backward of the per-token log-probs on delta_S, tok/s and peak memory.
- Projection: one Projector call over every module vs one learner micro-batch (the ratio
  is the projection's share of a step's learner time, an upper bound).
- Extraction: seconds per contrastive pair.
"""

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import tyro

from extract import load_pairs, pair_gradients
from grader import load_problems
from projection import Projector
from models import REPO_ROOT, completion_logprobs, load_model, pick_device
from svd_adapter import DEFAULT_TARGETS, merged, wrap_svd


@dataclass
class Args:
    model: str | None = None
    """Model to time; default random-qwen3-4b on CUDA, tiny-random-qwen3 on CPU."""
    batch: int = 64
    """Sequences per generate call."""
    prompt_tokens: int = 256
    """Prompt length for generation."""
    new_tokens: int = 128
    """Forced number of generated tokens."""
    learner_batch: int = 8
    """Sequences per learner micro-batch."""
    learner_tokens: int = 768
    """Sequence length of a learner micro-batch."""
    pairs: int = 4
    """Contrastive pairs to time extraction on."""


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 1) -> float:
    """Mean seconds of fn() over `repeat` calls after one warm-up call."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t) / repeat


def main(args: Args) -> None:
    device = pick_device("auto")
    name = args.model or ("random-qwen3-4b" if device == "cuda" else "tiny-random-qwen3")
    model, tokenizer, dtype = load_model(name, device)
    print(f"# bench_step: {name}, {dtype}, {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1000, 100000, (args.batch, args.prompt_tokens), generator=gen).to(device)

    def generate(cache_implementation: str | None = None) -> None:
        model.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=0.7, top_p=0.95, top_k=0,
            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id,
            cache_implementation=cache_implementation,
        )

    gen_tokens = args.batch * args.new_tokens
    plain = gen_tokens / timed(generate)

    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        adapters = wrap_svd(model, DEFAULT_TARGETS, Path(cache))
        sync()
        cold = time.perf_counter() - t
        for module_name, a in adapters.items():  # unwrap to time a second, warm wrap of the same weights
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, a.base)
        t = time.perf_counter()
        adapters = wrap_svd(model, DEFAULT_TARGETS, Path(cache))
        sync()
        warm = time.perf_counter() - t
    print(f"svd wrap ({len(adapters)} Linears): cold {cold:.1f} s, warm (cache hit) {warm:.1f} s, cold/warm {cold / warm:.1f}x")

    for a in adapters.values():
        torch.nn.init.normal_(a.delta_S, std=1e-3)
    with merged(adapters):
        merged_tps = gen_tokens / timed(generate)
        t = time.perf_counter()
        static_tps = gen_tokens / timed(lambda: generate("static"))  # the warm-up call compiles
        static_first = time.perf_counter() - t - gen_tokens / static_tps
    hooked_tps = gen_tokens / timed(generate)
    print(f"generate {args.batch} x {args.new_tokens} new tokens (prompt {args.prompt_tokens}): plain {plain:,.0f} tok/s, "
          f"merged {merged_tps:,.0f} tok/s ({merged_tps / plain:.2f}x plain), hooked {hooked_tps:,.0f} tok/s ({hooked_tps / plain:.2f}x plain), "
          f"merged + static cache {static_tps:,.0f} tok/s ({static_tps / plain:.2f}x plain; first call {static_first:.0f} s)")

    if device == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.cuda.reset_peak_memory_stats()
    model.train()
    ids = torch.randint(1000, 100000, (args.learner_batch, args.learner_tokens), generator=gen).to(device)
    completion_mask = torch.zeros(ids[:, 1:].shape, dtype=torch.bool, device=device)
    completion_mask[:, args.prompt_tokens - 1 :] = True  # the learner scores completion tokens only

    def learner() -> None:
        logp = completion_logprobs(model, ids, torch.ones_like(ids), completion_mask)
        logp.mean().backward()

    learner_s = timed(learner, repeat=3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    print(f"learner fwd+bwd {args.learner_batch} x {args.learner_tokens}: {args.learner_batch * args.learner_tokens / learner_s:,.0f} tok/s, peak {peak:.1f} GiB")

    ranks = {n: a.rank for n, a in adapters.items()}
    v_hack = {n: torch.linalg.qr(torch.randn(r, 4, device=device))[0].T.contiguous() for n, r in ranks.items()}
    projector = Projector(v_hack, ranks, "one_sided", apply=True)
    grads = {n: a.delta_S.grad for n, a in adapters.items()}
    proj_s = timed(lambda: projector(grads), repeat=10)
    print(f"projection over {len(ranks)} modules ({sum(ranks.values()):,} delta_S entries, k=4): {proj_s * 1e3:.2f} ms = {proj_s / learner_s:.2%} of one learner micro-batch")

    problems = {p.id: p for p in load_problems(REPO_ROOT / "data" / "problems.jsonl")}
    pairs = load_pairs(REPO_ROOT / "data" / "pairs.jsonl", problems)[: args.pairs]
    model.eval()
    t = time.perf_counter()
    pair_gradients(model, adapters, tokenizer, pairs)
    sync()
    print(f"extraction: {(time.perf_counter() - t) / len(pairs):.2f} s per pair ({len(pairs)} pairs)")


if __name__ == "__main__":
    main(tyro.cli(Args))
