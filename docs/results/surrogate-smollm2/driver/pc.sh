#!/usr/bin/env bash
# The positive control (issue 19) on one H200, from .pcsrc (git archive of tag surrogate-v1).
# Phase A: diagnose + vanilla seeds 1-3 + their evals, and the base model's eval. The gate (vanilla
# alone). Phase B, only once the gate is met: projected, random, null_pairs, shuffled x seeds 1-3.
# Stops itself SECONDS after it starts; runs resume on the next call. Usage: bash .device/pc.sh SECONDS
set -u
budget=$1; t0=$(date +%s); root=$PWD
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
pc=/tmp/pc; runs=$pc/runs; mkdir -p $runs $pc/cache
if [ ! -f $pc/.restored ] && ls pcstate/pc.tgz.part_* >/dev/null 2>&1; then cat pcstate/pc.tgz.part_* | tar xzf - -C $pc; echo "restored $(ls $runs | wc -l) run folders"; fi
touch $pc/.restored
left() { echo $(( budget - ($(date +%s) - t0) )); }
hours() { python -c "print(f'{max(60, $(left) - $1) / 3600:.4f}')"; }
sweep() { python sweep.py --preset surrogate --backend local --runs-dir $runs --python python --results true --train-flags="--cache-dir $pc/cache" "$@"; }
cd .pcsrc
v1=$runs/surrogate_vanilla_pairs_s1
( while [ ! -f $v1/config.json ] && [ $(left) -gt 100 ]; do sleep 10; done
  ls $v1/eval/problems_heldout-base-*/summary.json >/dev/null 2>&1 || { [ -f $v1/config.json ] && timeout $(( $(left) - 70 )) python train.py eval --run $v1 --base --grader-workers 4 > $pc/base_eval.log 2>&1; echo "base eval rc $? at $(( $(date +%s) - t0 )) s"; }
) &
sweep --arms vanilla --local.parallel 4 --local.hours $(hours 75) > $pc/sweepA.log 2>&1; echo "phase A rc $? at $(( $(date +%s) - t0 )) s"
wait
python $root/.device/gate.py $runs 80; gate=$?
if [ $gate = 0 ] && [ $(left) -gt 150 ]; then
  sweep --arms projected random null_pairs shuffled --local.parallel 6 --local.hours $(hours 75) > $pc/sweepB.log 2>&1; echo "phase B rc $? at $(( $(date +%s) - t0 )) s"
fi
python $root/.device/report.py $runs
tail -4 $pc/sweepA.log $pc/sweepB.log 2>/dev/null | cut -c1-300
grep -h -E "Error|Traceback" $runs/local/*.log $pc/base_eval.log 2>/dev/null | sort | uniq -c | head -8
for d in $runs/*/checkpoints; do ls -d $d/step_* 2>/dev/null | sort | head -n -1 | xargs -r rm -rf; done
du -sh $pc/cache/* 2>/dev/null
cd $pc && tar czf /tmp/pc.tgz --exclude=cache/svd runs cache base_eval.log sweepA.log $(ls sweepB.log 2>/dev/null) && split -b 15M /tmp/pc.tgz $OUT/pc.tgz.part_ && ls -la $OUT
echo "end at $(( $(date +%s) - t0 )) s"
