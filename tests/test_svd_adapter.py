import pytest
import torch

from projected_grpo.svd_adapter import (
    DEFAULT_TARGETS,
    SVDLinear,
    cached_svd,
    merged,
    model_fingerprint,
    reference_mode,
    svd_error,
    wrap_svd,
)
from projected_grpo.models import load_model


@pytest.fixture
def tiny(tmp_path, tiny_model_path):
    model, tokenizer, dtype = load_model(str(tiny_model_path), "cpu")
    ids = torch.randint(0, 5000, (2, 17), generator=torch.Generator().manual_seed(0))
    return model, ids, tmp_path / "svd"


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
    from safetensors.torch import load_file, save_file

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
