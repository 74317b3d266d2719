#!/usr/bin/env bash
# Queue the headline experiment: v_hack extraction for Qwen3-4B, then 3 seeds x {vanilla, projected}
# of the `full` preset, each training job depending on the extraction. Uses pueue when it is on
# PATH, else task-spooler (tsp). --dry-run prints the commands instead of queueing them.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
[[ "${1:-}" == "--dry-run" ]] && dry_run=1
seeds=(1 2 3)
extract_cmd="uv run python train.py extract full"  # the very v_hack file the full runs look up
train_cmd() { echo "uv run python train.py full --intervention $1 --seed $2"; }

if command -v pueue >/dev/null; then
    queue=pueue
elif command -v tsp >/dev/null; then
    queue=tsp
elif (( dry_run )); then
    queue=pueue
else
    echo "queue-full: neither pueue nor tsp (task-spooler) is on PATH; install one (e.g. 'cargo install pueue' or 'apt-get install task-spooler')" >&2
    exit 1
fi

submit() {  # submit [DEPENDENCY_ID] CMD... ; prints the new job's id
    local after=$1; shift
    if (( dry_run )); then
        echo "[$queue${after:+ after $after}] $*" >&3
        echo "job$((++fake_id))"
    elif [[ $queue == pueue ]]; then
        pueue add --print-task-id ${after:+--after "$after"} -- "$@"
    else
        tsp ${after:+-D "$after"} "$@"
    fi
}

exec 3>&1  # submit's stdout is captured for the job id; dry-run lines go to the real stdout
fake_id=0
extract_id=$(submit "" $extract_cmd)
for seed in "${seeds[@]}"; do
    for arm in vanilla projected; do
        submit "$extract_id" $(train_cmd $arm $seed) >/dev/null
    done
done
(( dry_run )) || echo "queued on $queue: extraction ($extract_id) then ${#seeds[@]} seeds x {vanilla, projected}"
