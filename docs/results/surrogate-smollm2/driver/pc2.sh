#!/usr/bin/env bash
# The positive control (issue 19) on one H200, from /tmp/pcsrc2 (join.sh's copy of the git archive of tag surrogate-v2).
# Phase A: diagnose + vanilla seeds 1-3 + their evals, and the base model's eval. The gate (vanilla
# alone). Phase B, only once the gate is met: projected, random, null_pairs, shuffled x seeds 1-3.
# Stops itself SECONDS after it starts; runs resume on the next call (from pcstate2/ on a fresh machine,
# carried after setup.sh and join.sh: the GGUF's halves leave no room for it in their calls).
# With GATE_RUNS (phase A's committed evidence, docs/results/surrogate-smollm2/v2-gate/runs), phase A is
# not run again: the gate is read there (phase A's run folders did not outlive the session that ran them).
# Usage, from the repository root: bash docs/results/surrogate-smollm2/driver/pc2.sh SECONDS [GATE_RUNS]
set -u
budget=$1; t0=$(date +%s); here=$(cd "$(dirname "$0")" && pwd); gate_runs=${2:+$PWD/$2}
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# One intra-op thread per process: the frozen source's v_hack quality report (every call's diagnose
# jobs) thrashed at torch's default beside the other jobs, ~6 min each (2026-12-05; main's
# diagnose.one_thread since). The runs' own work is on the GPU and in grader subprocesses.
export OMP_NUM_THREADS=1
pc=/tmp/pc2; runs=$pc/runs; mkdir -p $runs $pc/cache
if [ ! -f $pc/.restored ] && ls pcstate2/pc.tgz.part_* >/dev/null 2>&1; then cat pcstate2/pc.tgz.part_* | tar xzf - -C $pc; echo "restored $(ls $runs | wc -l) run folders"; fi
touch $pc/.restored
left() { echo $(( budget - ($(date +%s) - t0) )); }
hours() { python -c "print(f'{max(60, $(left) - $1) / 3600:.4f}')"; }
sweep() { python -m projected_grpo.sweep --preset surrogate --backend local --runs-dir $runs --python python --results true --train-flags="--cache-dir $pc/cache" "$@"; }
cd /tmp/pcsrc2
# The teacher pool once, before runs that would each build it.
[ -f out/pool/teacher_completions_easy-aware.jsonl ] || python train.py build-pool --source data/teacher_completions_easy.jsonl --problems data/problems_easy.jsonl --hint aware > $pc/pool.log 2>&1 || tail -5 $pc/pool.log
v1=$runs/surrogate_vanilla_pairs_s1
if [ -z "$gate_runs" ]; then
( while [ ! -f $v1/config.json ] && [ $(left) -gt 100 ]; do sleep 10; done
  ls $v1/eval/problems_heldout-base-*/summary.json >/dev/null 2>&1 || { [ -f $v1/config.json ] && timeout $(( $(left) - 70 )) python train.py eval --run $v1 --base --grader-workers 4 > $pc/base_eval.log 2>&1; echo "base eval rc $? at $(( $(date +%s) - t0 )) s"; }
) &
sweep --arms vanilla --local.parallel 3 --local.hours $(hours 75) > $pc/sweepA.log 2>&1; echo "phase A rc $? at $(( $(date +%s) - t0 )) s"
wait
fi
python $here/gate.py ${gate_runs:-$runs} 80; gate=$?
if [ $gate = 0 ] && [ $(left) -gt 150 ]; then
  # Each run peaks at ~22 GiB (8 at once ran out of the H200's memory): one per 25 GiB of the card, at most
  # 5 (16 cores grade for them), so an H100 (80 GiB) runs 3 at once, an H200 (141 GiB) 5.
  at_once=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{n = int($1 / 1024 / 25); print (n > 5 ? 5 : n)}')
  echo "phase B: $at_once runs at once"
  sweep --arms projected random null_pairs shuffled --local.parallel $at_once --local.hours $(hours 75) > $pc/sweepB.log 2>&1; echo "phase B rc $? at $(( $(date +%s) - t0 )) s"
fi
python $here/report.py $runs
tail -4 $pc/sweepA.log $pc/sweepB.log 2>/dev/null | cut -c1-300
grep -h -E "Error|Traceback" $runs/local/*.log $pc/base_eval.log 2>/dev/null | sort | uniq -c | head -8
for d in $runs/*/checkpoints; do ls -d $d/step_* 2>/dev/null | sort | head -n -1 | xargs -r rm -rf; done
# Only the run folders and logs travel (the caches rebuild in a minute): they must fit one carry. A run
# whose eval is done keeps only its last checkpoint's delta_S (0.4 MB, the trained parameters), without
# the optimizer state, gradients and bases that a resume needs (phase A and the first three phase B runs lost it).
cd $pc && evaluated=$(cd runs/local && ls eval_*.done 2>/dev/null | sed 's/^eval_\(.*\)\.done$/\1/' | while read -r r; do for f in state.pt grads.safetensors bases.safetensors; do echo "--exclude=runs/$r/checkpoints/*/$f"; done; done)
tar czf /tmp/pc.tgz $evaluated runs $(ls base_eval.log sweepA.log sweepB.log pool.log 2>/dev/null) && split -b 15M /tmp/pc.tgz $OUT/pc.tgz.part_ && ls -la $OUT | tail -n +4
echo "end at $(( $(date +%s) - t0 )) s"
