"""Why does the surrogate hack with half of every gradient projected away? Where the learned update
lies: how much of each run's final delta_S (its whole update, delta_S = 0 at the start) is along
v_hack, against random bases with v_hack's axis counts and against the null-pairs basis.

For a run's latest checkpoint delta_S = d (every adapted module) and a basis V (k_m x r_m rows per
module, orthonormal), share = sum_m ||V_m d_m||^2 / ||d||^2; hack-ward share the same with
relu(-V_m d_m) (a loss gradient g with V g > 0 is hack-ward, projection.py, so a hack-ward update
moves along -V). Yardsticks on the same d: RANDOM seeded random bases (projection.random_bases,
v_hack's counts: mean and max) and the expected share of an isotropic d, sum_m k_m/r_m ||d_m||^2 /
||d||^2. Also the cosine between the runs' updates (all modules concatenated): runs that learned
the same thing point the same way. Where the latest checkpoint can resume (state.pt,
grads.safetensors), one step seen three ways along v_hack: its loss gradient g (before the arm;
hack-ward is +V here), AdamW's first moment m, and AdamW's direction m_hat / (sqrt(v_hat) + eps),
the shape of the change it makes. Bases come from a checkpoint's bases.safetensors (`v_hack.*`).
No pass over the model.
Usage, from the repository root:
PYTHONPATH=. uv run python docs/results/surrogate-smollm2/driver/update_share.py PAIRS_BASES NULL_BASES RUN...
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from projected_grpo.checkpoints import checkpoint_step, checkpoints, load_group
from projection import random_bases

RANDOM, SEED = 20, 0
# The adapters' order (the optimizer's parameter order): a Llama/Qwen decoder layer's projections as registered.
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def parts(V: dict[str, Tensor], x: dict[str, Tensor]) -> tuple[float, float]:
    """Shares of ||x||^2 (every module) along V's rows on their + and - sides."""
    total = sum(float(t.square().sum()) for t in x.values())
    c = [V[m] @ x[m] for m in V]
    return sum(float(t.relu().square().sum()) for t in c) / total, sum(float((-t).relu().square().sum()) for t in c) / total


def shares(V: dict[str, Tensor], d: dict[str, Tensor]) -> tuple[float, float]:
    """(share, hack-ward share) of an update d along V: a hack-ward update moves along -V."""
    plus, minus = parts(V, d)
    return plus + minus, minus


def signed_parts(V: dict[str, Tensor], g: dict[str, Tensor]) -> str:
    """A loss gradient's (or moment's) share along V, "+hack-ward / -the other side"."""
    plus, minus = parts(V, g)
    return f"+{plus:.3f} / -{minus:.3f}"


def optimizer_view(V: dict[str, Tensor], ckpt: Path) -> str | None:
    """The checkpoint's step along V: gradient, AdamW's first moment and its direction (None: no optimizer state)."""
    if not (ckpt / "state.pt").exists():
        return None
    g_s, g_t = load_group(ckpt / "grads.safetensors", "g_s"), load_group(ckpt / "grads.safetensors", "g_t")
    rank = lambda m: (int(m.split(".")[2]), PROJECTIONS.index(m.split(".", 3)[3]))
    order = sorted(g_s, key=rank)
    opt = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)["optimizer"]
    (b1, b2), eps = opt["param_groups"][0]["betas"], opt["param_groups"][0]["eps"]
    state = [opt["state"][i] for i in range(len(order))]
    assert all(s["exp_avg"].shape == g_s[m].shape for s, m in zip(state, order)), "optimizer order is not the adapters' order"
    t = float(state[0]["step"])
    m = {n: s["exp_avg"] for n, s in zip(order, state)}
    direction = {n: (s["exp_avg"] / (1 - b1**t)) / ((s["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps) for n, s in zip(order, state)}
    return f"gradient {signed_parts(V, {n: g_s[n] + g_t[n] for n in g_s})}, first moment {signed_parts(V, m)}, AdamW direction {shares(V, direction)[0]:.4f}"


def flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([d[m] for m in sorted(d)])


def main(pairs_bases: Path, null_bases: Path, runs: list[Path]) -> None:
    pairs, null = load_group(pairs_bases, "v_hack"), load_group(null_bases, "v_hack")
    randoms = [random_bases(pairs, torch.Generator().manual_seed(SEED + i)) for i in range(RANDOM)]
    print(f"pairs basis: {len(pairs)} modules, {sum(v.shape[0] for v in pairs.values())} axes; null-pairs basis: {len(null)} modules, {sum(v.shape[0] for v in null.values())} axes")
    print("| run | step | ‖δ‖ | along v_hack (hack-ward) | along null-pairs (hack-ward) | random bases mean / max | isotropic |")
    print("|---|---|---|---|---|---|---|")
    latest = {run.name: saved[-1] for run in runs if (saved := checkpoints(run))}  # runs without a checkpoint are left out
    updates = {}
    for name, ckpt in latest.items():
        d = load_file(ckpt / "delta_S.safetensors")
        updates[name] = flat(d)
        total = sum(float(x.square().sum()) for x in d.values())
        iso = sum(pairs[m].shape[0] / d[m].numel() * float(d[m].square().sum()) for m in pairs) / total
        (s, h), (sn, hn) = shares(pairs, d), shares(null, d)
        r = torch.tensor([shares(R, d)[0] for R in randoms])
        print(f"| {name} | {checkpoint_step(ckpt)} | {total ** 0.5:.3f} | {s:.4f} ({h:.4f}) | {sn:.4f} ({hn:.4f}) | {r.mean():.4f} / {r.max():.4f} | {iso:.4f} |")
    print("\none step along v_hack (share of the squared norm; gradient and moment: +V hack-ward / -V)")
    for name, ckpt in latest.items():
        if view := optimizer_view(pairs, ckpt):
            print(f"{name} step {checkpoint_step(ckpt)}: {view}")
    names = list(updates)
    print("\ncosine between runs' updates")
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            print(f"{a} · {b}: {float(torch.nn.functional.cosine_similarity(updates[a], updates[b], dim=0)):+.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
