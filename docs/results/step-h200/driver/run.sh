#!/usr/bin/env bash
# Issue 21 on a lent GPU whose image lacks the harness's pure-Python wheels: the parts named, in
# order, in one device call, carrying .whl (docs/results/surrogate-smollm2/driver/prepare.sh builds
# it here; the wheels install in seconds, so each call installs them). Everything a part writes
# goes to $OUT: the logs, bench/bench.json, off_policy.json.
#   tests       the CUDA-only tests (graphed decode, flex attention, varlen kernel, activation probe)
#   engine      benchmarks/bench_step.py --resume without the step: bandwidth, decode rows and profile, SVD wrap,
#               extraction, learner (~480 s on an H100: give it a call of its own), keeping the model's parts of
#               .bench/bench.json (an earlier call's $OUT/bench/bench.json, copied here and carried: a call cut short)
#               if measured on this card; carry no .bench to measure them all
#   step        benchmarks/bench_step.py --resume --no-model-parts: the `full` step alone, keeping the model's parts
#               of .bench/bench.json as `engine` does (in one call after `engine`, that part's)
#   off-policy  benchmarks/bench_off_policy.py, OFF_POLICY_STEPS (default 10) steps of `fast` on-policy and one-step-off
# A call has CALL_S seconds (default 600; less where the session's device time is short): each part
# stops at its own limit (seconds below), or sooner where the call's time runs out (`limit`: a
# `timeout` stop lets the bench write what it measured; the call's end would not).
# Usage, from the repository root: bash docs/results/step-h200/driver/run.sh PART...
set -u
pip install --quiet --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v -i "warning" | tail -2
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
mkdir -p "$OUT/bench"
limit() { local left=$((${CALL_S:-600} - 15 - SECONDS)); echo $(($1 < left ? $1 : left)); }
# The model's parts of a carried .bench/bench.json, where this card measured them (--resume refuses another
# header), as the bench's starting point; never an earlier step, which --resume would keep (2026-12-07: a
# call that measured nothing).
carry_in() {
  local card; card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  if [[ -f .bench/bench.json && ! -f "$OUT/bench/bench.json" ]]; then PYTHONPATH=$PYTHONPATH:benchmarks python -c "
import json, sys; from bench_step import MODEL_PARTS
r = json.load(open('.bench/bench.json'))
if r['header']['device'] == sys.argv[1]:
    json.dump({k: r[k] for k in ('header', 'args', *MODEL_PARTS) if k in r}, open(sys.argv[2], 'w'))" "$card" "$OUT/bench/bench.json"; fi
}
for part in "$@"; do
  case $part in
    tests) timeout $(limit 120) python -m pytest -q -p no:cacheprovider -rs --durations=8 tests/test_rollout.py tests/test_packing.py tests/test_activations.py \
             -k "cuda or varlen or graph" 2>&1 | tee "$OUT/tests.log" | tail -30 ;;
    engine) carry_in
            timeout $(limit 560) python benchmarks/bench_step.py --resume --step-preset '' --out "$OUT/bench" 2>&1 | tee "$OUT/engine.log" | tail -60 ;;
    step) carry_in
          timeout $(limit 560) python benchmarks/bench_step.py --resume --no-model-parts --out "$OUT/bench" 2>&1 | tee "$OUT/step.log" | tail -40 ;;
    off-policy) timeout $(limit 560) python benchmarks/bench_off_policy.py --steps "${OFF_POLICY_STEPS:-10}" --out "$OUT" 2>&1 | tee "$OUT/off_policy.log" | tail -40 ;;
    *) echo "unknown part '$part': tests, engine, step or off-policy" >&2; exit 2 ;;
  esac
  echo "$part rc ${PIPESTATUS[0]}"
done
