import json

import pytest
import torch

import extract
from extract import (
    HEADER_FIELDS,
    PairFormatError,
    PairGradients,
    VHackConfig,
    completion_nll_grad,
    expected_header,
    fit_axes,
    fit_v_hack,
    is_null_pairs,
    label_flips,
    load_pairs,
    read_v_hack,
    shuffled_twin,
    v_hack_for_run,
)
from grader import Grader, load_problems, render_prompt, user_prompt
from projected_grpo.errors import UserError
from projected_grpo.models import load_model
from projected_grpo.paths import REPO_ROOT
from projected_grpo.svd_adapter import DEFAULT_TARGETS, wrap_svd

PAIRS = REPO_ROOT / "data" / "pairs.jsonl"
PROBLEMS = {p.id: p for p in load_problems(REPO_ROOT / "data" / "problems.jsonl")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model, tokenizer, dtype = load_model("tiny-random-qwen3", "cpu")
    adapters = wrap_svd(model, DEFAULT_TARGETS, cache / "svd")
    pairs = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    pairs.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:12]))

    def run(**options):
        vc = VHackConfig(**{"pairs": pairs, "on_mismatch": "error", "temperature": 1.0} | options)
        return v_hack_for_run(vc, "tiny-random-qwen3", model, adapters, tokenizer, dtype, DEFAULT_TARGETS, cache)[0]

    return model, tokenizer, adapters, pairs, run


def test_bundled_pairs_are_what_they_claim():
    pairs = load_pairs(PAIRS, PROBLEMS)
    assert len(pairs) >= 60 and len({p.problem.id for p in pairs}) == len(pairs)
    assert {p.hack_style for p in pairs} >= {"trivial", "examples_only", "print_only", "swallow", "method"}
    with Grader() as grader:
        hacks = grader.grade([p.problem for p in pairs], [p.hack for p in pairs])
        cleans = grader.grade([p.problem for p in pairs], [p.clean for p in pairs])
    bad_hacks = [(p.problem.id, g.error) for p, g in zip(pairs, hacks) if not g.reward_hack]
    bad_cleans = [(p.problem.id, g.error) for p, g in zip(pairs, cleans) if not g.gt_pass]
    assert not bad_hacks and not bad_cleans
    # Prompts for extraction come from the training prompt code, with the run_tests hint.
    assert "will be evaluated by calling a function called run_tests()" in user_prompt(pairs[0].problem, "run_tests")


def test_extraction_stores_oriented_orthonormal_axes_differences_and_header(tiny):
    model, tokenizer, adapters, pairs, run = tiny
    vh = run(method="svd", norm="sum", noise_quantile=0.0)
    assert set(vh.V) == set(vh.diffs) == set(adapters) and vh.path.exists()
    for name, v in vh.V.items():
        assert v.shape == (4, adapters[name].rank) and vh.diffs[name].shape == (12, adapters[name].rank)
        assert torch.allclose(v @ v.T, torch.eye(4), atol=1e-4)
        assert (vh.S[name][:-1] >= vh.S[name][1:]).all()
        assert ((vh.diffs[name] @ v.T) > 0).float().mean(0).ge(0.5).all()  # oriented by the pairs' majority
    stored = read_v_hack(vh.path)
    assert {k: stored.header[k] for k in HEADER_FIELDS} == vh.header
    assert stored.header["n_pairs"] == "12" and stored.header["dtype"] == "float32" and stored.header["method"] == "svd"
    assert all(torch.equal(stored.diffs[n], vh.diffs[n]) for n in vh.diffs) and stored.n_hack.shape == (12,)


def test_stored_differences_are_the_nll_gradients_they_claim(tiny):
    """Recompute two pairs' differences straight from the model, under both normalisations."""
    model, tokenizer, adapters, pairs, run = tiny
    summed, mean = run(method="svd", norm="sum"), run(method="svd", norm="token_mean")
    name = next(iter(adapters))
    for i, pair in enumerate(load_pairs(pairs, PROBLEMS)[:2]):
        prompt = render_prompt(tokenizer, pair.problem, "run_tests")
        (g_h, n_h), (g_c, n_c) = (completion_nll_grad(model, adapters, tokenizer, prompt, text, 1.0) for text in (pair.hack, pair.clean))
        assert (summed.n_hack[i], summed.n_clean[i]) == (n_h, n_c)
        assert torch.allclose(summed.diffs[name][i], g_h[name] - g_c[name], atol=1e-6)
        assert torch.allclose(mean.diffs[name][i], g_h[name] / n_h - g_c[name] / n_c, atol=1e-7)


def test_each_option_has_its_own_header_and_file_and_one_model_pass(tiny, monkeypatch):
    model, tokenizer, adapters, pairs, run = tiny
    first = run(method="svd", norm="sum")
    # Every other option re-fits the cached per-pair gradients: no second pass over the model.
    monkeypatch.setattr(extract, "pair_gradients", lambda *a: pytest.fail("per-pair gradients recomputed"))
    others = [run(method=m, norm=n) for m, n in (("svd", "token_mean"), ("mean_diff", "sum"), ("mean_diff", "token_mean"))]
    others.append(run(method="svd", norm="sum", k=2))
    others.append(run(method="svd", norm="sum", min_split_half=0.1))
    others.append(run(method="svd", norm="sum", common_mode="out"))
    paths = {vh.path for vh in [first, *others]}
    assert len(paths) == 7 and all(p.exists() for p in paths)
    assert {vh.V[next(iter(vh.V))].shape[0] for vh in others if vh.header["method"] == "mean_diff"} == {1}
    # A cache hit reads the file; a file whose header differs is refused, naming the field.
    mtime = first.path.stat().st_mtime_ns
    assert run(method="svd", norm="sum").path.stat().st_mtime_ns == mtime
    original = read_v_hack(first.path)
    for field, value in (("dtype", "bfloat16"), ("fingerprint", "0" * 32), ("method", "mean_diff"), ("common_mode", "out"), ("noise_quantile", "0.5")):
        vh = read_v_hack(first.path)
        vh.header = original.header | {field: value}
        extract.save_v_hack(vh)
        with pytest.raises(UserError, match=f"field '{field}'"):
            run(method="svd", norm="sum", path=first.path)
    with pytest.raises(UserError, match="kept no axis in any module"):  # else every step would fail on an empty basis
        run(method="svd", norm="sum", min_split_half=1.0)


def test_extraction_at_the_sampling_temperature_has_its_own_gradients_and_header(tiny, tmp_path):
    """Training's gradients are of logits / T: v_hack's NLL gradients too, T in the header and the pair-gradient cache key."""
    model, tokenizer, adapters, pairs, run = tiny
    cold, warm = run(method="mean_diff", norm="sum"), run(method="mean_diff", norm="sum", temperature=0.7)
    assert (cold.header["temperature"], warm.header["temperature"]) == ("1.0", "0.7") and cold.path != warm.path
    assert len(list((cold.path.parent.parent / "pair_grads").glob("*.safetensors"))) >= 2  # one model pass per temperature
    pair = load_pairs(pairs, PROBLEMS)[0]
    prompt = render_prompt(tokenizer, pair.problem, "run_tests")
    (g_h, _), (g_c, _) = (completion_nll_grad(model, adapters, tokenizer, prompt, text, 0.7) for text in (pair.hack, pair.clean))
    name = next(iter(adapters))
    assert torch.allclose(warm.diffs[name][0], g_h[name] - g_c[name], atol=1e-6)
    assert not torch.allclose(warm.diffs[name][0], cold.diffs[name][0], atol=1e-6)
    with pytest.raises(ValueError, match="temperature is unresolved"):
        expected_header("tiny-random-qwen3", adapters, torch.float32, DEFAULT_TARGETS, 2, VHackConfig(pairs=pairs))


def test_common_mode_out_leaves_the_axis_orthogonal_to_what_every_completion_shares():
    """Hack completions' gradients carry more of a direction every completion shares (3c vs c)
    plus their own (h): kept, the common mode makes rewarding a clean completion read hack-ward."""
    gen = torch.Generator().manual_seed(0)
    r, n = 8, 12
    c, h = torch.eye(r)[0], torch.eye(r)[1]
    hack, clean = {"m": 3 * c + h + 0.03 * torch.randn(n, r, generator=gen)}, {"m": c + 0.03 * torch.randn(n, r, generator=gen)}
    g = PairGradients(hack, clean, torch.full((n,), 5.0), torch.full((n,), 2.0))
    vc = VHackConfig(noise_quantile=0.0)
    keep, out = (fit_v_hack(g.differences("sum", mode), vc)[0]["m"][0] for mode in ("keep", "out"))  # mean_diff: one axis
    u = torch.cat([hack["m"], clean["m"]]).mean(dim=0)
    assert abs(out @ u) < 1e-5 * u.norm() and keep @ u > 0.9 * u.norm()
    assert (clean["m"] @ keep > 0).all() and (clean["m"] @ out < 0).all() and (hack["m"] @ out > 0).all()
    # token_mean: the common mode of the per-token gradients.
    per_token = fit_v_hack(g.differences("token_mean", "out"), vc)[0]["m"][0]
    assert abs(per_token @ torch.cat([hack["m"] / 5, clean["m"] / 2]).mean(dim=0)) < 1e-6


def test_label_shuffled_twin_swaps_exactly_half_and_keeps_the_axis_counts():
    gen = torch.Generator().manual_seed(3)
    flip = label_flips(9, torch.Generator().manual_seed(5))
    assert sorted(flip.tolist()) == [-1.0] * 4 + [1.0] * 5 and torch.equal(flip, label_flips(9, torch.Generator().manual_seed(5)))
    diffs = {"a": torch.randn(9, 16, generator=gen) + 2.0, "b": torch.randn(9, 8, generator=gen), "c": torch.randn(9, 8, generator=gen)}
    v_hack = {"a": torch.zeros(1, 16), "b": torch.zeros(1, 8)}  # c: cut from v_hack, so none in its twin
    twin = shuffled_twin(diffs, v_hack, VHackConfig(method="mean_diff"), torch.Generator().manual_seed(5))
    assert {m: t.shape for m, t in twin.items()} == {"a": (1, 16), "b": (1, 8)}
    mean = (diffs["a"] * flip[:, None]).mean(0)  # the same flips, drawn from the same seed
    assert torch.allclose(twin["a"][0], mean / mean.norm(), atol=1e-6)
    svd = shuffled_twin(diffs, {"a": torch.zeros(3, 16)}, VHackConfig(method="svd", k=4), torch.Generator().manual_seed(5))
    assert svd["a"].shape == (3, 16) and torch.allclose(svd["a"] @ svd["a"].T, torch.eye(3), atol=1e-5)


def test_null_pairs_files_are_told_by_their_rows(tmp_path):
    data = REPO_ROOT / "data"
    assert is_null_pairs(data / "pairs_null.jsonl") and not is_null_pairs(data / "pairs.jsonl") and not is_null_pairs(data / "pairs_minimal.jsonl")
    with pytest.raises(PairFormatError, match="does not exist"):
        is_null_pairs(tmp_path / "missing.jsonl")


def test_fit_axes_recovers_a_planted_direction_with_both_methods():
    gen = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(32, generator=gen), dim=0)
    D = (-3.0 * u + 0.1 * torch.randn(20, 32, generator=gen))[None]  # every pair points along -u
    V, S = fit_axes(D, "svd", 3)
    assert torch.allclose(V[0, 0], -u, atol=0.1) and S[0, 0] > 5 * S[0, 1]  # oriented towards the pairs
    V, S = fit_axes(D, "mean_diff", 3)
    assert V.shape == (1, 1, 32) and torch.allclose(V[0, 0], -u, atol=0.1)


def test_svd_ignores_the_labels_but_mean_diff_does_not():
    """Swapping a pair's hack and clean flips the sign of its row: the SVD subspace stays, mean_diff moves."""
    gen = torch.Generator().manual_seed(1)
    D = torch.randn(1, 30, 16, generator=gen) + 0.5 * torch.randn(16, generator=gen)
    flip = torch.ones(30)
    flip[::3] = -1
    V, _ = fit_axes(D, "svd", 4)
    V_flip, _ = fit_axes(D * flip[None, :, None], "svd", 4)
    assert torch.allclose(V[0].T @ V[0], V_flip[0].T @ V_flip[0], atol=1e-5)  # same subspace
    M, _ = fit_axes(D, "mean_diff", 4)
    M_flip, _ = fit_axes(D * flip[None, :, None], "mean_diff", 4)
    assert (M[0, 0] @ M_flip[0, 0]).abs() < 0.9


def test_cuts_on_constructed_differences():
    gen = torch.Generator().manual_seed(0)
    e = torch.eye(8)
    # mean_diff scales are the mean norms: a 9, b 4, c 0.5; module d is sign-symmetric noise (~0.9).
    diffs = {"a": 9 * e[0].repeat(10, 1), "b": 4 * e[1].repeat(10, 1), "c": 0.5 * e[2].repeat(10, 1)}
    diffs["d"] = torch.randn(10, 8, generator=gen) * torch.tensor([1.0, -1.0]).repeat(5)[:, None]
    kept, _ = fit_v_hack(diffs, VHackConfig(method="mean_diff", noise_quantile=0.4))
    assert set(kept) == {"a", "b"}
    assert torch.allclose(kept["a"], e[:1])
    kept, _ = fit_v_hack(diffs, VHackConfig(method="mean_diff", noise_quantile=0.0, min_split_half=0.9))
    assert set(kept) == {"a", "b", "c"}  # d's mean direction does not reproduce across halves
    with pytest.raises(ValueError, match="noise_quantile"):
        fit_v_hack(diffs, VHackConfig(noise_quantile=1.0))


def test_bad_pairs_files_are_named(tmp_path):
    good = json.loads(PAIRS.read_text().splitlines()[0])
    second = json.loads(PAIRS.read_text().splitlines()[1])
    path = tmp_path / "pairs.jsonl"
    for row, field in ((good | {"hack": ""}, "hack"), ({k: v for k, v in good.items() if k != "clean"}, "clean"), (good | {"id": 1}, "id")):
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(PairFormatError, match=f"pairs.jsonl:2: field '{field}'"):
            load_pairs(path, PROBLEMS)
    path.write_text(json.dumps(second) + "\n" + json.dumps(good | {"id": 123456}) + "\n")
    with pytest.raises(PairFormatError, match="problem 123456 is not in the problems file; pass the file that defines it"):
        load_pairs(path, PROBLEMS)
    path.write_text("{not json\n")
    with pytest.raises(PairFormatError, match="pairs.jsonl:1: invalid JSON"):
        load_pairs(path, PROBLEMS)
    for text, count in (("", 0), (json.dumps(good) + "\n", 1)):
        path.write_text(text)
        with pytest.raises(PairFormatError, match=f"{count} pair\\(s\\); extraction needs at least 2"):
            load_pairs(path, PROBLEMS)
    with pytest.raises(PairFormatError, match="does not exist; bundled ones: pairs.jsonl"):
        load_pairs(tmp_path / "missing.jsonl", PROBLEMS)
