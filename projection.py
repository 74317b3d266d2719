"""Removing the hack-ward part of the delta_S gradient, and measuring it.

v_hack gives, per module m, k_m orthonormal rows V_m (k_m x r_m) in delta_S coordinates,
each oriented so that a loss gradient g with V g > 0 is one whose descent step raises
the likelihood of hack completions relative to clean ones (see extract.py).

For each module with axes, c = V g, and
- `one_sided` removes relu(c) V: only the hack-ward components go; a gradient that
  already pushes away from hacking is left alone;
- `no_gate` removes c V: the whole subspace goes.
Modules without axes are untouched. After `no_gate` V g' = 0; after `one_sided`
relu(V g') = 0; in both cases the component orthogonal to V is unchanged and a second
projection changes nothing (V has orthonormal rows).

Reported (`hackward_fraction`): ||relu(V g)|| / ||g||, with relu applied per axis before
aggregating and the norms taken over the whole delta_S gradient (every module). Its null
baseline is the same number for an isotropic random g: sqrt(K / 2R) for K kept axes in R
delta_S dimensions (the 1/2 because relu keeps half of a symmetric component's energy).

Yardsticks, measured on the same gradient: `random_bases` draws seeded random orthonormal
bases with exactly v_hack's per-module axis counts (the `random` arm projects onto one;
`EmpiricalNull` measures the hack-ward fraction against a fixed set of them every step,
because real gradients are not isotropic and sqrt(K / 2R) understates what any subspace of
that size captures).

The modules are grouped by r and their V padded with zero rows to a common k, so each
step costs one batched matmul per distinct r (two for Qwen3-4B: 1024 and 2560), not one per module.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

Gate = Literal["one_sided", "no_gate"]
RELATIVE_EPS = 1e-6


@dataclass(frozen=True)
class ProjectionStats:
    cin: float
    """Hack-ward fraction of the gradient before projection."""
    cout: float
    """Hack-ward fraction after projection (equals cin in measure-only mode)."""
    null: float
    """The same fraction for an isotropic random gradient: sqrt(K / 2R)."""
    touched: float
    """Fraction of modules with axes where something was (or would be) removed."""
    removed: float
    """||g - g_projected|| / ||g||: how much of the whole gradient was (or would be) removed."""


class Projector:
    """Projects (or only measures) the hack-ward part of a dict of per-module gradients."""

    def __init__(self, v_hack: dict[str, Float[Tensor, "k r"]], ranks: dict[str, int], gate: Gate, apply: bool):
        unknown = sorted(set(v_hack) - set(ranks))
        if unknown:
            raise ValueError(f"v_hack names modules the model does not have: {unknown[:5]}")
        self.gate, self.apply = gate, apply
        self.names_by_rank: dict[int, list[str]] = {}
        for name, V in v_hack.items():
            if V.shape[1] != ranks[name]:
                raise ValueError(f"v_hack[{name!r}] has {V.shape[1]} columns, the module's delta_S has {ranks[name]}")
            self.names_by_rank.setdefault(V.shape[1], []).append(name)
        self.V_by_rank: dict[int, Tensor] = {}
        for r, names in self.names_by_rank.items():
            k_max = max(v_hack[n].shape[0] for n in names)
            V = torch.zeros(len(names), k_max, r, dtype=torch.float32, device=v_hack[names[0]].device)
            for i, n in enumerate(names):
                V[i, : v_hack[n].shape[0]] = v_hack[n].float()
            self.V_by_rank[r] = V
        self.axes = {name: V.shape[0] for name, V in v_hack.items()}
        n_axes = sum(self.axes.values())
        self.n_modules = len(v_hack)
        self.null = (n_axes / (2 * sum(ranks.values()))) ** 0.5

    def _coefficients(self, grads: dict[str, Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
        """Per rank group: the stacked gradients (m, r) and their coefficients c = V g (m, k)."""
        out = {}
        for r, names in self.names_by_rank.items():
            g = torch.stack([grads[n].float() for n in names])
            out[r] = (g, torch.einsum("mkr,mr->mk", self.V_by_rank[r], g))
        return out

    def hackward_fraction(self, grads: dict[str, Tensor]) -> float:
        """||relu(V g)|| / ||g|| over all of delta_S; 0 for a zero gradient."""
        return self._fraction(grads, self._coefficients(grads))

    @staticmethod
    def _fraction(grads: dict[str, Tensor], coefs: dict[int, tuple[Tensor, Tensor]]) -> float:
        total = torch.sqrt(sum(g.float().square().sum() for g in grads.values()))
        hackward = torch.sqrt(sum(c.clamp_min(0).square().sum() for _, c in coefs.values()))
        return (hackward / total).item() if total > 0 else 0.0

    @torch.no_grad()
    def __call__(self, grads: dict[str, Tensor]) -> ProjectionStats:
        """Measure, and in projecting mode remove in place, the hack-ward part of `grads`."""
        coefs = self._coefficients(grads)
        cin = self._fraction(grads, coefs)
        total = torch.sqrt(sum(g.float().square().sum() for g in grads.values()))
        touched, removed_sq = 0, torch.zeros((), device=total.device)
        for r, (g, c) in coefs.items():
            removed = c.clamp_min(0) if self.gate == "one_sided" else c
            # Rounding leaves ~1e-8 of a removed component behind; count a module as touched
            # only when what goes is more than that.
            touched += int((removed.norm(dim=1) > RELATIVE_EPS * g.norm(dim=1)).sum())
            part = torch.einsum("mk,mkr->mr", removed, self.V_by_rank[r])
            removed_sq = removed_sq + part.square().sum()
            if self.apply:
                g_new = g - part
                for i, n in enumerate(self.names_by_rank[r]):
                    grads[n].copy_(g_new[i])
        cout = self.hackward_fraction(grads) if self.apply else cin
        removed_fraction = (removed_sq.sqrt() / total).item() if total > 0 else 0.0
        return ProjectionStats(cin=cin, cout=cout, null=self.null, touched=touched / max(self.n_modules, 1), removed=removed_fraction)

    def axis_coefficients(self, vectors: dict[str, Tensor]) -> Float[Tensor, " K"]:
        """V x for every kept axis, modules sorted by name (padding rows dropped)."""
        coefs = self._coefficients(vectors)
        per_module = {n: coefs[r][1][i, : self.axes[n]] for r, names in self.names_by_rank.items() for i, n in enumerate(names)}
        return torch.cat([per_module[n] for n in sorted(per_module)])


def random_bases(v_hack: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """A random orthonormal basis per module with the same number of axes (k_m x r_m) as v_hack,
    drawn in module-name order (the same draws whatever order the dict has)."""
    out = {}
    for name in sorted(v_hack):
        V = v_hack[name]
        Q, _ = torch.linalg.qr(torch.randn(V.shape[1], V.shape[0], generator=generator))
        out[name] = Q.T.contiguous().to(V.device)
    return out


class EmpiricalNull:
    """The hack-ward fraction of a gradient against `count` fixed random bases (seeded) with
    v_hack's per-module axis counts: the yardstick for cin on this very gradient."""

    def __init__(self, v_hack: dict[str, Tensor], ranks: dict[str, int], count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.projectors = [Projector(random_bases(v_hack, generator), ranks, "one_sided", apply=False) for _ in range(count)]

    def fractions(self, grads: dict[str, Tensor]) -> Float[Tensor, " n"]:
        return torch.tensor([p.hackward_fraction(grads) for p in self.projectors])


def subspace_cos(old: dict[str, Tensor], new: dict[str, Tensor]) -> float:
    """Mean over modules in both of ||V_new V_old^T||_F / sqrt(min(k_old, k_new)): 1 when the
    spans agree (the smaller inside the larger), about sqrt(k/r) for unrelated ones."""
    common = [n for n in new if n in old]
    if not common:
        return 0.0
    cos = [(new[n].float() @ old[n].float().T).norm().item() / min(new[n].shape[0], old[n].shape[0]) ** 0.5 for n in common]
    return sum(cos) / len(cos)
