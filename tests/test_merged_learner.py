"""The learner on merged weights (`MergedLinear`) against the adapter path it replaces: the same
output, the same gradients for x and delta_S, the weights restored bit for bit afterwards, and
rollouts (no_grad) still the plain base Linear."""

import pytest
import torch

from benchmarks.bench_step import largest_rel_diff
from projected_grpo.models import completion_logprobs, load_model
from projected_grpo.svd_adapter import DEFAULT_TARGETS, SVDLinear, merged, wrap_svd


def random_layer(d_in: int, d_out: int, bias: bool) -> SVDLinear:
    base = torch.nn.Linear(d_in, d_out, bias=bias)
    base.requires_grad_(False)
    U, S, Vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)
    layer = SVDLinear(base, U, S, Vh, "key")
    torch.nn.init.normal_(layer.delta_S, std=0.3)
    return layer


def output_and_grads(layer: SVDLinear, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, dL/dx and dL/d delta_S for L = sum(sin(y) * w), a loss whose dy varies per entry."""
    x = x.clone().requires_grad_(True)
    layer.delta_S.grad = None
    y = layer(x)
    (torch.sin(y) * w).sum().backward()
    return y.detach(), x.grad, layer.delta_S.grad


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within fp32 rounding of a few reductions, relative to the tensor's scale."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("d_in, d_out", [(12, 7), (7, 12)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(5,), (3, 4)], ids=["2d", "3d"])
def test_single_layer_matches_the_adapter_path(d_in, d_out, bias, lead):
    torch.manual_seed(0)
    layer = random_layer(d_in, d_out, bias)
    x, w = torch.randn(*lead, d_in), torch.randn(*lead, d_out)
    y0, dx0, dd0 = output_and_grads(layer, x, w)
    with merged({"layer": layer}):
        y1, dx1, dd1 = output_and_grads(layer, x, w)
        assert layer(x).grad_fn.name() == "MergedLinearBackward"
    assert_close(y1, y0)
    assert_close(dx1, dx0)
    assert_close(dd1, dd0)
    assert dd1.dtype == torch.float32


def test_backward_after_unmerge_raises():
    """dx would come from the restored W instead of the W' the forward used: autograd refuses."""
    layer = random_layer(8, 6, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    with merged({"layer": layer}):
        y = layer(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_rollouts_under_no_grad_are_the_plain_base_linear():
    torch.manual_seed(0)
    layer = random_layer(12, 7, bias=True)
    x = torch.randn(3, 12)
    with merged({"layer": layer}):
        with torch.no_grad():
            y = layer(x)
            assert y.grad_fn is None and torch.equal(y, layer.base(x))
        layer.delta_S.requires_grad_(False)  # nothing to train: no Function either
        y = layer(x)
        assert y.grad_fn is None and torch.equal(y, layer.base(x))


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 left-padded rows (prompt 4..8 tokens, completion 6..9), as the learner sees them."""
    gen = torch.Generator().manual_seed(0)
    rows = [(4, 9), (6, 7), (8, 6)]
    T = max(p + c for p, c in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros(len(rows), T - 1, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, T - p - c :] = torch.randint(100, 5000, (p + c,), generator=gen)
        attn[i, T - p - c :] = 1
        mask[i, T - c - 1 :] = True  # position j predicts token j + 1: the completion's tokens
    return ids, attn, mask


def delta_grads_of(model, adapters, batch) -> dict[str, torch.Tensor]:
    for a in adapters.values():
        a.delta_S.grad = None
    completion_logprobs(model, *batch).sum().backward()
    return {n: a.delta_S.grad.clone() for n, a in adapters.items()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_gradients_match_and_weights_restored(tmp_path, tiny_model_path, checkpointing):
    """completion_logprobs over a padded batch: delta_S grads under `merged` equal the adapter
    path's within 1e-4 of each adapter's largest entry (fp32; measured ~1e-6), with and without
    activation checkpointing (the recompute runs on the merged path too)."""
    model, _, dtype = load_model(str(tiny_model_path), "cpu", "float32")
    assert dtype == torch.float32
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # HF checkpoints only in training mode
    adapters = wrap_svd(model, DEFAULT_TARGETS, tmp_path / "svd")
    torch.manual_seed(0)
    for a in adapters.values():
        torch.nn.init.normal_(a.delta_S, std=0.1)
    weights = {n: a.base.weight.detach().clone() for n, a in adapters.items()}
    batch = padded_batch()
    want = delta_grads_of(model, adapters, batch)
    with merged(adapters):
        got = delta_grads_of(model, adapters, batch)
    worst = largest_rel_diff(got, want)
    assert worst < 1e-4, worst
    assert all(want[n].abs().max() > 0 for n in adapters)
    assert all(torch.equal(a.base.weight, weights[n]) for n, a in adapters.items())
