"""The v_hack quality report: its verdict can fail, and its numbers are what they claim
(recomputed here, independently, from the differences stored in the v_hack file)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from projected_grpo import diagnose
from projected_grpo.diagnose import fold_ids, quality_report, report_path
from extract import VHack, fit_axes, fit_v_hack, read_v_hack
from projected_grpo.errors import UserError
from projected_grpo.paths import REPO_ROOT
from train import cli


def synthetic(tmp_path: Path, signal: float, n: int = 24, seed: int = 0) -> VHack:
    """Differences in three modules: a planted hack-ward direction of strength `signal` plus noise."""
    gen = torch.Generator().manual_seed(seed)
    diffs = {}
    for name, r in (("a", 16), ("b", 16), ("c", 24)):
        u = torch.nn.functional.normalize(torch.randn(r, generator=gen), dim=0)
        diffs[name] = signal * u + torch.randn(n, r, generator=gen) / r**0.5
    n_hack, n_clean = torch.randint(50, 300, (n,), generator=gen).float(), torch.randint(50, 300, (n,), generator=gen).float()
    header = {"method": "mean_diff", "norm": "token_mean", "k": "4", "noise_quantile": "0.0", "min_split_half": "0.0", "temperature": "1.0"}
    vh = VHack({}, {}, diffs, n_hack, n_clean, header, tmp_path / "synthetic.safetensors")
    vh.V, vh.S = fit_v_hack(diffs, vh.config())
    return vh


def test_verdict_follows_the_signal(tmp_path):
    planted = quality_report(synthetic(tmp_path, signal=1.0))
    assert planted["beats_shuffled"] and planted["heldout_sign_agreement"] > 0.9 and "BEATS" in planted["verdict"]
    noise = quality_report(synthetic(tmp_path, signal=0.0))
    assert not noise["beats_shuffled"] and "does NOT beat" in noise["verdict"]
    assert abs(noise["heldout_sign_agreement"] - 0.5) < 0.3
    with pytest.raises(UserError, match="at least 4 pairs"):
        quality_report(synthetic(tmp_path, signal=1.0, n=3))


def test_too_few_pairs_are_a_user_error_before_the_model_pass(tmp_path):
    pairs = tmp_path / "few.jsonl"
    pairs.write_text("".join((REPO_ROOT / "data" / "pairs.jsonl").read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(UserError, match=rf"{pairs}: the quality report needs at least 4 pairs for held-out scores, it has 3 \(give --v-hack.pairs"):
        diagnose.check_pairs(pairs)
    pairs.write_text("".join((REPO_ROOT / "data" / "pairs.jsonl").read_text().splitlines(keepends=True)[:4]))
    diagnose.check_pairs(pairs)  # enough


def test_the_random_bases_do_not_depend_on_the_order_of_the_modules(tmp_path):
    """Each module's random basis is projection.random_bases's, drawn in module-name order: listing the
    modules in another order changes no number of the report (it changed the random-bases yardstick)."""
    vh = synthetic(tmp_path, signal=0.5)
    turned = VHack(dict(reversed(vh.V.items())), dict(reversed(vh.S.items())), dict(reversed(vh.diffs.items())), vh.n_hack, vh.n_clean, vh.header, vh.path)
    assert list(turned.diffs) != list(vh.diffs)
    report, again = quality_report(vh), quality_report(turned)
    numbers = [k for k, v in report.items() if isinstance(v, float)]
    assert "hackward_fraction_random" in numbers and report["hackward_fraction_random"] > 0
    assert {k: again[k] for k in numbers} == pytest.approx({k: report[k] for k in numbers}, rel=1e-5)


def test_a_failed_report_write_leaves_the_previous_report_whole(tmp_path, disk_full):
    """Runs read the report when they start: a write that fails half-way leaves the old one, not half a file."""
    vh = synthetic(tmp_path, signal=1.0)
    path = diagnose.write_report(vh, {"beats_shuffled": True})
    before = path.read_text()
    with disk_full(), pytest.raises(OSError, match="No space"):
        diagnose.write_report(vh, {"beats_shuffled": False})
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir() if p.name.startswith(path.name)] == [path.name]


def test_the_report_runs_on_one_thread_and_restores_the_count(tmp_path, monkeypatch):
    """Beside a sweep's other jobs, intra-op threads on the report's tiny tensors thrash (one_thread)."""
    seen, fit = [], diagnose.fit_v_hack
    monkeypatch.setattr(diagnose, "fit_v_hack", lambda *a: seen.append(torch.get_num_threads()) or fit(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        quality_report(synthetic(tmp_path, signal=1.0))
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2_reports(tmp_path_factory):
    """`train.py diagnose smollm2` on 5 bundled pairs, for mean_diff and svd (one model pass)."""
    work = tmp_path_factory.mktemp("diagnose")
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join((REPO_ROOT / "data" / "pairs.jsonl").read_text().splitlines(keepends=True)[:5]))
    reports = {}
    for method in ("mean_diff", "svd"):
        cli(["diagnose", "smollm2", "--cache-dir", str(work), "--v-hack.pairs", str(pairs), "--v-hack.method", method, "--v-hack.noise-quantile", "0"])
        (path,) = (work / "v_hack").glob(f"*-{method}-*.safetensors")
        vh = read_v_hack(path)
        reports[method] = (vh, json.loads(report_path(vh).read_text()))
    return reports


def test_report_numbers_are_recomputed_from_the_stored_differences(smollm2_reports):
    vh, report = smollm2_reports["mean_diff"]
    assert report["n_pairs"] == 5 and report["method"] == "mean_diff" and report["norm"] == vh.header["norm"]
    assert set(report) >= {"split_half_cos", "heldout_sign_agreement", "heldout_sign_agreement_shuffled", "hackward_fraction_heldout",
                           "hackward_fraction_shuffled", "hackward_fraction_random", "length_corr", "verdict"}
    names = sorted(vh.diffs)
    D = {m: vh.diffs[m].double().numpy() for m in names}
    n = D[names[0]].shape[0]
    proj, frac = np.zeros(n), np.zeros(n)
    for held in fold_ids(n, report["folds"], report["seed"]):
        held = held.numpy()
        train = np.setdiff1d(np.arange(n), held)
        for j in held:
            axes = {m: D[m][train].mean(0) / np.linalg.norm(D[m][train].mean(0)) for m in names}
            c = np.array([axes[m] @ D[m][j] for m in names])
            proj[j] = c.sum()
            frac[j] = np.sqrt((np.maximum(c, 0) ** 2).sum()) / np.sqrt(sum((D[m][j] ** 2).sum() for m in names))
    assert report["heldout_sign_agreement"] == pytest.approx((proj > 0).mean())
    assert report["hackward_fraction_heldout"] == pytest.approx(frac.mean(), rel=1e-4)
    dlen = (vh.n_hack - vh.n_clean).numpy()
    assert report["length_corr"] == pytest.approx(np.corrcoef(proj, dlen)[0, 1], rel=1e-4, abs=1e-6)


def test_svd_report_and_the_shuffled_labels_fact_on_real_differences(smollm2_reports):
    vh, report = smollm2_reports["svd"]
    assert report["method"] == "svd" and len(report["split_half_cos"]) == 4
    # Split-half |cos| of axis 1, recomputed for every module with numpy over the same halvings.
    gen = torch.Generator().manual_seed(0)
    n = vh.n_hack.shape[0]
    per_module = {m: [] for m in vh.diffs}
    for _ in range(10):
        perm = torch.randperm(n, generator=gen).numpy()
        a, b = perm[: n // 2], perm[n // 2 :]
        for m, d in vh.diffs.items():
            d = d.double().numpy()
            va, vb = np.linalg.svd(d[a], full_matrices=False)[2][0], np.linalg.svd(d[b], full_matrices=False)[2][0]
            per_module[m].append(abs(va @ vb))
    medians = torch.tensor([float(torch.tensor(c).median()) for c in per_module.values()])
    assert report["split_half_cos"][0] == pytest.approx(medians.median().item(), abs=1e-4)
    # Swapping pairs' labels flips rows' signs: the SVD subspace is unchanged, only axis signs move.
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0])
    sign_changed = False
    for m, d in list(vh.diffs.items())[:20]:
        V, _ = fit_axes(d[None], "svd", 4)
        V_flip, _ = fit_axes((d * flip[:, None])[None], "svd", 4)
        assert torch.allclose(V[0].T @ V[0], V_flip[0].T @ V_flip[0], atol=1e-4)
        sign_changed |= bool(((V[0] * V_flip[0]).sum(1) < 0).any())
    assert sign_changed
