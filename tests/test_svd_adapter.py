import pytest
import torch
from loguru import logger
from safetensors.torch import load_file

from projected_grpo.svd_adapter import (
    DEFAULT_TARGETS,
    SVDLinear,
    background_saves,
    cached_svds,
    merged,
    model_fingerprint,
    reference_mode,
    save_svd,
    svd_batches,
    svd_error,
    svd_fp32,
    svd_tolerance,
    weight_key,
    wrap_svd,
)
from projected_grpo.models import load_model


@pytest.fixture
def tiny(tmp_path, tiny_model_path):
    model, tokenizer, dtype = load_model(str(tiny_model_path), "cpu")
    ids = torch.randint(0, 5000, (2, 17), generator=torch.Generator().manual_seed(0))
    return model, ids, tmp_path / "svd"


def cached_svd(W, cache_dir):
    """One weight through wrap_svd's cache path: U, S, Vh and its key."""
    (svd,), (key,), _ = cached_svds([W], cache_dir)
    return *svd, key


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_identity_at_zero_and_reference_mode(tiny):
    model, ids, cache = tiny
    base = logits(model, ids)
    adapters = wrap_svd(model, DEFAULT_TARGETS, cache)
    assert len(adapters) == 7 * model.config.num_hidden_layers
    assert not any("lm_head" in n or "embed" in n for n in adapters)
    assert [p for p in model.parameters() if p.requires_grad] == [a.delta_S for a in adapters.values()]
    assert torch.equal(logits(model, ids), base)  # bit-identical at delta_S = 0
    for a in adapters.values():
        torch.nn.init.normal_(a.delta_S, std=0.1)
    moved = logits(model, ids)
    assert not torch.allclose(moved, base)
    with reference_mode(adapters):
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), moved)


def test_merge_unmerge_restores_weights(tiny):
    model, ids, cache = tiny
    adapters = wrap_svd(model, DEFAULT_TARGETS, cache)
    weights = {n: a.base.weight.detach().clone() for n, a in adapters.items()}
    for a in adapters.values():
        torch.nn.init.normal_(a.delta_S, std=0.1)
    hooked = logits(model, ids)
    with merged(adapters):
        assert not torch.equal(next(iter(adapters.values())).base.weight, next(iter(weights.values())))
        assert torch.allclose(logits(model, ids), hooked, atol=1e-4)
    assert all(torch.equal(a.base.weight, weights[n]) for n, a in adapters.items())
    assert torch.equal(logits(model, ids), hooked)


def test_a_merge_failing_partway_leaves_every_weight_unmerged(tiny, monkeypatch):
    """merged() on an error in the third merge (e.g. out of pinned memory): the two adapters
    merged before it are unmerged, and the model is the one it was before."""
    model, ids, cache = tiny
    adapters = wrap_svd(model, DEFAULT_TARGETS, cache)
    for a in adapters.values():
        torch.nn.init.normal_(a.delta_S, std=0.1)
    weights = {n: a.base.weight.detach().clone() for n, a in adapters.items()}
    merge, calls = SVDLinear.merge, []

    def failing_merge(self):
        calls.append(self)
        if len(calls) == 3:
            raise RuntimeError("pin_memory failed")
        merge(self)

    monkeypatch.setattr(SVDLinear, "merge", failing_merge)
    with pytest.raises(RuntimeError, match="pin_memory failed"):
        with merged(adapters):
            pass
    assert len(calls) == 3 and not any(a.merged for a in adapters.values())
    assert all(torch.equal(a.base.weight, weights[n]) for n, a in adapters.items())


def test_a_delta_file_of_other_shapes_is_a_user_error(tmp_path):
    """A delta_S file with this model's module names but other ranks (another model's) is the
    same UserError as one of other modules, not copy_'s RuntimeError; a matching one loads."""
    from safetensors.torch import save_file

    from projected_grpo.errors import UserError
    from projected_grpo.svd_adapter import load_delta

    adapters = {name: SVDLinear(torch.nn.Linear(6, 4), torch.eye(4), torch.ones(4), torch.eye(4, 6), "key") for name in ("a", "b")}
    path = tmp_path / "delta_S.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(5)}, path)
    with pytest.raises(UserError, match=r"other shapes than this model's adapters \(1 modules, e.g. b: \(5,\) vs \(4,\)\) \(evaluate or export it"):
        load_delta(adapters, path)
    save_file({"a": torch.ones(4), "b": torch.full((4,), 2.0)}, path)
    load_delta(adapters, path)
    assert torch.equal(adapters["b"].delta_S, torch.full((4,), 2.0))


def test_delta_branch_matches_dense_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7, bias=False)
    U, S, Vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)
    layer = SVDLinear(base, U, S, Vh, "key")
    layer.delta_S.data = torch.randn(7)
    x = torch.randn(3, 12)
    dense = x @ (base.weight + U @ torch.diag(layer.delta_S) @ Vh).T
    assert torch.allclose(layer(x), dense, atol=1e-5)


def test_svd_cache_hit_and_corrupt_entry(tmp_path, caplog):
    W = torch.randn(48, 32)
    U1, S1, Vh1, key = cached_svd(W, tmp_path)
    assert svd_error(W, U1, S1, Vh1) < 1e-5
    path = tmp_path / f"{key}.safetensors"
    assert path.exists()
    mtime = path.stat().st_mtime_ns
    U2, S2, Vh2, _ = cached_svd(W, tmp_path)
    assert torch.equal(U1, U2) and torch.equal(S1, S2) and torch.equal(Vh1, Vh2)
    assert path.stat().st_mtime_ns == mtime  # a hit does not rewrite
    # An entry that no longer reconstructs its weight is rejected and recomputed.
    from safetensors.torch import save_file

    save_file({"U": U1.contiguous(), "S": S1 * 2, "Vh": Vh1.contiguous()}, path)
    U3, S3, Vh3, _ = cached_svd(W, tmp_path)
    assert torch.allclose(S3, S1) and svd_error(W, U3, S3, Vh3) < 1e-5
    # So is a truncated file.
    path.write_bytes(path.read_bytes()[:100])
    U4, S4, Vh4, _ = cached_svd(W, tmp_path)
    assert svd_error(W, U4, S4, Vh4) < 1e-5


def test_second_load_uses_cache_and_same_results(tiny, tiny_model_path):
    model, ids, cache = tiny
    a1 = wrap_svd(model, DEFAULT_TARGETS, cache)
    n_files = len(list(cache.glob("*.safetensors")))
    assert n_files == len(a1)
    model2, _, _ = load_model(str(tiny_model_path), "cpu")
    a2 = wrap_svd(model2, DEFAULT_TARGETS, cache)
    assert len(list(cache.glob("*.safetensors"))) == n_files
    assert model_fingerprint(a1) == model_fingerprint(a2)
    for n in a1:
        assert torch.equal(a1[n].U, a2[n].U) and torch.equal(a1[n].Vh, a2[n].Vh)


def test_fingerprint_changes_with_weights(tiny):
    model, ids, cache = tiny
    a = wrap_svd(model, ("q_proj",), cache)
    f1 = model_fingerprint(a)
    other, _, _ = load_model("tiny-random-qwen3", "cpu")
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(1.001)
    assert model_fingerprint(wrap_svd(other, ("q_proj",), cache)) != f1


def test_bf16_cache_stores_the_adapter_dtype_and_checks_reconstruction(tmp_path):
    """U and Vh are cached in the weight's dtype (half the I/O of fp32 for a bf16 model), S in
    fp32; the reconstruction check uses that dtype's tolerance and still rejects a wrong entry."""
    from safetensors.torch import save_file

    from projected_grpo.svd_adapter import svd_tolerance, weight_key

    W = torch.randn(64, 40).to(torch.bfloat16)
    U, S, Vh, key = cached_svd(W, tmp_path)
    stored = load_file(tmp_path / f"{key}.safetensors")
    assert stored["U"].dtype == stored["Vh"].dtype == torch.bfloat16 and stored["S"].dtype == torch.float32
    assert 1e-4 < svd_error(W, U, S, Vh) < svd_tolerance(torch.bfloat16) < 0.05
    save_file({"U": stored["U"], "S": stored["S"] * 1.1, "Vh": stored["Vh"]}, tmp_path / f"{key}.safetensors")
    U2, S2, Vh2, _ = cached_svd(W, tmp_path)  # 10% off: rejected and recomputed
    assert torch.allclose(S2, S) and svd_error(W, U2, S2, Vh2) < svd_tolerance(torch.bfloat16)
    # The key follows content and position, not only the multiset of bytes.
    assert weight_key(W) != weight_key(W.flip(0)) and weight_key(W) == weight_key(W.clone())


def test_merge_writes_in_place_and_unmerges_from_the_host_copy(tiny):
    """A CUDA-graphed decode step keeps reading the weights' addresses: merge and unmerge must
    write into the same storage; the host copy is made once."""
    model, ids, cache = tiny
    adapters = wrap_svd(model, DEFAULT_TARGETS, cache)
    a = next(iter(adapters.values()))
    address, original = a.base.weight.data_ptr(), a.base.weight.detach().clone()
    torch.nn.init.normal_(a.delta_S, std=0.1)
    for _ in range(2):
        with merged(adapters):
            assert a.base.weight.data_ptr() == address and not torch.equal(a.base.weight, original)
        assert a.base.weight.data_ptr() == address and torch.equal(a.base.weight, original)
    assert a.W_host is not None and a.W_host.data_ptr() != address


def test_a_bf16_merge_errs_by_the_weights_rounding_and_the_updates_and_is_exact_at_zero():
    """merge() takes the update D = U diag(delta_S) Vh in the weight's dtype (tensor cores on a
    GPU): each merged bf16 entry is off the exact W + D by at most its own rounding (one bf16
    step) plus a bf16 matmul's (2^-7 of the entry's |U| |delta_S| |Vh|, which is small where D
    is small against W); at delta_S = 0 the weight is unchanged, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(96, 64, bias=False).to(torch.bfloat16)
    base.weight.data = torch.randn(64, 96, generator=gen).to(torch.bfloat16)
    U, S, Vh = torch.linalg.svd(base.weight.detach().float(), full_matrices=False)
    layer, original = SVDLinear(base, U, S, Vh, "key"), base.weight.detach().clone()
    layer.merge()
    assert torch.equal(base.weight, original)
    layer.unmerge()
    layer.delta_S.data = 0.1 * torch.randn(64, generator=gen)
    u, vh, d = layer.U.double(), layer.Vh.double(), layer.delta_S.detach().double()  # the bf16 U, Vh the adapter holds
    exact, spread = original.double() + (u * d) @ vh, (u.abs() * d.abs()) @ vh.abs()
    layer.merge()
    err = (base.weight.detach().double() - exact).abs()
    assert (err <= 2**-8 * exact.abs() + 2**-7 * spread).all()
    assert err.max() < 2**-8 * exact.abs().max()  # no entry off by more than a step of the largest


# ----------------------------------------------------------------------------
# Cache misses solved in batches of same-shape weights


def test_batched_svd_equals_per_matrix():
    """One batched call gives each matrix of the stack the SVD it gets alone (what the per-weight
    path computed): the same singular values and the same U diag(S) Vh (U and Vh may differ by
    column signs), in order."""
    torch.manual_seed(0)
    for shape in ((48, 32), (32, 48)):
        Ws = torch.randn(6, *shape) * torch.logspace(0, -3, shape[1])  # graded columns: singular values over 3 decades
        U, S, Vh = svd_fp32(Ws)
        for W, u, s, vh in zip(Ws, U, S, Vh):
            u1, s1, vh1 = torch.linalg.svd(W, full_matrices=False)
            assert torch.allclose(s, s1, rtol=1e-5, atol=1e-7)
            assert torch.allclose((u * s) @ vh, (u1 * s1) @ vh1, atol=1e-5)
            assert svd_error(W, u, s, vh) < svd_tolerance(torch.float32)


def test_batched_svd_recomputes_in_fp64_only_the_matrix_that_misses(monkeypatch):
    real_svd = torch.linalg.svd
    calls = []

    def svd_spoiling_one(A, **kwargs):  # the batched fp32 result of matrix 1 is 10% off
        calls.append((tuple(A.shape), A.dtype))
        U, S, Vh = real_svd(A, **kwargs)
        if A.ndim == 3:
            S[1] *= 1.1
        return U, S, Vh

    monkeypatch.setattr(torch.linalg, "svd", svd_spoiling_one)
    Ws = torch.randn(3, 40, 24)
    U, S, Vh = svd_fp32(Ws)
    assert calls == [((3, 40, 24), torch.float32), ((40, 24), torch.float64)]
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert all(svd_error(W, u, s, vh) < 1e-5 for W, u, s, vh in zip(Ws, U, S, Vh))


def test_a_stack_the_solver_refuses_is_solved_in_halves(monkeypatch):
    """cuSOLVER's batched gesvda fails its workspace query on stacks past a size (an H100 refused
    25 stacked 4096 x 2560 weights): such a stack is split until the solver takes each part, and
    every matrix gets the SVD it gets alone, in order. A single matrix's failure is raised."""
    real_svd = torch.linalg.svd
    calls = []

    def svd_refusing_stacks_of_3(A, **kwargs):
        calls.append(len(A) if A.ndim == 3 else 0)
        if A.ndim == 3 and len(A) >= 3:
            raise torch.linalg.LinAlgError("cusolver error: CUSOLVER_STATUS_INVALID_VALUE")
        return real_svd(A, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd_refusing_stacks_of_3)
    Ws = torch.randn(5, 40, 24, generator=torch.Generator().manual_seed(0))
    U, S, Vh = svd_fp32(Ws)
    assert calls == [5, 2, 3, 1, 2]  # 5 refused -> 2 + 3; 3 refused -> 1 + 2
    assert U.shape == (5, 40, 24) and S.shape == (5, 24) and Vh.shape == (5, 24, 24)
    for W, s, u, vh in zip(Ws, S, U, Vh):
        assert torch.allclose(s, torch.linalg.svdvals(W), rtol=1e-5) and svd_error(W, u, s, vh) < svd_tolerance(torch.float32)
    monkeypatch.setattr(torch.linalg, "svd", lambda A, **kwargs: (_ for _ in ()).throw(torch.linalg.LinAlgError("NaN")))
    with pytest.raises(torch.linalg.LinAlgError):
        svd_fp32(Ws[:2])


def test_svd_batches_group_same_shapes_within_the_budget():
    weights = [torch.zeros(8, 4), torch.zeros(4, 8), torch.zeros(8, 4), torch.zeros(8, 4, dtype=torch.bfloat16), torch.zeros(8, 4), torch.zeros(8, 4)]
    assert svd_batches(weights, 3 * 32) == [[0, 2, 4], [5], [1], [3]]  # a stack has one shape and one dtype
    assert svd_batches(weights, 31) == [[0], [2], [4], [5], [1], [3]]  # below one weight: one weight per batch
    assert svd_batches(weights, 0) == [[0], [2], [4], [5], [1], [3]]  # the benchmark's yardstick: one SVD per weight
    assert svd_batches(weights) == [[0, 2, 4, 5], [1], [3]]  # the default budget


def toy_model(dtype: torch.dtype) -> torch.nn.Module:
    """Three layers of q_proj, k_proj, o_proj: three shapes, three weights of each."""
    torch.manual_seed(0)
    shapes = {"q_proj": (40, 48), "k_proj": (40, 24), "o_proj": (48, 40)}  # (d_in, d_out)
    return torch.nn.ModuleList(torch.nn.ModuleDict({t: torch.nn.Linear(*s) for t, s in shapes.items()}) for _ in range(3)).to(dtype)


def forbid_svd(*args, **kwargs):
    raise AssertionError("an SVD was computed where every entry should be a cache hit")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_and_single_entries_are_interchangeable(tmp_path, monkeypatch, dtype):
    """The key and the file format did not change with batching: every entry wrap_svd computed in
    batches (here of at most 2 weights) is a hit for cached_svd, with U and Vh in the weight's
    dtype and S in fp32; an entry written by the per-weight code is a hit for wrap_svd."""
    model = toy_model(dtype)
    adapters = wrap_svd(model, DEFAULT_TARGETS, tmp_path / "batched", batch_elements=2 * 48 * 40)
    assert list(adapters) == [f"{i}.{t}" for i in range(3) for t in ("q_proj", "k_proj", "o_proj")]
    for a in adapters.values():
        assert svd_error(a.base.weight, a.U, a.S, a.Vh) < svd_tolerance(dtype)
        assert torch.allclose(a.S, torch.linalg.svdvals(a.base.weight.double()).float(), rtol=1e-5, atol=1e-6)
    with monkeypatch.context() as m:
        m.setattr(torch.linalg, "svd", forbid_svd)
        for a in adapters.values():
            U, S, Vh, key = cached_svd(a.base.weight, tmp_path / "batched")
            assert key == a.weight_key and torch.equal(U, a.U) and torch.equal(S, a.S) and torch.equal(Vh, a.Vh)
            assert U.dtype == Vh.dtype == dtype and S.dtype == torch.float32
    # The per-weight code's entry: one torch.linalg.svd in fp32, U and Vh cast to the weight's dtype.
    other = toy_model(dtype)
    for layer in other:
        for base in layer.values():
            U, S, Vh = torch.linalg.svd(base.weight.detach().float(), full_matrices=False)
            save_svd({"U": U.to(dtype), "S": S, "Vh": Vh.to(dtype)}, tmp_path / "single" / f"{weight_key(base.weight)}.safetensors")
    with monkeypatch.context() as m:
        m.setattr(torch.linalg, "svd", forbid_svd)
        assert len(wrap_svd(other, DEFAULT_TARGETS, tmp_path / "single")) == 9


def test_wrap_loads_hits_and_computes_only_the_misses_in_batches(tiny, tiny_model_path, monkeypatch):
    """A cache holding some entries, missing some and with one corrupt: the hits are loaded as they
    are (not rewritten), the misses and the corrupt one (with its warning) computed, one batched
    SVD per shape among them, and the adapters come back in model order."""
    model, ids, cache = tiny
    first = wrap_svd(model, DEFAULT_TARGETS, cache)
    names = list(first)  # per layer: q 64x64, k 32x64, v 32x64, o 64x64, gate 128x64, up 128x64, down 64x128
    files = {n: cache / f"{a.weight_key}.safetensors" for n, a in first.items()}
    deleted, corrupt = names[1::3], names[2]  # layer 0's k, gate; layer 1's q, o, down
    for n in deleted:
        files[n].unlink()
    files[corrupt].write_bytes(b"not a safetensors file")
    hits = {n: files[n].stat().st_mtime_ns for n in names if n not in deleted and n != corrupt}
    real_svd, stacks, warnings = torch.linalg.svd, [], []

    def recording_svd(A, **kwargs):
        stacks.append(tuple(A.shape))
        return real_svd(A, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", recording_svd)
    model2, _, _ = load_model(str(tiny_model_path), "cpu")
    sink = logger.add(warnings.append, level="WARNING", format="{message}")
    try:
        second = wrap_svd(model2, DEFAULT_TARGETS, cache)
    finally:
        logger.remove(sink)
    assert list(second) == names
    assert stacks == [(2, 32, 64), (1, 128, 64), (2, 64, 64), (1, 64, 128)]  # layer 0's k with the corrupt v; layer 1's q with o
    assert len(warnings) == 1 and str(files[corrupt]) in warnings[0] and "unreadable" in warnings[0]
    assert all(files[n].stat().st_mtime_ns == mtime for n, mtime in hits.items())
    assert all(files[n].exists() for n in names)
    for n in names:
        a, b = first[n], second[n]
        assert model2.get_submodule(n) is b and svd_error(b.base.weight, b.U, b.S, b.Vh) < svd_tolerance(torch.float32)
        assert b.weight_key == a.weight_key and torch.allclose(b.S, a.S, rtol=1e-5)
        assert torch.allclose((b.U * b.S) @ b.Vh, (a.U * a.S) @ a.Vh, atol=1e-5)
        if n in hits:
            assert torch.equal(b.U, a.U) and torch.equal(b.Vh, a.Vh)


def test_background_saves_writes_every_entry_and_a_failed_write_raises_in_the_caller(tmp_path, monkeypatch):
    """The writer thread writes every entry (at most SAVE_BACKLOG wait for it): every file is
    written by the end, equal to its entry; a write that fails re-raises in the caller even when
    it is not the last."""
    entries = {tmp_path / f"{i}.safetensors": {"U": torch.randn(6, 4), "S": torch.rand(4), "Vh": torch.randn(4, 5)} for i in range(20)}
    with background_saves() as save:
        for path, tensors in entries.items():
            save(tensors, path)
    for path, tensors in entries.items():
        assert load_file(path).keys() == tensors.keys() and all(torch.equal(load_file(path)[k], t) for k, t in tensors.items())

    def failing(tensors, path):
        if path.name == "3.safetensors":
            raise OSError("disk full")
        save_svd(tensors, path)

    monkeypatch.setattr("projected_grpo.svd_adapter.save_svd", failing)
    with pytest.raises(OSError, match="disk full"), background_saves() as save:
        for path, tensors in entries.items():
            save(tensors, tmp_path / "again" / path.name)
