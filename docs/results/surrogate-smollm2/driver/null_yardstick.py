"""Why cin_s beats its empirical null in every surrogate run, hacking or not (leading.py): is the
random-basis null too low a bar for any gradient, and would label-shuffled twins be the right one?

From the surrogate's v_hack file and its per-completion gradient cache (`just extract surrogate`;
pass both paths), in 5 folds of the pairs: v_hack, 20 label-shuffled twins (extract.shuffled_twin)
and 8 random bases (projection.random_bases, v_hack's axis counts) are fit on the other folds, and
each held-out pair's single-completion gradients are scored by the hack-ward fraction
||relu(V g)|| / ||g|| (training's cin): g = grad NLL(hack) / tokens (what rewarding that hack
pushes), g = grad NLL(clean) / tokens (rewarding the clean one) and g = -grad NLL(clean) / tokens
(penalising it). A null that is the right yardstick gives a gradient that is not hack-ward about
what v_hack gives it. The same again with the completions' mean gradient (the common mode) projected
out of v_hack and of the twins, per module. With a third file, the null-pairs arm's basis (`just extract surrogate
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
from projection import Projector, random_bases

FOLDS, SHUFFLES, RANDOM, SEED = 5, 20, 8, 0


def fractions(V: dict[str, Tensor], g: dict[str, Tensor]) -> Tensor:
    """Per row of g (pairs x r per module): training's cin, Projector.hackward_fraction, of that row."""
    measure = Projector(V, {m: x.shape[1] for m, x in g.items()}, "one_sided", apply=False)
    return torch.tensor([measure.hackward_fraction({m: x[i] for m, x in g.items()}) for i in range(next(iter(g.values())).shape[0])])


def without_common_mode(V: dict[str, Tensor], mean_grad: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each module's axes with the completions' mean gradient direction projected out, renormalised."""
    out = {}
    for m, v in V.items():
        u = mean_grad[m] / mean_grad[m].norm()
        w = v - (v @ u)[:, None] * u[None]
        out[m] = w / w.norm(dim=1, keepdim=True)
    return out


def main(vhack_path: Path, grads_path: Path, null_pairs_path: Path | None) -> None:
    vh = read_v_hack(vhack_path)
    t, _ = read_tensors(grads_path)
    vc = vh.config()
    per_token = lambda kind, n: {m.removesuffix(f".{kind}"): x / n[:, None] for m, x in t.items() if m.endswith(f".{kind}")}
    hack, clean = per_token("hack", t["n_hack"]), per_token("clean", t["n_clean"])
    kinds = {"reward the hack": hack, "reward the clean": clean, "penalise the clean": {m: -x for m, x in clean.items()}, "pair difference": vh.diffs}
    n = vh.n_hack.shape[0]
    gen = torch.Generator().manual_seed(SEED)
    scores = {k: {} for k in kinds}  # gradient kind -> basis kind -> per fold, (bases x held-out pairs)
    cos = []
    for held in fold_ids(n, FOLDS, SEED):
        train = torch.ones(n, dtype=torch.bool)
        train[held] = False
        diffs = {m: d[train] for m, d in vh.diffs.items()}
        V, _ = fit_v_hack(diffs, vc)
        twins = [shuffled_twin(diffs, V, vc, gen) for _ in range(SHUFFLES)]
        randoms = [random_bases(V, gen) for _ in range(RANDOM)]
        # The common mode: per module, the mean per-token gradient of the training pairs' completions, hack and clean.
        mean_grad = {m: torch.cat([hack[m][train], clean[m][train]]).mean(dim=0) for m in V}
        cos += [(V[m][0] @ mean_grad[m]).item() / mean_grad[m].norm().item() for m in V]
        bases = {"v_hack": [V], "shuffled": twins, "random": randoms,
                 "v_hack, common mode out": [without_common_mode(V, mean_grad)], "shuffled, common mode out": [without_common_mode(W, mean_grad) for W in twins]}
        for kind, g in kinds.items():
            held_g = {m: x[held] for m, x in g.items()}
            for name, bs in bases.items():
                scores[kind].setdefault(name, []).append(torch.stack([fractions(B, held_g) for B in bs]))
    null_pairs = read_v_hack(null_pairs_path).V if null_pairs_path else None
    cos = torch.tensor(cos)
    print(f"{n} pairs, {FOLDS} folds, {SHUFFLES} shuffled twins, {RANDOM} random bases; mean over held-out pairs (twins and bases: mean / p95 of their means)")
    print(f"cos of v_hack's axis with the completions' mean gradient, per module and fold: median {cos.median():.3f}, mean |cos| {cos.abs().mean():.3f}")
    print("| gradient | v_hack | shuffled twins | random bases |" + (" null-pairs basis |" if null_pairs else "") + " v_hack, common mode out | shuffled, common mode out |")
    print("|---|---|---|---|" + ("---|" if null_pairs else "") + "---|---|")
    for kind, by_basis in scores.items():
        mean = {name: torch.cat(folds, dim=1).mean(dim=1) for name, folds in by_basis.items()}  # per basis: mean over held-out pairs
        spread = lambda name: f"{mean[name].mean():.3f} / {mean[name].quantile(0.95):.3f}"
        null_said = f" {fractions(null_pairs, kinds[kind]).mean():.3f} |" if null_pairs else ""
        print(f"| {kind} | {mean['v_hack'].item():.3f} | {spread('shuffled')} | {spread('random')} |{null_said} "
              f"{mean['v_hack, common mode out'].item():.3f} | {spread('shuffled, common mode out')} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
