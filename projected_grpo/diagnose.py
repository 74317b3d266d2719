"""The quality report of a v_hack: is the basis about hacking, or only about how the pairs'
completions differ?

Computed from the per-pair differences stored in the v_hack file (no pass over the model),
with the file's own fit options (method, norm, k, cuts), on held-out pairs:

- `split_half_cos`: per axis rank, the median over modules of the median over HALVINGS
  random halvings of |cos| between the axis fit on one half of the pairs and on the other.
- k-fold (pairs in a seeded random order cut into `folds` chunks): the basis is fit on the
  other folds and scored on each held-out pair's difference d:
  - `heldout_sign_agreement`: fraction of held-out pairs whose projection on each module's
    first kept axis, summed over modules, is > 0 (hack-ward; 0.5 = chance);
  - `hackward_fraction_heldout`: mean over held-out pairs of ||relu(V d)|| / ||d|| over all of
    delta_S (the `cin` of training, applied to a pair's difference);
  - `length_corr`: Pearson correlation of that summed projection with the hack-minus-clean
    token-length difference (a basis that encodes length shows |length_corr| near 1).
- Controls, measured the same way: the label-shuffled twin (a random half of the pairs get
  hack and clean swapped before fitting, `shuffles` times; held-out pairs keep their true
  labels) gives `*_shuffled` (mean) and `*_shuffled_p95`; random orthonormal bases
  with the same per-module axis counts as each fold's basis (projection.random_bases, as
  training's empirical null draws them, from a stream of their own) give
  `hackward_fraction_random`.

The verdict: the basis beats its label-shuffled twin when both its held-out sign agreement
and its held-out hack-ward fraction exceed the 95th percentile of the shuffled twins'.
For `svd` a shuffled twin spans the same subspace (SVD ignores a row's sign), so only the
orientation can carry the labels; for `mean_diff` the labels shape the axis itself.
"""

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from extract import VHack, VHackConfig, fit_v_hack, label_flips, split_half_cos
from projection import random_bases
from grader import jsonl_rows
from projected_grpo.errors import UserError
from projected_grpo.paths import write_atomic

MIN_PAIRS = 4


def check_pair_count(n: int, source: Path) -> None:
    """UserError unless `n` pairs (those of `source`) are enough for the report's held-out scores."""
    if n < MIN_PAIRS:
        raise UserError(f"{source}: the quality report needs at least {MIN_PAIRS} pairs for held-out scores, it has {n}",
                        f"give --v-hack.pairs a file of at least {MIN_PAIRS} pairs")


def check_pairs(path: Path) -> None:
    """check_pair_count on a pairs file's rows, before the model pass that extracts v_hack from
    it. Rows are counted, not checked: a missing or malformed file is left to the loader, which
    names it."""
    try:
        n = sum(1 for _ in jsonl_rows(path))
    except (OSError, ValueError):
        return
    check_pair_count(n, path)


def fold_ids(n: int, folds: int, seed: int) -> list[Tensor]:
    """A seeded random order of range(n) cut into `folds` near-equal chunks."""
    return list(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tensor_split(folds))


def heldout(diffs: dict[str, Tensor], vc: VHackConfig, folds: list[Tensor], flip: Tensor, n_random: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair, scored by a basis fit on the other folds (training rows multiplied by `flip`):
    the summed first-axis projection, the hack-ward fraction, and the mean hack-ward fraction
    under `n_random` random orthonormal bases with the same axis counts (random_bases, drawn
    from `gen`)."""
    n = flip.shape[0]
    proj, frac, frac_random = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    norms = torch.sqrt(sum(d.double().square().sum(dim=1) for d in diffs.values()))  # ||d|| over all of delta_S
    for held in folds:
        train = torch.ones(n, dtype=torch.bool)
        train[held] = False
        V, _ = fit_v_hack({m: d[train] * flip[train, None] for m, d in diffs.items()}, vc)
        held_d = {m: diffs[m][held].double() for m in V}
        proj[held] = sum(held_d[m] @ V[m][0].double() for m in V).float() if V else 0.0
        frac[held] = (torch.sqrt(sum((held_d[m] @ V[m].double().T).clamp_min(0).square().sum(dim=1) for m in V)) / norms[held]).float() if V else 0.0
        for _ in range(n_random):
            Q = random_bases(V, gen)
            if V:
                frac_random[held] += (torch.sqrt(sum((held_d[m] @ Q[m].double().T).clamp_min(0).square().sum(dim=1) for m in V)) / norms[held]).float() / n_random
    return proj, frac, frac_random


def pearson(x: Tensor, y: Tensor) -> float | None:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.norm() * y.norm()).item()
    return (x @ y).item() / denom if denom > 0 else None


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch's intra-op threads set to one, restored after. The report is ~10^5 operations on
    tensors of a few thousand entries: threads gain nothing there (2.1 s with two, 2.5 s with one
    on 2 idle cores, smollm2-sized differences) and thrash beside other busy processes, as a
    sweep's jobs are (17-62 s with two vs 3.3-3.5 s with one; ~6 min on a 16-core GPU box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def quality_report(vh: VHack, folds: int = 5, shuffles: int = 20, n_random: int = 8, seed: int = 0) -> dict:
    """Every number of the report (see the module docstring), as a JSON-ready dict."""
    vc = vh.config()
    diffs = vh.diffs
    n = vh.n_hack.shape[0]
    check_pair_count(n, vh.path)
    fold_list = fold_ids(n, min(folds, n), seed)
    gen = torch.Generator().manual_seed(seed)
    bases_gen = torch.Generator().manual_seed(seed + 1)  # a stream of their own: the shuffles' labels do not depend on the random bases drawn
    proj, frac, frac_random = heldout(diffs, vc, fold_list, torch.ones(n), n_random, bases_gen)
    agree_sh, frac_sh = [], []
    for _ in range(shuffles):
        p, f, _ = heldout(diffs, vc, fold_list, label_flips(n, gen), 0, gen)
        agree_sh.append((p > 0).float().mean().item())
        frac_sh.append(f.mean().item())
    reproducibility = torch.stack(list(split_half_cos(diffs, vc.method, vc.k).values()))  # modules x axis rank
    agree, hackward = (proj > 0).float().mean().item(), frac.mean().item()
    p95 = lambda xs: torch.tensor(xs).quantile(0.95).item()
    report = {
        "n_pairs": n,
        "method": vc.method,
        "norm": vc.norm,
        "k": vc.k,
        "noise_quantile": vc.noise_quantile,
        "min_split_half": vc.min_split_half,
        "kept_axes": sum(v.shape[0] for v in vh.V.values()),
        "kept_modules": len(vh.V),
        "n_modules": len(diffs),
        "split_half_cos": [None if math.isnan(x) else x for x in reproducibility.nanmedian(dim=0).values.tolist()],
        "folds": len(fold_list),
        "heldout_sign_agreement": agree,
        "heldout_sign_agreement_shuffled": sum(agree_sh) / shuffles,
        "heldout_sign_agreement_shuffled_p95": p95(agree_sh),
        "hackward_fraction_heldout": hackward,
        "hackward_fraction_shuffled": sum(frac_sh) / shuffles,
        "hackward_fraction_shuffled_p95": p95(frac_sh),
        "hackward_fraction_random": frac_random.mean().item(),
        "length_corr": pearson(proj, vh.n_hack - vh.n_clean),
        "shuffles": shuffles,
        "random_bases": n_random,  # the key reports have always had
        "seed": seed,
    }
    report["beats_shuffled"] = agree > report["heldout_sign_agreement_shuffled_p95"] and hackward > report["hackward_fraction_shuffled_p95"]
    report["verdict"] = (
        f"v_hack {'BEATS' if report['beats_shuffled'] else 'does NOT beat'} its label-shuffled twin: held-out sign agreement "
        f"{agree:.2f} vs shuffled {report['heldout_sign_agreement_shuffled']:.2f} (95th pct {report['heldout_sign_agreement_shuffled_p95']:.2f}); "
        f"hack-ward fraction {hackward:.3f} vs shuffled {report['hackward_fraction_shuffled']:.3f} (95th pct {report['hackward_fraction_shuffled_p95']:.3f}), "
        f"random bases {report['hackward_fraction_random']:.3f}"
    )
    return report


def report_path(vh: VHack) -> Path:
    return vh.path.with_name(vh.path.stem + ".report.json")


GATE_NUMBERS = ("heldout_sign_agreement", "heldout_sign_agreement_shuffled_p95", "hackward_fraction_heldout", "hackward_fraction_shuffled_p95")


def quality_gate(vh: VHack) -> dict:
    """The verdict of this v_hack's quality report (`just diagnose`, written beside the file),
    as a run records it when it starts: `beats_shuffled` and the numbers behind it, or
    `beats_shuffled` None when there is no report of this very file (none, unreadable, or
    written for a file with another header)."""
    path = report_path(vh)
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        report = None
    if not isinstance(report, dict) or report.get("header") != vh.header:
        return {"report": None, "beats_shuffled": None}
    return {"report": str(path), "beats_shuffled": report["beats_shuffled"]} | {k: report[k] for k in GATE_NUMBERS}


def format_report(report: dict, pairs: Path) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)
    rows = [
        ("pairs", f"{pairs.name} (n={report['n_pairs']})"),
        ("method / norm / k", f"{report['method']} / {report['norm']} / {report['k']}"),
        ("kept axes (modules)", f"{report['kept_axes']} ({report['kept_modules']}/{report['n_modules']})"),
        ("split-half |cos| by axis", " / ".join(fmt(x) for x in report["split_half_cos"])),
        ("", "v_hack    shuffled (p95)    random"),
        ("held-out sign agreement", f"{fmt(report['heldout_sign_agreement'])}     {fmt(report['heldout_sign_agreement_shuffled'])} ({fmt(report['heldout_sign_agreement_shuffled_p95'])})     -"),
        ("held-out hack-ward fraction", f"{fmt(report['hackward_fraction_heldout'])}     {fmt(report['hackward_fraction_shuffled'])} ({fmt(report['hackward_fraction_shuffled_p95'])})     {fmt(report['hackward_fraction_random'])}"),
        ("length corr (projection, dlen)", fmt(report["length_corr"])),
    ]
    return "\n".join(f"{k:>32}  {v}" for k, v in rows) + "\n" + report["verdict"]


def write_report(vh: VHack, report: dict) -> Path:
    """The report beside its v_hack file, whole or not at all (paths.atomic): runs read it when they
    start (quality_gate), perhaps while a sweep's diagnose job writes it."""
    path = report_path(vh)
    write_atomic(path, json.dumps(report | {"v_hack": str(vh.path), "header": vh.header}, indent=2))
    return path
