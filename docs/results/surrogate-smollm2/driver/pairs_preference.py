"""Do the trained models prefer the pairs' hack completions, whatever the arm, and which part of
their update makes them? (Exploratory, issue 19; CPU.)

For each pairs file (the hack pairs, the null pairs) and each model (the base, delta_S = 0, and each
run's latest delta_S): every pair's hack and clean completion scored as extraction scores them (the
prompt with the `run_tests` hint, token-mean NLL of logits / the v_hack file's temperature), and the
preference gap = mean over pairs of NLL(hack) - NLL(clean) (negative: the hack is the likelier).
Its change from the base is what training did to the pairs; the null pairs (no hack on either side)
are the yardstick for a change that is not about hacking.

First-order split of each change: mean_i d_i . u, with d_i the pair's gradient difference at the
base (the v_hack file's `diffs`, token-mean) and u the run's delta_S, and the part of it inside
v_hack's span (sum over modules of (V d_i)(V u)): what the projection can touch; the rest lies
outside it. Beside it, the same inside seeded random bases with v_hack's axis counts.
One forward per completion per model (~1.7 s each on two cores: ~6 min a model).
Usage, from the repository root:
PYTHONPATH=. uv run python docs/results/surrogate-smollm2/driver/pairs_preference.py PAIRS_VHACK NULL_VHACK RUN...
(the v_hack files: `just extract surrogate --device cpu` with and without `--v-hack.pairs data/pairs_null.jsonl`)
"""
import sys
from pathlib import Path

import torch
from torch import Tensor

from extract import completion_nll, file_sha256, load_pairs, read_v_hack
from grader import load_problems, render_prompt
from projected_grpo.checkpoints import checkpoints
from projected_grpo.models import load_model
from projected_grpo.paths import DATA
from projected_grpo.svd_adapter import DEFAULT_TARGETS, load_delta, wrap_svd
from projection import random_bases

MODEL, RANDOM = "smollm2-135m", 8
PAIRS = {"hack pairs": DATA / "pairs.jsonl", "null pairs": DATA / "pairs_null.jsonl"}


@torch.no_grad()
def gaps(model, tokenizer, pairs, temperature: float) -> Tensor:
    """Per pair: token-mean NLL(hack) - NLL(clean), as extraction scores them."""
    out = []
    for pair in pairs:
        prompt = render_prompt(tokenizer, pair.problem, "run_tests")
        (hack, n_hack), (clean, n_clean) = (completion_nll(model, tokenizer, prompt, text, temperature) for text in (pair.hack, pair.clean))
        out.append(float(hack) / n_hack - float(clean) / n_clean)
    return torch.tensor(out)


def first_order(diffs: dict[str, Tensor], u: dict[str, Tensor], V: dict[str, Tensor]) -> tuple[float, float]:
    """mean_i d_i . u over every module, and its part inside V's span."""
    whole = sum(float((diffs[m] @ u[m]).mean()) for m in diffs)
    inside = sum(float(((diffs[m] @ V[m].T) @ (V[m] @ u[m])).mean()) for m in V)
    return whole, inside


def main(pairs_vhack: Path, null_vhack: Path, runs: list[Path]) -> None:
    files = {"hack pairs": read_v_hack(pairs_vhack), "null pairs": read_v_hack(null_vhack)}
    problems = {p.id: p for p in load_problems(DATA / "problems.jsonl")}
    for name, vh in files.items():
        assert vh.header["pairs_sha256"] == file_sha256(PAIRS[name]), f"{vh.path} was not extracted from {PAIRS[name]}"
    pairs = {name: load_pairs(path, problems) for name, path in PAIRS.items()}
    randoms = {name: [random_bases(vh.V, torch.Generator().manual_seed(i)) for i in range(RANDOM)] for name, vh in files.items()}
    model, tokenizer, _ = load_model(MODEL, "cpu", "float32")
    adapters = wrap_svd(model, DEFAULT_TARGETS, pairs_vhack.parent.parent / "svd")  # the cache the v_hack file was extracted in
    models = {"base": None} | {run.name: saved[-1] / "delta_S.safetensors" for run in runs if (saved := checkpoints(run))}
    base_gap = {}
    print("| model | pairs | gap (mean, hack - clean) | change from base | first order: whole / inside v_hack / inside random (mean) |")
    print("|---|---|---|---|---|")
    for label, path in models.items():
        if path is None:
            with torch.no_grad():
                for a in adapters.values():
                    a.delta_S.zero_()
        else:
            load_delta(adapters, path)
        u = {m: a.delta_S.detach().float() for m, a in adapters.items()}
        for name, vh in files.items():
            g = gaps(model, tokenizer, pairs[name], float(vh.header["temperature"]))
            base_gap.setdefault(name, g)
            change = float((g - base_gap[name]).mean())
            whole, inside = first_order(vh.diffs, u, vh.V)
            rand = [first_order(vh.diffs, u, R)[1] for R in randoms[name]]
            print(f"| {label} | {name} ({len(g)}) | {float(g.mean()):+.4f} | {change:+.4f} | {whole:+.4f} / {inside:+.4f} / {sum(rand) / RANDOM:+.4f} |", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
