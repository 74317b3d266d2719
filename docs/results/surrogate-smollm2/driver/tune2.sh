#!/usr/bin/env bash
# Re-tuning the surrogate on vanilla after surrogate-v1's seed 1 never hacked (issue 19, tuning block 3).
# Every line of SPEC (NAME FLAGS...) runs concurrently from .pcsrc (tag surrogate-v1) with the surrogate
# preset, vanilla; runs resume from their latest checkpoint; all stop after SECONDS; run folders (latest
# checkpoint only) are packed into $OUT. Usage: bash .device/tune2.sh SPEC SECONDS
set -u
spec=$PWD/$1; seconds=$2; t0=$(date +%s); runs=/tmp/tune/runs; cache=/tmp/tune/cache
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p $runs $cache; cd .pcsrc
if [ ! -f /tmp/tune/.setup ]; then
  python train.py extract surrogate --cache-dir $cache > $runs/_extract.out 2>&1 || { tail -20 $runs/_extract.out; exit 1; }
  python train.py extract surrogate --sampling.temperature 1.0 --cache-dir $cache >> $runs/_extract.out 2>&1 || { tail -20 $runs/_extract.out; exit 1; }
  python train.py build-pool --source data/teacher_completions_easy.jsonl --problems data/problems_easy.jsonl --hint aware > $runs/_pool.out 2>&1 || tail -5 $runs/_pool.out
  touch /tmp/tune/.setup; echo "setup $(( $(date +%s) - t0 )) s"
fi
left=$(( seconds - ($(date +%s) - t0) - 40 ))
while read -r name flags; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  resume=""; ls -d $runs/$name/checkpoints/step_* >/dev/null 2>&1 && resume="--resume $runs/$name"
  timeout --signal=TERM $left python train.py surrogate --intervention vanilla --grader-workers 2 --cache-dir $cache $flags --runs-dir $runs --run-name $name $resume >>$runs/$name.out 2>&1 &
done < "$spec"
wait
echo "runs stopped at $(( $(date +%s) - t0 )) s"
for d in $runs/*/; do
  ls -d $d/checkpoints/step_* 2>/dev/null | sort | head -n -1 | xargs -r rm -rf
  python - "$d" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1]); rows = [json.loads(l) for l in (d / "log.jsonl").read_text().splitlines()] if (d / "log.jsonl").exists() else []
f = lambda v: "-" if v is None else f"{v:.2f}"
print(d.name, "steps", len(rows), "s/step", f(sum(r["time/step"] for r in rows) / max(1, len(rows))))
print("   hack_s", " ".join(f(r["rollout/hack_s"]) for r in rows[::5]))
print("   gt_s  ", " ".join(f(r["rollout/gt_s"]) for r in rows[::5]))
print("   reward", " ".join(f(r["rollout/reward"]) for r in rows[::5]))
PY
  grep -h -E "Error|Traceback" ${d%/}.out | sort | uniq -c | head -3
done
cd /tmp/tune && tar czf $OUT/tune.tgz runs && ls -la $OUT | tail -1
echo "end at $(( $(date +%s) - t0 )) s"
