"""What each part of a GRPO step costs, as ratios against baselines measured in the same run.

On CUDA: the Qwen3-4B architecture with random weights (`random-qwen3-4b`, built on first
use; no hub access needed), bf16. On CPU (CI): tiny-random-qwen3, fp32, small shapes.

    uv run python benchmarks/bench_step.py               # what `just bench` runs
    uv run python benchmarks/bench_step.py --batches 128 --new-tokens 256

Reported (table on stdout, everything in out/bench/bench.json):
- Memory bandwidth of this device (a large device-to-device copy), the yardstick of decoding.
- Decode, per batch size, lengths forced (EOS switched off), 0.7 / 0.95 sampling: plain HF
  `generate` first (the baseline), then the rollout engine (projected_grpo/rollout.py, with delta_S merged:
  the path training takes; its first call, which compiles and captures, is reported apart);
  the ratio; the bound B / ((weights + mean KV cache bytes) / bandwidth) and the fraction of
  it reached; each batch's last call by part (prefill, the making of graphs, decode steps).
- Decode at the largest batch with the engine's fused Q/K/V and gate/up projections (its
  default) against one matmul per projection (`fuse=False`), timed back to back: tok/s of
  each and the ratio.
- Decode at the largest batch with flex attention (each slot reads its own KV blocks) against
  SDPA (every slot reads the whole window), timed back to back on prompts of ragged lengths,
  uniform in 32..2 x prompt tokens (with equal lengths the two would tie): tok/s of each and
  the ratio. Flex needs the compiled step on CUDA (with --no-compile it falls back to SDPA).
- SVD wrap, cold (fresh cache: SVD + save) with the misses solved in stacks, beside cold with one
  SVD per weight (the yardstick), and warm (cache hit: load + reconstruction check).
- Learner, on one batch of rollouts with realistic lengths (reference forward included): the
  padded adapter path it replaced (the baseline, `padded_backward`: right-padded micro-batches
  of 8 sorted by length, the adapter's three matmuls per Linear) against train.backward_parts
  (packed rows, merged weights, decoder layers compiled on CUDA as a run's are); tok/s of each,
  the ratio, peak memory, and the largest relative difference between their delta_S gradients,
  beside the same difference between the padded path and itself in micro-batches of 4 (the
  dtype's rounding floor). Beside it, its yardsticks: the same learner with its layers
  uncompiled (eager), and with the preset's micro-batch cap kept (recomputing). Then where one
  pass of the packed learner spends its time (profiled): kernels by kind against the timed wall
  time, and its matmuls' TFLOP/s against one large matmul's in the same run.
- Where a decode step's device time goes (CUDA): one step at the largest batch, the engine's
  compiled layers run eagerly under the profiler, kernels grouped into matmuls, attention and
  the rest, against the step time the graphed engine reached.
- Extraction: seconds per contrastive pair.
- A step of PRESET through train.step itself, on the bundled problems (real prompts) with
  realistic lengths (random-qwen3-4b ends on a random set of token ids, projected_grpo/models.py, so lengths
  spread geometrically around ~600 tokens): seconds per phase as the step's Timers measure
  them (gen, grade, learn, allreduce, arm, update, refresh), how full its generation kept the
  KV slots (decode steps, mean live slots: the drained tail shows there) and where its time went
  (prefills, the making of graphs, decode steps by decoded slots and KV window), its peak memory and
  the memory the parts before it still held; the first step (compiles and graph captures) apart, with the
  compile cache's state before it. Every group holds teacher rollouts (the preset's mix, else
  0.25, as issue 21's measured step): random weights neither pass nor hack, so without them
  every group is dead and the learner has nothing to do. Then that step's generation again
  with flex attention (each slot reads its own KV blocks, where SDPA reads the longest live
  sequence's window): the step's decode steps at flex's ms per step against their own
  seconds, shape by shape.
- Last, issue 21's targets for one H200 (TARGETS), each measured value beside its yardstick
  and whether it met the target (judged on CUDA only: on CPU the table shows the numbers).

A lent GPU whose calls are shorter than the whole run: `--step-preset ''` measures the model's
parts, then `--resume` in a later call on the same card measures the step into the same
bench.json (docs/results/step-h200/driver/run.sh does this); a model's part a call measured
before it was cut short is kept too, and the next call measures the rest.
"""

import gc
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import tyro
from torch.autograd import DeviceType

from extract import load_pairs, pair_gradients
from grader import Grader, load_problems
from projected_grpo import packing
from projected_grpo.activations import Checkpointing, checkpoint_first, decoder_layers, enable_checkpointing
from projected_grpo.errors import UserError, reported
from projected_grpo.models import completion_logprobs, load_model, pick_device
from projected_grpo.paths import DATA, REPO_ROOT
from projected_grpo.rollout import DRAW_ROUNDS, KV_WINDOW, RECOMPILE_LIMIT, CallStats, RolloutEngine, Sampling, draw, kv_window
from projected_grpo.svd_adapter import DEFAULT_TARGETS, SVD_BATCH_ELEMENTS, merged, reference_mode, split_svds, svd_batches, unwrap_svd, weight_key, wrap_svd
from train import PRESETS, Config, Rollout, RunState, backward_parts, compile_cache_dir, compile_learner, grpo_loss, learner_checkpointing, sample, step


@dataclass
class Args:
    model: str | None = None
    """Model to time; default random-qwen3-4b on CUDA, tiny-random-qwen3 on CPU."""
    batches: tuple[int, ...] | None = None
    """Decode batch sizes; default 64 128 on CUDA, 4 8 on CPU."""
    prompt_tokens: int | None = None
    """Prompt length for decoding; default 256 on CUDA, 32 on CPU."""
    new_tokens: int | None = None
    """Forced new tokens per sequence; default 512 on CUDA, 16 on CPU."""
    learner_rollouts: int | None = None
    """Rollouts the learner rows time (prompt + completion lengths as `full`'s); default 64 on CUDA, 6 on CPU."""
    step_preset: str | None = None
    """Preset whose step is timed with realistic lengths; default full on CUDA, smoke on CPU; '' skips."""
    model_parts: bool = True
    """Time the model's parts (bandwidth, plain generate, SVD wrap, decode rows and profile, learner,
    extraction); --no-model-parts times the step alone (a device call too short for both)."""
    pairs: int = 4
    """Contrastive pairs to time extraction on."""
    compile: bool = True
    """torch.compile the engine's decode step (CUDA)."""
    out: Path = REPO_ROOT / "out" / "bench"
    """Folder of bench.json."""
    resume: bool = False
    """Keep the parts OUT/bench.json already holds from a run on this device with these sizes (a
    run cut short, or one split over calls shorter than the whole); measure the rest."""


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def failure(e: Exception) -> str:
    """A part's error as bench.json and the table report it: its type and the start of its message."""
    return f"{type(e).__name__}: {str(e)[:300]}"


def timed(fn, repeat: int = 1, warmup: int = 1) -> float:
    """Mean seconds of fn() over `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t) / repeat


def bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (each byte read once and written once)."""
    n = 2**31 if device == "cuda" else 2**27
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), repeat=10 if device == "cuda" else 2)
    del x, y
    return 2 * n / seconds


def released(cuda: bool) -> None:
    """What a finished part held, given back before the next: its objects, the compiled code that
    guards on them (it may hold the engines and their weights) and, on CUDA, the allocator's
    cached blocks. On an 80 GiB card the step ran out of memory with 78 GiB still allocated by the
    parts before it (2026-12-06)."""
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


SAMPLING = dict(temperature=0.7, top_p=0.95)  # every decode row's; its temperature is the extraction's, as in train.py


def plain_generate_tok_s(model, tokenizer, prompts: dict[int, torch.Tensor], new_tokens: int) -> dict[int, float]:
    """The baseline, per batch size: plain HF generate's tok/s (warmed up on 4 tokens)."""
    def generate(ids: torch.Tensor, n: int) -> None:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, **SAMPLING,
                       max_new_tokens=n, min_new_tokens=n, pad_token_id=tokenizer.pad_token_id)

    plain = {}
    for b, ids in prompts.items():
        generate(ids, 4)
        plain[b] = b * new_tokens / timed(lambda: generate(ids, new_tokens), warmup=0)
        print(f"plain generate B={b}: {plain[b]:,.0f} tok/s")  # the baseline, in the log before any later part can fail
    return plain


def svd_wrap_times(model, cache: Path) -> tuple[dict, dict]:
    """Wrap cold (an empty cache) with the misses solved in stacks (the default), then cold with one
    SVD per weight (the yardstick, its cache deleted after), then warm (the first cache hit): the
    last wrap's adapters, and the three times."""
    def wrap(cache_dir: Path, batch_elements: int = SVD_BATCH_ELEMENTS) -> tuple[dict, float]:
        t = time.perf_counter()
        adapters = wrap_svd(model, DEFAULT_TARGETS, cache_dir, batch_elements)
        sync()
        return adapters, time.perf_counter() - t

    adapters, cold = wrap(cache)
    unwrap_svd(model, adapters)
    per_weight_cache = cache.with_name("svd_per_weight")
    adapters, per_weight = wrap(per_weight_cache, batch_elements=0)
    unwrap_svd(model, adapters)
    shutil.rmtree(per_weight_cache)  # ~10 GB for Qwen3-4B
    del adapters
    adapters, warm = wrap(cache)
    print(f"svd wrap ({len(adapters)} Linears): cold {cold:.1f} s in stacks, {per_weight:.1f} s one SVD per weight; warm (cache hit) {warm:.1f} s")
    parts = svd_cold_parts([a.base.weight for a in adapters.values()], cache)
    print(f"  its cold wrap's parts: cache keys {parts['keys_s']:.1f} s, SVDs in stacks {parts['svds_s']:.1f} s, the rest "
          f"(U, S, Vh to the host, writing the {parts['cache_gib']:.1f} GiB cache, building the adapters) {cold - parts['keys_s'] - parts['svds_s']:.1f} s")
    return adapters, {"modules": len(adapters), "cold_s": cold, "cold_per_weight_s": per_weight, "warm_s": warm} | parts


def svd_cold_parts(weights: list[torch.Tensor], cache: Path) -> dict:
    """Where a cold wrap's time goes: its two computations timed alone on the same weights (every
    weight's cache key; the SVDs in the wrap's stacks, results dropped), and the size of the cache
    it wrote. A cold wrap's time less the two is what the host copies and cache writes cost."""
    t = time.perf_counter()
    for W in weights:
        weight_key(W)
    sync()
    keys = time.perf_counter() - t
    t = time.perf_counter()
    for batch in svd_batches(weights):
        split_svds(torch.stack([weights[i] for i in batch]))
    sync()
    svds = time.perf_counter() - t
    return {"keys_s": keys, "svds_s": svds, "cache_gib": sum(f.stat().st_size for f in cache.glob("*.safetensors")) / 2**30}


def engine_tok_s(engine: RolloutEngine, ids: list[list[int]], new_tokens: int, compile: bool, cuda: bool) -> tuple[float, float]:
    """tok/s of the engine's calls on these prompts (one batch), and the seconds of its first call (compiles and captures: untimed)."""
    b = len(ids)
    run = lambda: engine.generate_ids(ids, Sampling(max_new_tokens=new_tokens, batch=b, compile=compile, **SAMPLING))  # noqa: E731
    t = time.perf_counter()
    run()
    sync()
    first = time.perf_counter() - t
    return b * new_tokens / timed(run, repeat=2 if cuda else 1, warmup=0), first


def decode_rows(model, tokenizer, prompts: dict[int, torch.Tensor], plain: dict[int, float], bound, new_tokens: int, compile: bool, cuda: bool) -> dict:
    """The engine against plain generate per batch size (`bound`: the roofline tok/s of a batch),
    then at the largest batch: fused against unfused projections, flex against SDPA attention on
    ragged prompts, and the kernel profile of one decode step. Forced lengths (no EOS), as
    min_new_tokens does for generate."""
    prompt_tokens = next(iter(prompts.values())).shape[1]

    def built(**kw) -> RolloutEngine:  # the default engine lives through the part, each other one row: a fused engine holds a copy of the projections
        e = RolloutEngine(model, tokenizer, **kw)
        e.eos = []
        return e

    engine = built()
    rows = []
    print(f"\ndecode, {prompt_tokens}-token prompts, {new_tokens} new (tok/s of the whole call, prefill included)")
    print(f"{'B':>5} {'generate':>10} {'engine':>10} {'ratio':>7} {'bound':>10} {'of bound':>9} {'1st call s':>11}")
    for b, ids in prompts.items():
        tps, first = engine_tok_s(engine, ids.tolist(), new_tokens, compile, cuda)
        rows.append({"batch": b, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "generate_tok_s": plain[b], "engine_tok_s": tps,
                     "ratio": tps / plain[b], "bound_tok_s": bound(b), "fraction_of_bound": tps / bound(b), "engine_first_call_s": first,
                     "last_call_s": engine.last_call.seconds})
        print(f"{b:>5} {plain[b]:>10,.0f} {tps:>10,.0f} {tps / plain[b]:>6.2f}x {bound(b):>10,.0f} {tps / bound(b):>9.1%} {first:>11.1f}")
    b = max(prompts)
    call = engine.last_call  # the largest batch's last timed call: what its tok/s spent besides decode steps
    print(f"B={b}'s last call: " + ", ".join(f"{part} {s:.2f} s" for part, s in call.seconds.items())
          + f"; {1e3 * call.seconds['decode'] / call.decode_steps:.2f} ms per decode step")
    report = {"decode": rows}
    fused_tps, unfused_tps = (engine_tok_s(e, prompts[b].tolist(), new_tokens, compile, cuda)[0] for e in (engine, built(fuse=False)))
    report["decode_fused"] = {"batch": b, "fused_tok_s": fused_tps, "unfused_tok_s": unfused_tps, "ratio": fused_tps / unfused_tps}
    print(f"decode B={b} fused vs unfused (one matmul for Q, K, V and one for gate, up vs one per projection): "
          f"{fused_tps:,.0f} vs {unfused_tps:,.0f} tok/s, {fused_tps / unfused_tps:.2f}x")
    # Ragged prompts (own generator: the rows after this one draw what they did before it):
    # with equal lengths every slot's blocks fill the window and flex ties with SDPA.
    ragged = torch.Generator().manual_seed(1)
    ids = [torch.randint(1000, 100000, (int(n),), generator=ragged).tolist() for n in torch.randint(32, 2 * prompt_tokens + 1, (b,), generator=ragged)]
    try:  # flex decode has not run on this torch's CUDA before: a failure is reported, and the rows after it still run
        flex_tps, sdpa_tps = (engine_tok_s(e, ids, new_tokens, compile, cuda)[0] for e in (built(attention="flex"), engine))
        report["decode_attention"] = {"batch": b, "prompt_tokens": [32, 2 * prompt_tokens], "flex_tok_s": flex_tps, "sdpa_tok_s": sdpa_tps, "ratio": flex_tps / sdpa_tps}
        print(f"decode B={b} flex (live KV blocks) vs sdpa (whole window), prompts of 32..{2 * prompt_tokens} tokens: "
              f"{flex_tps:,.0f} vs {sdpa_tps:,.0f} tok/s, {flex_tps / sdpa_tps:.2f}x")
    except Exception as e:
        report["decode_attention"] = {"batch": b, "error": failure(e)}
        print(f"decode B={b} flex vs sdpa: flex failed, {report['decode_attention']['error']}")
    window = kv_window(prompt_tokens + new_tokens // 2)  # the mean window of the timed calls
    report["decode_profile"] = decode_profile(engine, b, window, SAMPLING, 1e3 * b / rows[-1]["engine_tok_s"])
    return report


def extraction_s_per_pair(model, adapters, tokenizer, n_pairs: int) -> float:
    """Seconds per pair of v_hack's one pass over the model (the first pairs of data/pairs.jsonl)."""
    problems = {p.id: p for p in load_problems(DATA / "problems.jsonl")}
    pairs = load_pairs(DATA / "pairs.jsonl", problems)[:n_pairs]
    t = time.perf_counter()
    pair_gradients(model, adapters, tokenizer, pairs, SAMPLING["temperature"])
    sync()
    seconds = (time.perf_counter() - t) / len(pairs)
    print(f"extraction: {seconds:.2f} s per pair ({len(pairs)} pairs)")
    return seconds


def main(args: Args) -> dict:
    """Every part in order, into ARGS.out/bench.json. The file is written however the run ends (a
    part that fails, a SIGTERM from `timeout`): a run cut short keeps the parts it measured, and
    only a finished run has "targets"."""
    device = pick_device("auto")
    step_preset = ("full" if device == "cuda" else "smoke") if args.step_preset is None else args.step_preset
    if step_preset and step_preset not in PRESETS:
        raise UserError(f"--step-preset {step_preset} is not a preset", f"give one of {', '.join(PRESETS)}, or '' to skip the step")
    header = run_header(args, device)
    report: dict = resumed(args.out / "bench.json", header, step_preset) if args.resume else {}
    report["header"] = header
    work = Path(tempfile.mkdtemp(prefix="bench_step-"))  # the SVD cache (the step's run hits it), the step's run folder
    try:
        measure(args, device, step_preset, work, report)
    finally:
        # The report first: removing the scratch folder (a 4B model's SVD caches) takes seconds, in
        # which a `timeout` stop (an H100, 2026-12-06) ended the run before its file was written.
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(report | {"args": {k: str(v) for k, v in asdict(args).items()}}, indent=2))
        print(f"wrote {args.out / 'bench.json'}" + ("" if "targets" in report else " (cut short: the parts measured before it stopped)"))
        shutil.rmtree(work, ignore_errors=True)  # never in place of the error that ended the run
    return report


def run_header(args: Args, device: str) -> dict:
    """What the numbers depend on besides the code: the device, the versions, the model and the
    sizes (ARGS' defaults resolved for this device). A resumed run keeps parts only under the same header."""
    cuda = device == "cuda"
    return {"model": args.model or ("random-qwen3-4b" if cuda else "tiny-random-qwen3"),
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "batches": list(args.batches or ((64, 128) if cuda else (4, 8))), "prompt_tokens": args.prompt_tokens or (256 if cuda else 32),
            "new_tokens": args.new_tokens or (512 if cuda else 16), "learner_rollouts": args.learner_rollouts or (64 if cuda else 6),
            "pairs": args.pairs, "compile": args.compile}


# The parts measured on the model loaded here, then the step, which loads its own. A resumed run
# keeps each that is there and measures the others (decode's rows, which read the bandwidth, and
# the bandwidth only together).
MODEL_PARTS = ("dtype", "bandwidth_gbs", "svd_wrap", "decode", "decode_fused", "decode_attention", "decode_profile", "learner", "extraction_s_per_pair")
DECODE_PARTS = ("bandwidth_gbs", "decode", "decode_fused", "decode_attention", "decode_profile")
# The step's generation again, otherwise made: kept with the step they were measured beside.
STEP_VARIANTS = ("generation_slots", "generation_flex")


def resumed(path: Path, header: dict, step_preset: str) -> dict:
    """The parts of the bench.json at `path` that a run under `header` may keep: each of the model's
    parts measured (DECODE_PARTS only all together), the step if it was `step_preset`'s as
    step_config runs it now. Nothing there: an empty report. Another header: a UserError."""
    if not path.exists():
        print(f"--resume: no {path} yet; measuring every part")
        return {}
    earlier = json.loads(path.read_text())
    theirs = earlier.get("header", {})
    differ = [k for k in header if theirs.get(k) != header[k]]
    if differ:
        was = ", ".join(f"{k}={theirs.get(k)}" for k in differ)
        raise UserError(f"--resume: {path} was measured with another {', '.join(differ)} ({was})",
                        "give --out a new folder, or drop --resume to measure every part again")
    parts = [k for k in MODEL_PARTS if k not in DECODE_PARTS] + (list(DECODE_PARTS) if all(k in earlier for k in DECODE_PARTS) else [])
    kept = {k: earlier[k] for k in parts if k in earlier}
    step = earlier.get("step", {})
    if step_preset and (step.get("preset"), step.get("teacher_mix")) == (step_preset, step_teacher_mix(step_preset)):
        kept["step"] = step
        kept |= {k: earlier[k] for k in STEP_VARIANTS if k in earlier}
    print(f"--resume: kept {', '.join(kept) or 'nothing'} from {path}")
    return kept


def measure(args: Args, device: str, step_preset: str, work: Path, report: dict) -> None:
    """main's parts on `device` (scratch files in `work`) that `report` lacks, each adding its rows as it finishes."""
    cuda, h = device == "cuda", report["header"]
    print(f"# bench_step: {h['model']}, {h['device']}, torch {h['torch']}, transformers {h['transformers']}")
    if args.model_parts and not all(k in report for k in MODEL_PARTS):
        model_parts(h, device, work, report)
    if step_preset and "step" not in report:
        released(cuda)  # what the model's parts held: the step's run loads its own copy of the weights
        realistic_step(step_preset, h["model"], device, h["compile"], work, report)
    report["targets"] = targets(report, cuda)


def model_parts(h: dict, device: str, work: Path, report: dict) -> None:
    """The model's parts `report` lacks, on the model `h` names with `h`'s sizes: bandwidth and
    plain generate, the SVD wrap (its cache in `work`, where the step's run hits it), the decode
    rows and profile, extraction, the learner rows."""
    cuda = device == "cuda"
    model, tokenizer, dtype = load_model(h["model"], device)
    report["dtype"] = str(dtype)
    gen = torch.Generator().manual_seed(0)  # drawn from in every run, so the learner's rollouts are the same whatever was kept
    prompts = {b: torch.randint(1000, 100000, (b, h["prompt_tokens"]), generator=gen).to(device) for b in h["batches"]}
    decode = not all(k in report for k in DECODE_PARTS)
    if decode:
        bound = decode_bound(model, dtype, h, device, report)
        plain = plain_generate_tok_s(model, tokenizer, prompts, h["new_tokens"])  # the baseline first, in this process, before any wrap
    if "svd_wrap" in report:
        adapters = wrap_svd(model, DEFAULT_TARGETS, work / "cache" / "svd")
    else:
        adapters, report["svd_wrap"] = svd_wrap_times(model, work / "cache" / "svd")
    for a in adapters.values():
        torch.nn.init.normal_(a.delta_S, std=1e-3)
    if decode:
        with merged(adapters):
            report |= decode_rows(model, tokenizer, prompts, plain, bound, h["new_tokens"], h["compile"], cuda)
        released(cuda)
    model.eval()
    if "extraction_s_per_pair" not in report:  # before the learner rows, which leave the layers compiled
        report["extraction_s_per_pair"] = extraction_s_per_pair(model, adapters, tokenizer, h["pairs"])
    if "learner" not in report:
        report["learner"] = learner_rows(model, adapters, h["learner_rollouts"], cuda, gen)


def decode_bound(model, dtype: torch.dtype, h: dict, device: str, report: dict) -> Callable[[int], float]:
    """The roofline of a decode batch of b (tok/s), at the bandwidth measured now (into `report`):
    every step reads the weights and the batch's mean KV cache once."""
    config, bw = model.config, bandwidth(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize
    report["bandwidth_gbs"] = bw / 1e9
    print(f"memory bandwidth {bw / 1e9:,.0f} GB/s (device copy); weights {weight_bytes / 1e9:.2f} GB; KV {kv_bytes_per_token / 1024:.1f} KiB per token")
    mean_kv = h["prompt_tokens"] + (h["new_tokens"] - 1) / 2
    return lambda b: b / ((weight_bytes + b * mean_kv * kv_bytes_per_token) / bw)


# Issue 21's targets for one H200: (row, value from the report, yardstick beside it, bound, "<=" or ">=").
TARGETS = (
    ("step, steady (s)", lambda r: r["step"]["step_s"], lambda r: f"first step {r['step']['first_step_s']:.1f} s", 30.0, "<="),
    ("first step - steady (s)", lambda r: r["step"]["first_step_s"] - r["step"]["step_s"],
     lambda r: f"compile cache {'warm' if r['step']['compile_cache_files_before'] else 'cold'} ({r['step']['compile_cache_files_before']} files)"
     + graphs_made(r["step"]), 15.0, "<="),
    ("learner tok/s, reference included", lambda r: r["learner"]["packed_tok_s"], lambda r: f"eager {r['learner']['eager_tok_s']:,.0f}; padded adapter path {r['learner']['padded_tok_s']:,.0f}", 12000.0, ">="),
    ("decode at the largest batch, fraction of bound", lambda r: r["decode"][-1]["fraction_of_bound"],
     lambda r: f"B={r['decode'][-1]['batch']}: {r['decode'][-1]['engine_tok_s']:,.0f} of {r['decode'][-1]['bound_tok_s']:,.0f} tok/s", 0.60, ">="),
    ("SVD wrap, cold (s)", lambda r: r["svd_wrap"]["cold_s"], lambda r: f"{r['svd_wrap']['modules']} Linears; one SVD per weight {r['svd_wrap']['cold_per_weight_s']:.1f} s", 8.0, "<="),
    ("SVD wrap, warm (s)", lambda r: r["svd_wrap"]["warm_s"], lambda r: "cache hit", 3.0, "<="),
    ("step's peak memory (GiB)", lambda r: r["step"]["peak_gib"], lambda r: "", 80.0, "<="),
)


def graphs_made(step: dict) -> str:
    """The first and the steady step's seconds making CUDA graphs (where the first step's compiles
    happen), for a report that has both calls (earlier ones lack the first)."""
    if "first_generation_call" not in step:
        return ""
    return f"; graphs made: first step {step['first_generation_call']['graph_seconds']:.1f} s, steady {step['generation_call']['graph_seconds']:.1f} s"


def targets(report: dict, cuda: bool) -> list[dict]:
    """TARGETS' rows of this report (a row whose part did not run is left out), printed as a
    table; `met` is None off CUDA, where the bounds mean nothing."""
    rows = []
    for name, value, yardstick, bound, op in TARGETS:
        try:
            v = value(report)
        except KeyError:  # that part was skipped (--step-preset '')
            continue
        try:
            beside = yardstick(report)
        except KeyError:  # a part resumed from a report of older code, which did not measure it
            beside = "(its yardstick is not in this report)"
        if v is None:  # no number here (the step's peak memory on CPU)
            continue
        met = None if not cuda or v != v else (v <= bound if op == "<=" else v >= bound)
        rows.append({"row": name, "value": v, "yardstick": beside, "target": f"{op} {bound:g}", "met": met})
    print("\nissue 21's targets (one H200):")
    for r in rows:
        print(f"  {r['row']:<48} {r['value']:>12,.2f}  {r['target']:>9}  {'-' if r['met'] is None else 'met' if r['met'] else 'NOT met'}  {r['yardstick']}")
    return rows


def padded_backward(model, adapters, rollouts: list[Rollout], cfg, denominator: float, batch: int = 8) -> float:
    """The learner before packing (the baseline): rollouts sorted by length in right-padded
    micro-batches of `batch` with an attention mask, the reference forward per micro-batch,
    the adapter's own path y = W x + U ((Vh x) * delta_S) (unmerged); grpo_loss's constant or
    sequence_mean weights. Accumulates delta_S's gradient; returns the loss (read once per
    micro-batch, as that learner did)."""
    total = 0.0
    rollouts = sorted(rollouts, key=lambda r: len(r.prompt_ids) + len(r.completion_ids))
    for i in range(0, len(rollouts), batch):
        part = rollouts[i : i + batch]
        T = max(len(r.prompt_ids) + len(r.completion_ids) for r in part)
        ids, attn = torch.zeros(len(part), T, dtype=torch.long), torch.zeros(len(part), T, dtype=torch.long)
        mask, old, adv = torch.zeros(len(part), T - 1, dtype=torch.bool), torch.full((len(part), T - 1), float("nan")), torch.zeros(len(part), T - 1)
        for j, r in enumerate(part):
            P, C = len(r.prompt_ids), len(r.completion_ids)
            ids[j, : P + C], attn[j, : P + C] = torch.tensor(r.prompt_ids + r.completion_ids), 1
            mask[j, P - 1 : P + C - 1], adv[j] = True, r.advantage
            if r.old_logprobs is not None:
                old[j, P - 1 : P + C - 1] = r.old_logprobs
        ids, attn, mask, old, adv = (x.to(cfg.device) for x in (ids, attn, mask, old, adv))
        ref = None
        if cfg.kl_beta > 0:
            with torch.no_grad(), reference_mode(adapters):
                ref = completion_logprobs(model, ids, attn, mask, cfg.sampling.temperature)
        logp = completion_logprobs(model, ids, attn, mask, cfg.sampling.temperature)
        weight = mask / mask.sum(dim=1, keepdim=True) if cfg.loss_norm == "sequence_mean" else mask.float()
        loss = grpo_loss(logp, old, ref, adv, weight, cfg, denominator)[0]
        loss.backward()
        total += loss.item()
    return total


def largest_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Over modules: the largest entry of |a - b| relative to b's largest entry."""
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in b)


def padded_floor(model, adapters: dict, rollouts: list[Rollout], cfg: Config, denominator: float, padded: dict[str, torch.Tensor]) -> float:
    """The learners' gradient yardstick: the padded path against its own gradients `padded` in
    micro-batches of 4 (the same sums, other padding and order), the rounding floor of the dtype
    that a learner's difference is read against. Run before the layers are compiled: after, it
    read 0.11, the compile's rounding beside the padding's (H100 2026-12-07)."""
    for a in adapters.values():
        a.delta_S.grad = None
    for _ in range(2):  # two passes, as timed() ran each path
        padded_backward(model, adapters, rollouts, cfg, denominator, batch=4)
    return largest_rel_diff({name: a.delta_S.grad for name, a in adapters.items()}, padded)


def learner_rows(model, adapters, n: int, cuda: bool, gen: torch.Generator) -> dict:
    """The padded baseline and train.backward_parts on the same n rollouts and delta_S: prompts of
    ~300 tokens, completions of exponential lengths with mean 600 cut at 1536 (full's spread; a
    tenth of that on CPU), advantages of both signs, KL on; tok/s (every token of every
    rollout), peak memory and the largest relative difference of their gradients. Also the
    packed learner eager, before its layers are compiled (CUDA; they stay compiled), and
    recomputing as the preset's cap asks, and without the reference pass (kl_beta 0: what the
    reference's no-grad forward and its KL cost), and the profile of one packed pass."""
    cfg = replace(PRESETS["full" if cuda else "smoke"][1], device=str(next(model.parameters()).device), kl_beta=1e-3)
    scale, problem = (1 if cuda else 0.05), load_problems(DATA / "problems_rl.jsonl")[0]
    lengths = (-600 * scale * torch.rand(n, generator=gen).log()).clamp(4, 1536 * scale).long().tolist()
    random_ids = lambda k: torch.randint(1000, 100000, (k,), generator=gen).tolist()  # noqa: E731
    rollouts = [Rollout(problem, random_ids(int(300 * scale)), random_ids(c), "", False, None, False) for c in lengths]
    for i, r in enumerate(rollouts):
        r.advantage = (-1.0) ** i
    for a in adapters.values():
        a.delta_S.data = 1e-3 * torch.randn(a.rank, generator=gen).to(a.delta_S.device)
    tokens, denominator = sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts), float(n * cfg.sampling.max_new_tokens)
    enable_checkpointing(model)
    # The baseline recomputes every layer on CUDA, as that learner did; the new one decides per
    # micro-batch as a run of the preset does (full: auto, measured on a probe here).
    baseline = Checkpointing("always" if cuda else "never", len(decoder_layers(model)))
    checkpointing = learner_checkpointing(model, adapters, cfg)
    # The yardstick for cutting micro-batches so they recompute nothing: the preset's cap kept, layers recomputed as memory needs.
    recomputing = replace(checkpointing, smallest=cfg.learner_tokens, said=set(), capped=set())
    out, grads = {"rollouts": n, "tokens": tokens}, {}

    def time_path(path: str, run) -> None:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        baseline.apply(model, 0)  # the packed paths set their own per micro-batch
        for a in adapters.values():
            a.delta_S.grad = None
        seconds = timed(run)  # one untimed pass first: each path's first kernels are picked (and its layers compiled) there
        grads[path] = {name: a.delta_S.grad.clone() for name, a in adapters.items()}  # of both passes, alike for every path
        out.update({f"{path}_tok_s": tokens / seconds, f"{path}_peak_gib": peak_gib()})

    packed = lambda c, cfg=cfg: lambda: backward_parts(model, adapters, rollouts, cfg, denominator, c)  # noqa: E731
    time_path("padded", lambda: padded_backward(model, adapters, rollouts, cfg, denominator))
    time_path("eager", packed(checkpointing))
    baseline.apply(model, 0)
    out["noise_rel_grad_diff"] = padded_floor(model, adapters, rollouts, cfg, denominator, grads["padded"])  # eager, as the padded row ran
    compile_learner(model, cfg)  # the paths below run as a run's learner does; the model's layers stay compiled
    time_path("recomputing", packed(recomputing))
    time_path("packed", packed(checkpointing))
    time_path("no_reference", packed(checkpointing, replace(cfg, kl_beta=0.0)))  # another loss: its gradient is not compared
    checkpoint_first(model, 0)
    # what it picks for each micro-batch's row with the memory free now (as free as during the pass: its graph is gone)
    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
    for path, c in (("recomputing", recomputing), ("packed", checkpointing)):
        rows = packing.plan(lengths, c.tokens_for(cfg.learner_tokens))
        out[f"{path}_checkpointed_layers"] = [c.layers_for(sum(lengths[i] for i in row)) for row in rows]
    out["ratio"] = out["packed_tok_s"] / out["padded_tok_s"]
    out["ratio_recomputing"] = out["packed_tok_s"] / out["recomputing_tok_s"]
    out["ratio_compiled"] = out["packed_tok_s"] / out["eager_tok_s"]
    out["reference_share"] = 1 - out["packed_tok_s"] / out["no_reference_tok_s"]  # of the learner's seconds
    out["compiled_rel_grad_diff"] = largest_rel_diff(grads["packed"], grads["eager"])
    out["max_rel_grad_diff"] = largest_rel_diff(grads["packed"], grads["padded"])
    out["recomputing_rel_grad_diff"] = largest_rel_diff(grads["recomputing"], grads["packed"])  # what is kept never changes what is computed
    out["profile"] = learner_profile(packed(checkpointing), tokens, tokens / out["packed_tok_s"], cuda)
    for a in adapters.values():
        a.delta_S.data.zero_()
        a.delta_S.grad = None
    print(f"\nlearner on {n} rollouts ({tokens:,} tokens, reference included): padded adapter path {out['padded_tok_s']:,.0f} tok/s "
          f"(peak {out['padded_peak_gib']:.1f} GiB), packed + merged {out['packed_tok_s']:,.0f} tok/s (peak {out['packed_peak_gib']:.1f} GiB): "
          f"{out['ratio']:.2f}x; largest relative delta_S gradient difference {out['max_rel_grad_diff']:.1e} "
          f"(padded against itself in micro-batches of 4: {out['noise_rel_grad_diff']:.1e}); "
          f"layers checkpointed per micro-batch: {out['packed_checkpointed_layers']} (baseline: {baseline.layers_for(0)} each)")
    print(f"  its micro-batches cut to recompute nothing (at least {checkpointing.smallest:,} tokens) vs the preset's cap of {cfg.learner_tokens:,} "
          f"kept, layers recomputed {out['recomputing_checkpointed_layers']}: {out['packed_tok_s']:,.0f} vs {out['recomputing_tok_s']:,.0f} tok/s "
          f"(peak {out['recomputing_peak_gib']:.1f} GiB), {out['ratio_recomputing']:.2f}x; largest relative gradient difference {out['recomputing_rel_grad_diff']:.1e}")
    print(f"  its decoder layers compiled ({'as a run on CUDA does' if cuda else 'not on CPU, as a run there'}) vs eager: {out['packed_tok_s']:,.0f} vs {out['eager_tok_s']:,.0f} tok/s "
          f"(peak {out['packed_peak_gib']:.1f} vs {out['eager_peak_gib']:.1f} GiB), {out['ratio_compiled']:.2f}x; largest relative gradient difference {out['compiled_rel_grad_diff']:.1e}")
    print(f"  without the reference pass (kl_beta 0): {out['no_reference_tok_s']:,.0f} tok/s; the reference's no-grad forward and its KL "
          f"are {out['reference_share']:.0%} of the learner's seconds")
    return out


# Kernel (CUDA) or op (CPU) names, by kind; the first kind that matches wins.
KERNEL_KINDS = {"attention": ("fmha", "flash", "attention", "sdpa"), "matmul": ("gemm", "nvjet", "xmma", "cutlass", "splitk", "aten::mm", "aten::addmm", "aten::bmm")}


def decode_profile(engine: RolloutEngine, b: int, window: int, sampling: dict, step_ms: float) -> dict:
    """Device time of one decode step (transformer + draw) at batch b and this KV window, by
    kernel: the engine's compiled layers run eagerly under the profiler (the graph replays the
    same kernels without the launch gaps), averaged over 5 steps after 2 warm-up steps. On
    CPU: self time by op."""
    from torch.profiler import ProfilerActivity, profile

    device = engine.lm_head.weight.device
    cuda = device.type == "cuda"
    dtype = engine.lm_head.weight.dtype
    k_cache = [torch.randn(b, engine.n_kv, window, engine.head_dim, dtype=dtype, device=device) for _ in engine.body.layers]
    v_cache = [torch.randn_like(k) for k in k_cache]
    tokens = torch.randint(1000, 100000, (b,), device=device)
    positions = torch.full((b,), window - KV_WINDOW // 2, device=device)
    weights = engine.layer_weights()

    def step() -> None:
        logits = engine.decode(tokens, positions, k_cache, v_cache, window, weights, compiled=cuda)  # the compiled layer, as the timed rows (Sampling.compile), without the graph
        draw(logits, sampling["temperature"], sampling["top_p"], DRAW_ROUNDS)

    steps = 5
    # The engine's own limit on the layer's compiles: by now the decode rows have compiled more
    # shapes than dynamo's default 8, past which it runs this window's layer uncompiled (the H100
    # profile of 2026-12-06 did: aten kernels for every norm and elementwise op).
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        for _ in range(2):
            step()
        sync()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
            sync()
    del k_cache, v_cache, weights
    out = {"batch": b, "window": window, "engine_step_ms": step_ms}
    kernels = kernel_table(prof, steps, cuda)
    if not kernels:  # the profiler recorded nothing (CUPTI did not initialize on an H100 image, 2026-12-06): no numbers, not zeros
        print(f"\ndecode step at B={b}: the profiler recorded no {'kernels' if cuda else 'ops'} here; no profile")
        return out | {"kernel_ms": None, "error": "the profiler recorded no events"}
    by_kind = kernels_by_kind(kernels)
    total = sum(by_kind.values())
    print(f"\ndecode step at B={b}, KV window {window}: {total:.2f} ms of kernels vs {step_ms:.2f} ms per step of the timed engine calls; "
          + ", ".join(f"{k} {ms:.2f} ms" for k, ms in by_kind.items()))
    print_kernels(kernels, "ms/step")
    return out | {"kernel_ms": total, "by_kind_ms": by_kind, "top_kernels": [{"name": n, "ms": ms, "calls_per_step": c} for n, ms, c in kernels[:25]]}


def kernel_table(prof, per: int, cuda: bool) -> list[tuple[str, float, int]]:
    """(name, ms, calls) per `per` repeats of what the profiler recorded: each CUDA kernel's device
    time (ops, recorded with them where FLOPs are wanted, left out, and the ranges that span
    kernels: a compiled graph's "## Call CompiledFxGraph" counted its kernels twice, H100
    2026-12-07), or on CPU each op's self time; the costliest first, none that took no time."""
    if cuda:
        rows = [(e.key, e.device_time_total, e.count) for e in prof.key_averages() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    return sorted(((name, us / 1e3 / per, count // per) for name, us, count in rows if us > 0), key=lambda k: -k[1])


def kernels_by_kind(kernels: list[tuple[str, float, int]]) -> dict[str, float]:
    """Milliseconds by KERNEL_KINDS (the first kind whose mark is in the name), the rest as "other"."""
    kind = lambda name: next((k for k, marks in KERNEL_KINDS.items() if any(m in name.lower() for m in marks)), "other")  # noqa: E731
    return {k: sum(ms for name, ms, _ in kernels if kind(name) == k) for k in (*KERNEL_KINDS, "other")}


def print_kernels(kernels: list[tuple[str, float, int]], unit: str) -> None:
    print(f"{unit:>8} {'calls':>6}  kernel")
    for name, ms, calls in kernels[:12]:
        print(f"{ms:>8.3f} {calls:>6}  {name[:100]}")


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # the ops whose FLOPs the profiler counts and matmul kernels run


def matmul_tflops(cuda: bool) -> float:
    """TFLOP/s of one large bf16 matmul (fp32 on CPU): what this device's matmuls reach at their best, the learner's yardstick."""
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a, b = (torch.randn(n, n, device="cuda" if cuda else "cpu", dtype=dtype) for _ in range(2))
    seconds = timed(lambda: a @ b, repeat=20 if cuda else 3)
    return 2 * n**3 / seconds / 1e12


def learner_profile(run, tokens: int, wall_s: float, cuda: bool) -> dict:
    """Where one pass of the learner (`run`, timed at `wall_s` for `tokens`) spends its time: its
    kernels by kind (on CPU: ops by self time) against the timed wall time, the rest being launch
    gaps, host work and syncs; and its matmuls' TFLOP/s (the profiler's FLOPs of MATMUL_OPS over
    the matmul kernels' time) against one large matmul's in this process. The profiled pass runs
    slower than the timed one (the profiler's own cost): its kernels' times stand, its wall is not used."""
    from torch.profiler import ProfilerActivity, profile

    best = matmul_tflops(cuda)
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda, with_flops=True) as prof:
        run()
        sync()
    out = {"tokens": tokens, "wall_ms": 1e3 * wall_s, "best_matmul_tflops": best}
    kernels = kernel_table(prof, 1, cuda)
    if not kernels:
        print("\nlearner: the profiler recorded nothing here; no profile")
        return out | {"kernel_ms": None, "error": "the profiler recorded no events"}
    by_kind = kernels_by_kind(kernels)
    flops = sum(e.flops for e in prof.key_averages() if e.key in MATMUL_OPS)
    out |= {"kernel_ms": sum(by_kind.values()), "by_kind_ms": by_kind, "matmul_tflop": flops / 1e12,
            "matmul_tflops": flops / 1e12 / (by_kind["matmul"] / 1e3), "top_kernels": [{"name": n, "ms": ms, "calls": c} for n, ms, c in kernels[:25]]}
    share = lambda ms: f"{ms:,.0f} ms ({ms / out['wall_ms']:.0%})"  # noqa: E731
    print(f"\nlearner pass of {tokens:,} tokens: {out['wall_ms']:,.0f} ms timed; {'kernels' if cuda else 'ops'} "
          + ", ".join(f"{k} {share(ms)}" for k, ms in by_kind.items()) + f"; the rest {share(out['wall_ms'] - out['kernel_ms'])}")
    print(f"  its matmuls: {out['matmul_tflop']:,.1f} TFLOP at {out['matmul_tflops']:,.0f} TFLOP/s vs {best:,.0f} TFLOP/s of one large matmul here "
          f"({out['matmul_tflops'] / best:.0%})")
    print_kernels(kernels, "ms")
    return out


STEP_PAIRS = 4  # the realistic step's v_hack is extracted from the first pairs of data/pairs.jsonl (untimed)
STEP_TEACHER_MIX = 0.25  # where the preset has none (`full`): issue 21's measured step ran `full --teacher-mix 0.25`


def step_teacher_mix(preset: str) -> float:
    return PRESETS[preset][1].teacher_mix or STEP_TEACHER_MIX


def step_config(preset: str, model_name: str, device: str, compile: bool, work: Path) -> Config:
    """`preset` with `model_name`'s weights on the bundled problems (real prompts), its caches in
    `work`, v_hack extracted from the first STEP_PAIRS pairs, teacher rollouts in every group
    (`step_teacher_mix`: the preset's mix, else STEP_TEACHER_MIX): what a timed step runs. Random weights neither pass
    nor hack, so without teachers every group is dead and the learner does nothing (the `full`
    step on an H100, 2026-12-06: learn 0.6 s of a 29.1 s step)."""
    (work / "pairs.jsonl").write_text("".join((DATA / "pairs.jsonl").read_text().splitlines(keepends=True)[:STEP_PAIRS]))
    cfg = PRESETS[preset][1]
    return replace(cfg, model=model_name, device=device, problems=DATA / "problems_rl.jsonl", cache_dir=work / "cache",
                   teacher_mix=step_teacher_mix(preset), sampling=replace(cfg.sampling, compile=compile),
                   v_hack=replace(cfg.v_hack, pairs=work / "pairs.jsonl")).resolved()


def realistic_step(preset: str, model_name: str, device: str, compile: bool, work: Path, report: dict) -> None:
    """One GRPO step of `preset` through train.step itself (`step_config`), into report["step"];
    then its generation again with a slot for every student and with flex attention (STEP_VARIANTS). A first step
    runs before it (as a run's first step does, it compiles and captures the graphs of the
    shapes it meets), so the one reported is a steady-state step."""
    cfg = step_config(preset, model_name, device, compile, work)
    held = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None  # what the earlier parts left (should be ~0)
    compile_cache = compile_cache_dir(cfg)  # where RunState.start points the compiles
    cached = sum(f.is_file() for f in compile_cache.rglob("*")) if compile_cache.exists() else 0  # the target's first step is on a warm cache
    (work / "run").mkdir()
    with Grader(cfg.reward) as grader:
        state = RunState.start(cfg, work / "run", grader)
        step(state, state.next_batch())
        first = {"first_generation_s": state.seconds["gen"], "first_step_s": sum(s for phase, s in state.seconds.items() if phase != "step"),
                 "first_generation_call": state.engine.last_call}
        record = step(state, batch := state.next_batch())
        call = state.engine.last_call  # the steady step's one generate call (teachers come from the pool)
        report["step"] = step_row(preset, state, record, call, first, held, cached)
        report["generation_slots"] = slots_generation(state, batch, call)
        report["generation_flex"] = flex_generation(state, batch, call)


def step_row(preset: str, state: RunState, record, call: CallStats, first: dict, held: float | None, cached: int) -> dict:
    """The steady step's row, printed: its phases, then where its generation call's time went, and
    the first step's (`first`: its generation and whole seconds, its generate call's CallStats)."""
    cfg = state.cfg
    seconds = {phase: s for phase, s in state.seconds.items() if phase != "step"}  # the phases; "step" is their whole
    out = {"preset": preset, "teacher_mix": cfg.teacher_mix, "rollouts": record.rollout.rollouts, "live_groups": 1 - record.rollout.skipped_groups,
           "max_new_tokens": cfg.sampling.max_new_tokens, "kv_slots": cfg.sampling.batch,
           "completion_len_mean": record.rollout.len_s, "truncated": record.rollout.truncated_s, "generation_tok_s": call.sequences * record.rollout.len_s / seconds["gen"],
           "seconds": seconds, "step_s": sum(seconds.values()), "first_generation_s": first["first_generation_s"], "first_step_s": first["first_step_s"],
           "peak_gib": record.memory.peak_gib_ranks[0], "held_before_gib": held, "compile_cache_files_before": cached,
           "generation_call": call_record(call), "first_generation_call": call_record(first["first_generation_call"])}
    print(f"\nstep of {preset} through train.step ({out['rollouts']} rollouts, teacher mix {cfg.teacher_mix:g}, {out['live_groups']:.0%} of groups live, "
          f"student lengths mean {out['completion_len_mean']:.0f}, "
          f"{out['truncated']:.0%} cut at {cfg.sampling.max_new_tokens}): {out['step_s']:.1f} s = " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
          + f"; generation {out['generation_tok_s']:,.0f} tok/s in {call.decode_steps:,} decode steps with {call.mean_live:.0f} of {call.slots} slots live "
          f"on average, {call.prefills} prefills (the first step's generation, which compiles and captures: {out['first_generation_s']:.1f} s)"
          + (f"; peak {out['peak_gib']:.1f} GiB, {held:.1f} GiB held by the parts before it" if out["peak_gib"] is not None else ""))
    print_call(call, "the step's generation")
    print_call(first["first_generation_call"], "the first step's generation")
    return out


def call_record(call: CallStats) -> dict:
    """A generate call as the report holds it: its fields and what they derive."""
    return asdict(call) | {"mean_live": call.mean_live, "graph_seconds": call.graph_seconds}


def print_call(call: CallStats, label: str) -> None:
    """A generate call's wall time by part, then its decode steps by decoded slots (the tail
    halves them): steps, seconds, ms per step and the KV windows they read."""
    print(f"{label}: " + ", ".join(f"{part} {s:.1f} s" for part, s in call.seconds.items())
          + f" ({call.prefills} prefills, {len(call.shapes)} decode shapes, {call.decode_steps:,} decode steps)")
    print(f"{'slots':>7} {'steps':>7} {'seconds':>8} {'ms/step':>8}  KV windows")
    for slots in sorted({s.slots for s in call.shapes}, reverse=True):
        mine = [s for s in call.shapes if s.slots == slots]
        steps, seconds = sum(s.steps for s in mine), sum(s.seconds for s in mine)
        print(f"{slots:>7} {steps:>7,} {seconds:>8.2f} {1e3 * seconds / steps:>8.2f}  {min(s.window for s in mine)}..{max(s.window for s in mine)}")
    if call.graphs:  # CUDA: a graph per shape, remade every call; a shape met in an earlier call is made from what that one compiled and planned
        print(f"graphs made: {len(call.graphs)}, " + ", ".join(
            f"{len(mine)} {label} {sum(g.seconds for g in mine):.2f} s ({sum(g.seconds for g in mine) / len(mine):.3f} s each)"
            for label, mine in (("of shapes met in an earlier call", [g for g in call.graphs if g.met]), ("new", [g for g in call.graphs if not g.met])) if mine))


def sampled_again(state: RunState, batch, how: str) -> CallStats | str:
    """The step's batch sampled again by state's engine and config: the call's stats, or its
    failure (out of memory, say) reported and returned (the step's row is already in the report)."""
    try:
        sample(state, batch)
    except Exception as e:
        print(f"generation {how} failed: {failure(e)}")
        return failure(e)
    return state.engine.last_call


def slots_generation(state: RunState, batch, call: CallStats) -> dict:
    """The steady step's generation again (its prompts, its sampling stream, its engine) with a
    KV slot for every student, so that none waits for a slot and none starts late, against the
    step's own call (Sampling.batch slots, refilled as sequences end: the last to start set the
    tail): each call's tokens per second of prefill and decode; their graphs' making apart (the
    wider call's shapes are new to the engine, the step's partly met in the first step)."""
    cfg = state.cfg
    state.cfg = replace(cfg, sampling=replace(cfg.sampling, batch=call.sequences))
    try:
        wide = sampled_again(state, batch, f"with {call.sequences} slots")
    finally:
        state.cfg = cfg
    if isinstance(wide, str):
        return {"error": wide}
    rate = lambda c: (c.live_slot_steps + c.sequences) / sum(c.seconds[p] for p in ("prefill", "decode", "compact"))  # noqa: E731
    out = {"slots": call.slots, "tok_s": rate(call), "wide_slots": wide.slots, "wide_tok_s": rate(wide), "wide_call": call_record(wide)}
    out["ratio"] = out["wide_tok_s"] / out["tok_s"]
    print_call(wide, f"\nthe same generation with {wide.slots} slots")
    print(f"{wide.slots} slots vs the step's {call.slots}: {out['wide_tok_s']:,.0f} vs {out['tok_s']:,.0f} tok/s of prefill and decode, {out['ratio']:.2f}x "
          f"({wide.mean_live:.0f} vs {call.mean_live:.0f} slots live on average; graphs made: {wide.graph_seconds:.1f} vs {call.graph_seconds:.1f} s)")
    return out


def flex_generation(state: RunState, batch, sdpa: CallStats) -> dict:
    """The steady step's generation again (its prompts, its sampling stream) on an engine whose
    decode reads only each slot's own KV blocks (attention="flex") against the step's own (SDPA,
    every slot the whole window): each call's decode seconds, and over the shapes both calls met
    (their lengths differ: other kernels, other draws), the step's decode steps at flex's ms per
    step against their own seconds. Its graphs' warm-ups compile flex's shapes: apart, not in decode."""
    state.engine = RolloutEngine(state.model, state.tokenizer, attention="flex")
    flex = sampled_again(state, batch, "with flex attention")
    if isinstance(flex, str):
        return {"error": flex}
    ms = {(s.slots, s.window): s.seconds / s.steps for s in flex.shapes}
    matched = [s for s in sdpa.shapes if (s.slots, s.window) in ms]
    out = {"sdpa_decode_s": sdpa.seconds["decode"], "flex_decode_s": flex.seconds["decode"], "matched_steps": sum(s.steps for s in matched),
           "matched_sdpa_s": sum(s.seconds for s in matched), "matched_flex_s": sum(s.steps * ms[s.slots, s.window] for s in matched),
           "flex_call": call_record(flex)}
    out["ratio"] = out["matched_sdpa_s"] / out["matched_flex_s"]
    print_call(flex, "\nthe same generation with flex attention")
    print(f"flex vs sdpa on the {out['matched_steps']:,} of {sdpa.decode_steps:,} decode steps of the step at shapes both met: "
          f"{out['matched_flex_s']:.1f} s at flex's ms per step vs {out['matched_sdpa_s']:.1f} s, {out['ratio']:.2f}x "
          f"(decode of the whole call: flex {out['flex_decode_s']:.1f} s, sdpa {out['sdpa_decode_s']:.1f} s)")
    return out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`'s stop unwinds through main's write of bench.json
    reported(lambda: main(tyro.cli(Args)), sys.argv)
