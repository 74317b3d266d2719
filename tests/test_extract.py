import json

import pytest
import torch

from extract import (
    HEADER_FIELDS,
    PairFormatError,
    default_v_hack_path,
    expected_header,
    hack_basis,
    load_pairs,
    noise_cut,
    read_v_hack,
    resolve_v_hack,
)
from grader import Grader, load_problems, user_prompt
from svd_adapter import DEFAULT_TARGETS, REPO_ROOT, load_model, wrap_svd

PAIRS = REPO_ROOT / "data" / "pairs.jsonl"
PROBLEMS = {p.id: p for p in load_problems(REPO_ROOT / "data" / "problems.jsonl")}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model, tokenizer, dtype = load_model("tiny-random-qwen3", "cpu")
    adapters = wrap_svd(model, DEFAULT_TARGETS, cache / "svd")
    pairs = load_pairs(PAIRS, PROBLEMS)
    header = expected_header("tiny-random-qwen3", adapters, dtype, DEFAULT_TARGETS, PAIRS, len(pairs), 4, "constant")
    path = default_v_hack_path(header, cache / "v_hack")
    V, S = resolve_v_hack(model, adapters, tokenizer, header, pairs, path, "error")
    return model, tokenizer, adapters, pairs, header, path, V, S


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


def test_extraction_gives_oriented_orthonormal_bases_and_header(extracted):
    model, tokenizer, adapters, pairs, header, path, V, S = extracted
    assert set(V) == set(adapters) and path.exists()
    for name, v in V.items():
        assert v.shape == (4, adapters[name].rank)
        assert torch.allclose(v @ v.T, torch.eye(4), atol=1e-4)
        assert (S[name][:-1] >= S[name][1:]).all()
    _, _, found = read_v_hack(path)
    assert {k: found[k] for k in HEADER_FIELDS} == header
    assert found["n_pairs"] == str(len(pairs)) and found["dtype"] == "float32" and found["model"] == "tiny-random-qwen3"


def test_orientation_is_hackward_by_majority(extracted):
    """Recompute the per-pair differences for one module: most pairs project positively."""
    model, tokenizer, adapters, pairs, header, path, V, S = extracted
    from extract import completion_nll_grad
    from grader import render_prompt

    name = next(iter(adapters))
    diffs = []
    for pair in pairs[:12]:
        prompt = render_prompt(tokenizer, pair.problem, "run_tests")
        diffs.append(completion_nll_grad(model, adapters, tokenizer, prompt, pair.hack, "constant")[name]
                     - completion_nll_grad(model, adapters, tokenizer, prompt, pair.clean, "constant")[name])
    v, _ = hack_basis(torch.stack(diffs), 2)
    assert ((torch.stack(diffs) @ v.T) > 0).float().mean(0).ge(0.5).all()


def test_hack_basis_recovers_a_planted_direction():
    gen = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(32, generator=gen), dim=0)
    diffs = -3.0 * u + 0.1 * torch.randn(20, 32, generator=gen)  # every pair points along -u
    v, s = hack_basis(diffs, 3)
    assert torch.allclose(v[0], -u, atol=0.1)  # oriented towards the pairs, not the SVD's arbitrary sign
    assert s[0] > 5 * s[1]


def test_cache_hit_and_mismatched_header(extracted, caplog):
    model, tokenizer, adapters, pairs, header, path, V, S = extracted
    mtime = path.stat().st_mtime_ns
    V2, _ = resolve_v_hack(model, adapters, tokenizer, header, pairs, path, "error")
    assert path.stat().st_mtime_ns == mtime and all(torch.equal(V[n], V2[n]) for n in V)
    for field, value in (("dtype", "bfloat16"), ("model", "Qwen/Qwen3-4B"), ("fingerprint", "0" * 32), ("k", "8")):
        other = header | {field: value}
        with pytest.raises(ValueError, match=f"field '{field}'"):
            resolve_v_hack(model, adapters, tokenizer, other, pairs[:2], path, "error")
    # The extract policy re-extracts (here from 2 pairs) and overwrites with the new header.
    other = header | {"n_pairs": "2"}
    resolve_v_hack(model, adapters, tokenizer, other, pairs[:2], path, "extract")
    assert read_v_hack(path)[2]["n_pairs"] == "2"
    assert default_v_hack_path(other, path.parent) != default_v_hack_path(header, path.parent)


def test_noise_cut_on_constructed_example():
    V = {"a": torch.eye(3, 5), "b": torch.eye(2, 4), "c": torch.eye(2, 6)}
    S = {"a": torch.tensor([9.0, 5.0, 1.0]), "b": torch.tensor([8.0, 4.0]), "c": torch.tensor([2.0, 0.5])}
    # Pooled: 0.5 1 2 4 5 8 9; the 40% quantile is 2.8: drop 0.5, 1, 2 and module c.
    kept = noise_cut(V, S, 0.4)
    assert set(kept) == {"a", "b"}
    assert torch.equal(kept["a"], torch.eye(3, 5)[:2]) and torch.equal(kept["b"], torch.eye(2, 4))
    assert {n: v.shape[0] for n, v in noise_cut(V, S, 0.0).items()} == {"a": 3, "b": 2, "c": 2}
    with pytest.raises(ValueError):
        noise_cut(V, S, 1.0)


def test_malformed_pairs_are_named(tmp_path):
    good = json.loads(PAIRS.read_text().splitlines()[0])
    for row, field in ((good | {"hack": ""}, "hack"), ({k: v for k, v in good.items() if k != "clean"}, "clean"), (good | {"id": 1}, "id")):
        path = tmp_path / "pairs.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(PairFormatError, match=f"pairs.jsonl:2: field '{field}'"):
            load_pairs(path, PROBLEMS)
    path.write_text("{not json\n")
    with pytest.raises(PairFormatError, match="pairs.jsonl:1: invalid JSON"):
        load_pairs(path, PROBLEMS)
