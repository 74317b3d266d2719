#!/usr/bin/env bash
# After the sweep's last device call: phase A's committed evidence (v2-gate/runs: vanilla and the base
# model's eval) linked into runs/ (relative links: one copy of each), and, from the $OUT parts
# (pc.tgz.part_*) unpacked, each phase B run's evidence
# (config.json, log.jsonl, vhack.json, summary.json, curves.png, eval/*/summary.json) copied into
# docs/results/surrogate-smollm2/runs/, the sweep's logs into logs/, then `just results` on them.
# Usage, from the repository root: bash docs/results/surrogate-smollm2/driver/publish.sh PARTS_DIR [DEST]
set -euo pipefail
parts=$1; dest=${2:-docs/results/surrogate-smollm2}; tmp=$(mktemp -d)
cat "$parts"/pc.tgz.part_* | tar xzf - -C "$tmp"
mkdir -p "$dest/runs"
for run in "$dest"/v2-gate/runs/*/; do ln -sfn "../v2-gate/runs/$(basename "$run")" "$dest/runs/$(basename "$run")"; done
for run in "$tmp"/runs/*/; do
  if [ ! -f "$run/config.json" ]; then continue; fi
  to=$dest/runs/$(basename "$run"); mkdir -p "$to"
  for f in config.json log.jsonl vhack.json summary.json curves.png; do
    if [ -f "$run/$f" ]; then cp "$run/$f" "$to/"; fi
  done
  for eval in "$run"/eval/*/; do
    if [ -f "$eval/summary.json" ]; then mkdir -p "$to/eval/$(basename "$eval")" && cp "$eval/summary.json" "$to/eval/$(basename "$eval")/"; fi
  done
done
mkdir -p "$dest/logs" && cp "$tmp"/*.log "$dest/logs/" 2>/dev/null || true
uv run python -m projected_grpo.results "$dest/runs" --out "$dest"
rm -rf "$tmp"
