#!/usr/bin/env bash
# Issue 21 on a lent GPU whose image lacks the harness's pure-Python wheels: one device call per
# part, carrying .whl (docs/results/surrogate-smollm2/driver/prepare.sh builds it here; the wheels
# install in seconds, so each call installs them: a call on a fresh machine needs nothing else).
# Everything the part writes goes to $OUT: bench.json, the log, the profile.
#   tests       the CUDA-only tests (graphed decode, flex attention, varlen kernel, activation probe)
#   step        benchmarks/bench_step.py in full (engine, kernels, learner, SVD wrap, the `full` step)
#   off-policy  benchmarks/bench_off_policy.py, 10 steps of `fast` on- and one-step-off
# Usage, from the repository root: bash docs/results/step-h200/driver/run.sh PART [SECONDS]
set -u
part=$1; seconds=${2:-560}
pip install --quiet --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v -i "warning" | tail -2
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
case $part in
  tests) timeout "$seconds" python -m pytest -q -p no:cacheprovider -rs --durations=8 tests/test_rollout.py tests/test_packing.py tests/test_activations.py \
           -k "cuda or varlen or graph" 2>&1 | tee "$OUT/tests.log" | tail -40 ;;
  step) mkdir -p "$OUT/bench" && timeout "$seconds" python benchmarks/bench_step.py --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -80 ;;
  off-policy) timeout "$seconds" python benchmarks/bench_off_policy.py --steps 10 --out "$OUT" 2>&1 | tee "$OUT/off_policy.log" | tail -40 ;;
  *) echo "unknown part '$part': tests, step or off-policy" >&2; exit 2 ;;
esac
echo "$part rc ${PIPESTATUS[0]}"
