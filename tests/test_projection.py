import pytest
import math

import torch

from projection import Projector


def random_basis(k: int, r: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(r, k, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()  # k x r, orthonormal rows


def setup(gate="one_sided", apply=True):
    ranks = {"a": 16, "b": 16, "c": 8, "d": 24}  # d has no axes: must be untouched
    v_hack = {"a": random_basis(3, 16, 0), "b": random_basis(1, 16, 1), "c": random_basis(2, 8, 2)}
    grads = {n: torch.randn(r, generator=torch.Generator().manual_seed(10 + i)) for i, (n, r) in enumerate(ranks.items())}
    return Projector(v_hack, ranks, gate, apply), v_hack, grads


def test_no_gate_removes_subspace_and_keeps_the_rest():
    proj, V, g = setup("no_gate")
    before = {n: t.clone() for n, t in g.items()}
    proj(g)
    for n, v in V.items():
        assert torch.allclose(v @ g[n], torch.zeros(v.shape[0]), atol=1e-6)
        orth = lambda x: x - v.T @ (v @ x)
        assert torch.allclose(orth(g[n]), orth(before[n]), atol=1e-6)
    assert torch.equal(g["d"], before["d"])


def test_one_sided_removes_only_hackward_part():
    proj, V, g = setup("one_sided")
    before = {n: t.clone() for n, t in g.items()}
    stats = proj(g)
    for n, v in V.items():
        c_before, c_after = v @ before[n], v @ g[n]
        assert (c_after <= 1e-6).all()  # relu(V g') = 0
        neg = c_before < 0
        assert torch.allclose(c_after[neg], c_before[neg], atol=1e-6)  # anti-hack components kept
        orth = lambda x: x - v.T @ (v @ x)
        assert torch.allclose(orth(g[n]), orth(before[n]), atol=1e-6)
    assert torch.equal(g["d"], before["d"])
    assert stats.cout < 1e-6 < stats.cin


def test_removed_is_the_norm_of_what_the_projection_took_out():
    for gate in ("one_sided", "no_gate"):
        proj, V, g = setup(gate)
        before = {n: t.clone() for n, t in g.items()}
        stats = proj(g)
        norm = lambda d: math.sqrt(sum(t.square().sum().item() for t in d.values()))  # noqa: E731
        assert stats.removed == pytest.approx(norm({n: before[n] - g[n] for n in g}) / norm(before), rel=1e-5) and stats.removed > 0
        c = {n: v @ before[n] for n, v in V.items()}  # orthonormal rows: what goes has the norm of the removed coefficients
        kept = {n: (x.clamp_min(0) if gate == "one_sided" else x) for n, x in c.items()}
        assert stats.removed == pytest.approx(norm(kept) / norm(before), rel=1e-5)
        measured = Projector(V, {"a": 16, "b": 16, "c": 8, "d": 24}, gate, apply=False)(before)  # what it would remove, nothing changed
        assert measured.removed == pytest.approx(stats.removed, rel=1e-6)


def test_projecting_twice_changes_nothing():
    for gate in ("one_sided", "no_gate"):
        proj, _, g = setup(gate)
        proj(g)
        once = {n: t.clone() for n, t in g.items()}
        stats = proj(g)
        assert all(torch.allclose(g[n], once[n], atol=1e-6) for n in g)
        assert stats.cin < 1e-6 and stats.touched == 0.0


def test_measure_only_leaves_gradient_untouched():
    proj, V, g = setup("one_sided", apply=False)
    before = {n: t.clone() for n, t in g.items()}
    stats = proj(g)
    assert all(torch.equal(g[n], before[n]) for n in g)
    assert stats.cin == stats.cout > 0


def test_cin_matches_definition_and_null():
    proj, V, g = setup()
    hackward = sum((V[n] @ g[n]).clamp_min(0).square().sum() for n in V)
    total = sum(t.square().sum() for t in g.values())
    assert math.isclose(proj.hackward_fraction(g), math.sqrt(hackward / total), rel_tol=1e-5)
    assert math.isclose(proj.null, math.sqrt(6 / (2 * 64)), rel_tol=1e-9)


def test_null_baseline_is_what_random_gradients_give():
    proj, _, _ = setup()
    fractions = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(4000):
        g = {n: torch.randn(r, generator=gen) for n, r in {"a": 16, "b": 16, "c": 8, "d": 24}.items()}
        fractions.append(proj.hackward_fraction(g) ** 2)
    assert math.isclose(math.sqrt(sum(fractions) / len(fractions)), proj.null, rel_tol=0.05)


def test_zero_gradient_is_fine():
    proj, _, g = setup()
    g = {n: torch.zeros_like(t) for n, t in g.items()}
    stats = proj(g)
    assert stats.cin == 0.0 and stats.cout == 0.0 and stats.touched == 0.0
    assert all((t == 0).all() for t in g.values())


def test_touched_counts_modules():
    proj, V, g = setup("one_sided")
    for n, v in V.items():  # make module a purely anti-hack: nothing to remove there
        g[n] = -v.sum(0)
    assert proj(g).touched == 0.0
    g["a"] = V["a"][0].clone()
    assert proj(g).touched == 1 / 3


def test_random_bases_null_and_subspace_cos():
    from projection import EmpiricalNull, random_bases, subspace_cos

    proj, V, g = setup()
    R = random_bases(V, torch.Generator().manual_seed(0))
    assert {n: r.shape for n, r in R.items()} == {n: v.shape for n, v in V.items()}
    assert all(torch.allclose(r @ r.T, torch.eye(r.shape[0]), atol=1e-5) for r in R.values())
    ranks = {"a": 16, "b": 16, "c": 8, "d": 24}
    null = EmpiricalNull(V, ranks, 8, seed=3)
    fractions = null.fractions(g)
    assert fractions.shape == (8,) and torch.equal(fractions, EmpiricalNull(V, ranks, 8, seed=3).fractions(g))  # seeded
    assert torch.allclose(fractions, torch.tensor([Projector(b, ranks, "one_sided", False).hackward_fraction(g) for b in (
        random_bases(V, gen) for gen in [torch.Generator().manual_seed(3)] for _ in range(8))]))
    # A gradient inside v_hack's span: cin is 1 for its own basis, far less against random ones.
    inside = {n: (V[n].T @ torch.ones(V[n].shape[0])) if n in V else torch.zeros(r) for n, r in ranks.items()}
    assert proj.hackward_fraction(inside) > 0.99 and null.fractions(inside).max() < 0.9
    assert subspace_cos(V, V) == pytest.approx(1.0) and subspace_cos(V, R) < 0.8
    coefs = proj.axis_coefficients(g)
    assert torch.allclose(coefs, torch.cat([V[n] @ g[n] for n in sorted(V)]))
