"""Why cin_s beats its empirical null in every surrogate run, hacking or not (leading.py): is the
random-basis null too low a bar for any gradient, and would label-shuffled twins be the right one?

From the surrogate's v_hack file and its per-completion gradient cache (`just extract surrogate`;
pass both paths), in 5 folds of the pairs: v_hack, 20 label-shuffled twins (extract.shuffled_twin)
and 8 random bases (projection.random_bases, v_hack's axis counts) are fit on the other folds, and
each held-out pair's single-completion gradients are scored by the hack-ward fraction
||relu(V g)|| / ||g|| (training's cin): g = grad NLL(hack) / tokens (what rewarding that hack
pushes), g = grad NLL(clean) / tokens (rewarding the clean one) and g = -grad NLL(clean) / tokens
(penalising it). A null that is the right yardstick gives a gradient that is not hack-ward about
what v_hack gives it. With a third file, the null-pairs arm's basis (`just extract surrogate
--v-hack.pairs data/pairs_null.jsonl`, fit on other pairs: no folds) scores the same gradients.
No pass over the model.
Usage, from the repository root:
PYTHONPATH=. uv run python docs/results/surrogate-smollm2/driver/null_yardstick.py VHACK PAIR_GRADS [NULL_PAIRS_VHACK]"""
import sys
from pathlib import Path

import torch
from torch import Tensor

from extract import fit_v_hack, read_tensors, read_v_hack, shuffled_twin
from projected_grpo.diagnose import fold_ids
from projection import random_bases

FOLDS, SHUFFLES, RANDOM, SEED = 5, 20, 8, 0


def fractions(V: dict[str, Tensor], g: dict[str, Tensor]) -> Tensor:
    """Per row of g (pairs x r per module): ||relu(V g)|| / ||g|| over all of delta_S."""
    total = torch.sqrt(sum(x.double().square().sum(dim=1) for x in g.values()))
    hackward = torch.sqrt(sum((g[m].double() @ V[m].double().T).clamp_min(0).square().sum(dim=1) for m in V))
    return hackward / total


def main(vhack_path: Path, grads_path: Path, null_pairs_path: Path | None) -> None:
    vh = read_v_hack(vhack_path)
    t, _ = read_tensors(grads_path)
    vc = vh.config()
    per_token = lambda kind, n: {m.removesuffix(f".{kind}"): x / n[:, None] for m, x in t.items() if m.endswith(f".{kind}")}
    kinds = {"reward the hack": per_token("hack", t["n_hack"]), "reward the clean": per_token("clean", t["n_clean"])}
    kinds["penalise the clean"] = {m: -x for m, x in kinds["reward the clean"].items()}
    kinds["pair difference"] = vh.diffs
    n = vh.n_hack.shape[0]
    gen = torch.Generator().manual_seed(SEED)
    scores = {k: {"v_hack": torch.zeros(n), "shuffled": torch.zeros(SHUFFLES, n), "random": torch.zeros(RANDOM, n)} for k in kinds}
    null_pairs = read_v_hack(null_pairs_path).V if null_pairs_path else None
    for held in fold_ids(n, FOLDS, SEED):
        train = torch.ones(n, dtype=torch.bool)
        train[held] = False
        diffs = {m: d[train] for m, d in vh.diffs.items()}
        V, _ = fit_v_hack(diffs, vc)
        twins = [shuffled_twin(diffs, V, vc, gen) for _ in range(SHUFFLES)]
        randoms = [random_bases(V, gen) for _ in range(RANDOM)]
        for kind, g in kinds.items():
            held_g = {m: x[held] for m, x in g.items()}
            scores[kind]["v_hack"][held] = fractions(V, held_g).float()
            for i, W in enumerate(twins):
                scores[kind]["shuffled"][i, held] = fractions(W, held_g).float()
            for i, Q in enumerate(randoms):
                scores[kind]["random"][i, held] = fractions(Q, held_g).float()
    null_pairs_said = {k: "" if null_pairs is None else f" {fractions(null_pairs, g).mean():.3f} |" for k, g in kinds.items()}
    print(f"{n} pairs, {FOLDS} folds, {SHUFFLES} shuffled twins, {RANDOM} random bases; mean over held-out pairs (twins and bases: mean, p95 of their means)")
    print("| gradient | v_hack | shuffled twins mean | shuffled p95 | random mean | random p95 |" + (" null-pairs basis |" if null_pairs else ""))
    print("|---|---|---|---|---|---|" + ("---|" if null_pairs else ""))
    for kind, s in scores.items():
        sh, rd = s["shuffled"].mean(dim=1), s["random"].mean(dim=1)
        print(f"| {kind} | {s['v_hack'].mean():.3f} | {sh.mean():.3f} | {sh.quantile(0.95):.3f} | {rd.mean():.3f} | {rd.quantile(0.95):.3f} |{null_pairs_said[kind]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
