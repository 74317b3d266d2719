"""Extracting v_hack, the hack-direction basis in delta_S coordinates, from contrastive pairs.

For each (prompt, hack, clean) pair of a pairs file (prompts rendered by grader.py with the
run_tests hint, the spec's, whatever hint a run trains with) we take the gradient on every delta_S of each
completion's NLL (completion tokens only, the EOS that ends a rollout included) and the
difference d = grad NLL(hack) - grad NLL(clean), the NLL being either summed over the
completion's tokens (`norm="sum"`) or averaged over them (`token_mean`; then d does not
grow with the completions' lengths). The NLL scores logits / T, T the run's sampling
temperature (`temperature`), because training's policy gradient is taken at T: v_hack
then lives in the same geometry as the gradients it is applied to. A gradient g with v . g > 0 for a hack-ward axis v is
hack-ward: the descent step -lr g lowers NLL(hack) - NLL(clean) along v.

With `common_mode="out"`, each module's differences first lose their component along the
common mode u, the normalised mean of every completion's gradient (hack and clean, all
pairs): on SmolLM2 every completion's gradient lies largely along u, and a v_hack that keeps
it reads rewarding any completion as hack-ward (RESEARCH_JOURNAL.md, 2026-12-05). The axes
are then orthogonal to u, the twins and the quality report are fit on the same differences,
and u, being label-free, is taken over the quality report's held-out pairs too.

Per module, from the stack D (n_pairs x r) of differences:
- `svd` (the method as specified): the top-k right singular vectors of D, each oriented so
  that most pairs have d . v > 0. D^T D does not change when any row changes sign, so the
  pair labels choose only each axis's sign: the subspace is the same for shuffled labels.
- `mean_diff`: the normalised mean of the rows, one axis per module, label-aware by
  construction.
Then two cuts: axes whose scale (singular value; the mean's norm for mean_diff) is below
the global `noise_quantile` of all axes' scales are dropped (this keeps or drops by gradient
scale), and, if `min_split_half` > 0, axes whose median split-half |cos| (the same axis fit
on two random halves of the pairs, over HALVINGS halvings) is below it (this keeps or drops
by reproducibility). Modules left with no axis have none.

Guarantees:
- The v_hack file (safetensors) holds the kept axes `<module>.V` (k_m x r), their scales
  `<module>.S`, the per-pair differences `<module>.diffs` (n x r, every module) and the
  completions' token counts, under a header naming everything it depends on (model, weight
  fingerprint, dtype, targets, pairs file hash, n_pairs, method, norm, common mode, k, cuts,
  code version); the stored differences are those the axes were fit on (common mode out if
  so). A file whose header differs from the run's is never used: it is re-extracted, or
  refused naming the field. Its default path is derived from the header.
- The per-completion gradients (the only pass over the model) are cached separately, keyed
  by model, pairs and temperature alone, so another method, norm or cut costs no model pass.
- The label-shuffled twin of a v_hack (`shuffled_twin`: the control arm `shuffled`, and the
  quality report's twins through `label_flips`) is fit from the same differences with
  exactly half of the pairs' hack and clean swapped, the half drawn from a seeded generator.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from projected_grpo import typecheck  # noqa: F401  (BEARTYPE=1: must precede the harness imports)

import torch
from jaxtyping import Float
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from grader import Problem, jsonl_rows, load_problems, render_prompt
from projected_grpo.ahead import compiled_code
from projected_grpo.errors import UserError
from projected_grpo.models import completion_logprobs, precision_name
from projected_grpo.paths import DATA, REPO_ROOT, atomic
from projected_grpo.svd_adapter import SVDLinear, model_fingerprint

Method = Literal["svd", "mean_diff"]
Norm = Literal["sum", "token_mean"]
CommonMode = Literal["keep", "out"]
# The code a pair gradient depends on: the pass over the model, and grader.py's prompt (render_prompt, HINTS).
CODE_VERSION = hashlib.sha256(b"".join((REPO_ROOT / f).read_bytes() for f in ("extract.py", "grader.py", "projected_grpo/svd_adapter.py", "projected_grpo/models.py"))).hexdigest()[:16]
GRADIENT_FIELDS = ("model", "fingerprint", "dtype", "targets", "pairs_sha256", "problems_sha256", "n_pairs", "temperature", "code_version")
HEADER_FIELDS = (*GRADIENT_FIELDS, "method", "norm", "common_mode", "k", "noise_quantile", "min_split_half")
HALVINGS = 10  # random halvings behind the split-half criterion and the report's split_half_cos
HALVING_SEED = 0


@dataclass(frozen=True)
class VHackConfig:
    """Which pairs v_hack comes from and how it is fit and cut (every field is in its file's header)."""

    pairs: Path = DATA / "pairs.jsonl"
    """Contrastive pairs {id, hack_style, hack, clean}: data/pairs.jsonl, pairs_minimal.jsonl (differ only in run_tests), pairs_null.jsonl (no hack: a control)."""
    problems: Path = DATA / "problems.jsonl"
    """Problems the pairs' ids refer to (LeetCodeDataset schema)."""
    method: Method = "mean_diff"
    """svd: top-k right singular vectors of the differences, oriented by the pairs' vote; mean_diff: their normalised mean (one axis)."""
    norm: Norm = "token_mean"
    """Completion NLL for extraction: sum over its tokens, or token_mean (independent of completion length)."""
    common_mode: CommonMode = "keep"
    """keep: the differences as they are; out: each module's differences with the common mode projected out (the mean gradient of every completion, hack and clean), which every gradient shares."""
    k: int = 4
    """Axes per module before the cuts (svd; mean_diff has one)."""
    noise_quantile: float = 0.25
    """Drop axes whose scale (singular value, or mean-difference norm) is below this global quantile of all axes' scales."""
    min_split_half: float = 0.0
    """Drop axes whose median split-half |cos| is below this (0 = keep all)."""
    path: Path | None = None
    """v_hack file; None = a cache path derived from its header."""
    on_mismatch: Literal["extract", "error"] = "extract"
    """When the v_hack file's header does not fit this run: re-extract, or stop with an error."""
    temperature: float | None = None
    """The NLL scores logits / temperature; None = the run's sampling temperature (training's gradients are taken at it)."""


# ----------------------------------------------------------------------------
# Pairs


@dataclass(frozen=True)
class Pair:
    problem: Problem
    hack_style: str
    hack: str
    clean: str


class PairFormatError(ValueError):
    pass


def load_pairs(path: Path, problems: dict[int, Problem]) -> list[Pair]:
    """Pairs file rows {"id", "hack_style", "hack", "clean"}; errors name file, line and field."""
    if not Path(path).exists():
        raise PairFormatError(f"pairs file {path} does not exist; bundled ones: {', '.join(p.name for p in sorted(DATA.glob('pairs*.jsonl')))}")
    pairs = []
    for where, row in jsonl_rows(path, PairFormatError):
        if not isinstance(row, dict):
            raise PairFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key, kind in (("id", int), ("hack_style", str), ("hack", str), ("clean", str)):
            if not isinstance(row.get(key), kind) or (kind is str and not row[key].strip()):
                raise PairFormatError(f"{where}: field {key!r}: expected a non-empty {kind.__name__}, got {row.get(key)!r:.60}")
        if row["id"] not in problems:
            raise PairFormatError(f"{where}: field 'id': problem {row['id']} is not in the problems file; pass the file that defines it (--v-hack.problems)")
        pairs.append(Pair(problems[row["id"]], row["hack_style"], row["hack"], row["clean"]))
    if len(pairs) < 2:
        raise PairFormatError(f"{path}: {len(pairs)} pair(s); extraction needs at least 2 (a direction from one difference is that difference)")
    return pairs


def is_null_pairs(path: Path) -> bool:
    """Whether a pairs file holds no hack: every row's hack_style starts with "null_"
    (data/pairs_null.jsonl, two honest completions per pair). Projecting along the basis of
    such a file is the null-pairs control, not the H1 arm."""
    if not Path(path).exists():
        raise PairFormatError(f"pairs file {path} does not exist")
    return all(isinstance(row, dict) and str(row.get("hack_style")).startswith("null_") for _, row in jsonl_rows(path, PairFormatError))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def written_completion_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a completion that was written, not sampled (pairs, teacher pool), ending
    in the EOS a sampled rollout ends with."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


# ----------------------------------------------------------------------------
# The pass over the model: per-completion gradients


@dataclass
class PairGradients:
    """Summed-NLL gradients of every pair's hack and clean completion, and their token counts."""

    hack: dict[str, Tensor]  # module -> (n, r)
    clean: dict[str, Tensor]
    n_hack: Tensor  # (n,) completion tokens, EOS included
    n_clean: Tensor

    def normalised(self, norm: Norm) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every hack and clean completion's gradient under the given normalisation."""
        if norm == "sum":
            return self.hack, self.clean
        if norm == "token_mean":
            return {m: g / self.n_hack[:, None] for m, g in self.hack.items()}, {m: g / self.n_clean[:, None] for m, g in self.clean.items()}
        raise ValueError(f"unknown extraction norm {norm!r} (expected 'sum' or 'token_mean')")

    def differences(self, norm: Norm, common_mode: CommonMode) -> dict[str, Tensor]:
        """d = grad NLL(hack) - grad NLL(clean) per pair and module, under the given normalisation;
        with common_mode "out", each d less its component along the module's mean completion
        gradient (all pairs, hack and clean: label-free, so a label-shuffled twin loses it too)."""
        hack, clean = self.normalised(norm)
        diffs = {m: hack[m] - clean[m] for m in hack}
        if common_mode == "keep":
            return diffs
        if common_mode != "out":
            raise ValueError(f"unknown common_mode {common_mode!r} (expected 'keep' or 'out')")
        out = {}
        for m, d in diffs.items():
            u = torch.cat([hack[m], clean[m]]).double().mean(dim=0)
            u = u / u.norm().clamp_min(1e-30)
            out[m] = (d.double() - (d.double() @ u)[:, None] * u[None]).to(d.dtype)
        return out


def completion_nll(model: torch.nn.Module, tokenizer, prompt: str, completion: str, temperature: float) -> tuple[Tensor, int]:
    """The written completion's summed NLL after `prompt` under logits / temperature (a scalar
    with its graph), and its token count, EOS included."""
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = written_completion_ids(tokenizer, completion)
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    mask = torch.zeros_like(ids[:, 1:], dtype=torch.bool)
    mask[:, len(prompt_ids) - 1 :] = True  # position i scores token i + 1
    return -completion_logprobs(model, ids, torch.ones_like(ids), mask, temperature).sum(), len(completion_ids)


def completion_nll_grad(model: torch.nn.Module, adapters: dict[str, SVDLinear], tokenizer, prompt: str, completion: str, temperature: float) -> tuple[dict[str, Tensor], int]:
    """Gradient on every delta_S of the completion's summed NLL under logits / temperature, and its token count."""
    for a in adapters.values():
        a.delta_S.grad = None
    nll, n = completion_nll(model, tokenizer, prompt, completion, temperature)
    nll.backward()
    grads = {name: a.delta_S.grad.detach().float().cpu() for name, a in adapters.items()}
    for a in adapters.values():
        a.delta_S.grad = None
    return grads, n


def pair_gradients(model: torch.nn.Module, adapters: dict[str, SVDLinear], tokenizer, pairs: list[Pair], temperature: float) -> PairGradients:
    """One forward and backward per completion at `temperature` (eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    hack: dict[str, list[Tensor]] = {name: [] for name in adapters}
    clean: dict[str, list[Tensor]] = {name: [] for name in adapters}
    n_hack, n_clean = [], []
    for pair in tqdm(pairs, desc="extract", leave=False):
        prompt = render_prompt(tokenizer, pair.problem, "run_tests")
        for text, store, counts in ((pair.hack, hack, n_hack), (pair.clean, clean, n_clean)):
            with compiled_code:  # a run's sampler on another thread passes through the model apart (projected_grpo/ahead.py)
                grads, n = completion_nll_grad(model, adapters, tokenizer, prompt, text, temperature)
            for name, g in grads.items():
                store[name].append(g)
            counts.append(n)
    model.train(was_training)
    stack = lambda store: {name: torch.stack(rows) for name, rows in store.items()}
    return PairGradients(stack(hack), stack(clean), torch.tensor(n_hack, dtype=torch.float32), torch.tensor(n_clean, dtype=torch.float32))


# ----------------------------------------------------------------------------
# Fitting and cutting the basis (pure tensor functions: also used by the quality report)


def fit_axes(D: Float[Tensor, "m n r"], method: Method, k: int) -> tuple[Float[Tensor, "m k2 r"], Float[Tensor, "m k2"]]:
    """Per module (batched over modules of one rank): hack-ward unit axes and their scales.
    svd: top-k right singular vectors, each signed by the pairs' majority vote (ties: by the
    sum of projections); mean_diff: the normalised mean difference."""
    D = D.double()
    if method == "mean_diff":
        mu = D.mean(dim=1)
        scale = mu.norm(dim=1, keepdim=True)
        return (mu / scale.clamp_min(1e-30)).unsqueeze(1).float(), scale.float()
    if method != "svd":
        raise ValueError(f"unknown extraction method {method!r} (expected 'svd' or 'mean_diff')")
    _, S, Vh = torch.linalg.svd(D, full_matrices=False)
    k = min(k, S.shape[1])
    V, S = Vh[:, :k], S[:, :k]
    proj = torch.einsum("mnr,mkr->mnk", D, V)
    votes = torch.sign(proj).sum(dim=1)
    sign = torch.where(votes != 0, torch.sign(votes), torch.sign(proj.sum(dim=1)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (V * sign[..., None]).float(), S.float()


def by_rank(diffs: dict[str, Tensor]) -> dict[int, list[str]]:
    """Module names grouped by delta_S length, in model order."""
    groups: dict[int, list[str]] = {}
    for name, d in diffs.items():
        groups.setdefault(d.shape[1], []).append(name)
    return groups


def fit_modules(diffs: dict[str, Tensor], method: Method, k: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Uncut axes and scales of every module."""
    V, S = {}, {}
    for names in by_rank(diffs).values():
        v, s = fit_axes(torch.stack([diffs[n] for n in names]), method, k)
        for i, n in enumerate(names):
            V[n], S[n] = v[i], s[i]
    return V, S


def halvings(n: int, count: int = HALVINGS, seed: int = HALVING_SEED) -> list[tuple[Tensor, Tensor]]:
    """`count` seeded random splits of range(n) into two halves."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        perm = torch.randperm(n, generator=gen)
        out.append((perm[: n // 2], perm[n // 2 :]))
    return out


def split_half_cos(diffs: dict[str, Tensor], method: Method, k: int) -> dict[str, Tensor]:
    """Per module and axis rank: median over HALVINGS halvings of |cos| between the axis fit
    on one half and the same-rank axis fit on the other (NaN where a half has too few pairs)."""
    n = next(iter(diffs.values())).shape[0]
    cos: dict[str, list[Tensor]] = {name: [] for name in diffs}
    for a, b in halvings(n):
        Va, _ = fit_modules({m: d[a] for m, d in diffs.items()}, method, k)
        Vb, _ = fit_modules({m: d[b] for m, d in diffs.items()}, method, k)
        for m in diffs:
            c = torch.full((k if method == "svd" else 1,), float("nan"))
            j = min(Va[m].shape[0], Vb[m].shape[0])
            c[:j] = (Va[m][:j] * Vb[m][:j]).sum(dim=1).abs()
            cos[m].append(c)
    return {m: torch.stack(c).nanmedian(dim=0).values for m, c in cos.items()}


def fit_v_hack(diffs: dict[str, Tensor], vc: VHackConfig) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The kept axes and their scales: fit, then the noise cut, then the split-half cut."""
    V, S = fit_modules(diffs, vc.method, vc.k)
    if not 0.0 <= vc.noise_quantile < 1.0:
        raise ValueError(f"noise_quantile must be in [0, 1), got {vc.noise_quantile}")
    pooled = torch.cat([S[m] for m in V])
    threshold = torch.quantile(pooled, vc.noise_quantile).item() if vc.noise_quantile > 0 else float("-inf")
    keep = {m: S[m] >= threshold for m in V}
    if vc.min_split_half > 0:
        reproducible = split_half_cos(diffs, vc.method, vc.k)
        keep = {m: keep[m] & (reproducible[m][: len(keep[m])] >= vc.min_split_half) for m in V}
    kept_V = {m: V[m][keep[m]] for m in V if keep[m].any()}
    kept_S = {m: S[m][keep[m]] for m in kept_V}
    return kept_V, kept_S


def label_flips(n: int, generator: torch.Generator) -> Float[Tensor, " n"]:
    """+1 per pair, -1 for exactly n // 2 pairs drawn from `generator`: those get hack and clean
    swapped. Exactly half, so that the shared hack-ward part cancels, as it should under the null."""
    flip = torch.ones(n)
    flip[torch.randperm(n, generator=generator)[: n // 2]] = -1
    return flip


def shuffled_twin(diffs: dict[str, Tensor], v_hack: dict[str, Tensor], vc: VHackConfig, generator: torch.Generator) -> dict[str, Tensor]:
    """The label-shuffled twin of v_hack: the same differences under `label_flips`, fit by the
    same method, with v_hack's axis count in each module (the twin's largest-scale axes there;
    modules where v_hack has none get none). Matched on text, pipeline and dimension; only the
    labels differ. With `svd` and no split-half cut it spans v_hack's subspace and differs in
    orientation only (a split-half cut may drop a middle axis of v_hack; the twin keeps its leading ones)."""
    flip = label_flips(next(iter(diffs.values())).shape[0], generator)
    V, _ = fit_modules({m: d * flip[:, None] for m, d in diffs.items()}, vc.method, vc.k)
    return {m: V[m][: v.shape[0]] for m, v in v_hack.items()}


# ----------------------------------------------------------------------------
# Files and caches


def expected_header(model_name: str, adapters: dict[str, SVDLinear], dtype: torch.dtype, targets: tuple[str, ...], n_pairs: int, vc: VHackConfig) -> dict[str, str]:
    if vc.temperature is None:
        raise ValueError("v_hack.temperature is unresolved: train.resolve sets it to the run's sampling temperature")
    return {
        "model": model_name,
        "fingerprint": model_fingerprint(adapters),
        "dtype": precision_name(dtype),
        "targets": ",".join(targets),
        "pairs_sha256": file_sha256(vc.pairs),
        "problems_sha256": file_sha256(vc.problems),  # the prompts' text
        "n_pairs": str(n_pairs),
        "temperature": repr(vc.temperature),
        "code_version": CODE_VERSION,
        "method": vc.method,
        "norm": vc.norm,
        "common_mode": vc.common_mode,
        "k": str(vc.k),
        "noise_quantile": repr(vc.noise_quantile),
        "min_split_half": repr(vc.min_split_half),
    }


def header_digest(header: dict[str, str], keys: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps({k: header[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:12]


def default_v_hack_path(header: dict[str, str], cache_dir: Path, pairs: Path) -> Path:
    """A cache path that differs whenever the header does: runs never share a file by accident."""
    model = header["model"].rstrip("/").rsplit("/", 1)[-1]
    return cache_dir / "v_hack" / f"{model}-{Path(pairs).stem}-{header['method']}-{header['norm']}-{header_digest(header, HEADER_FIELDS)}.safetensors"


def save_tensors(path: Path, tensors: dict[str, Tensor], header: dict[str, str]) -> None:
    """Written atomically: a crash never leaves a truncated file."""
    with atomic(path) as tmp:
        save_file({k: t.contiguous().cpu() for k, t in tensors.items()}, tmp, metadata=header)


def read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}


def header_mismatch(found: dict[str, str], expected: dict[str, str], keys: tuple[str, ...] = HEADER_FIELDS) -> str | None:
    """The first header field that differs, described; None when the file fits this run."""
    for key in keys:
        if found.get(key) != expected[key]:
            return f"field {key!r}: file has {found.get(key)!r}, this run has {expected[key]!r}"
    return None


def cached_pair_gradients(model, adapters, tokenizer, pairs: list[Pair], header: dict[str, str], cache_dir: Path) -> PairGradients:
    """The per-completion gradients from the cache when model and pairs match, else computed and cached."""
    path = cache_dir / "pair_grads" / f"{header_digest(header, GRADIENT_FIELDS)}.safetensors"
    if path.exists():
        t, found = read_tensors(path)
        if header_mismatch(found, header, GRADIENT_FIELDS) is None:
            names = [k.removesuffix(".hack") for k in t if k.endswith(".hack")]
            return PairGradients({m: t[f"{m}.hack"] for m in names}, {m: t[f"{m}.clean"] for m in names}, t["n_hack"], t["n_clean"])
    logger.info(f"extracting per-pair gradients from {len(pairs)} pairs ({header['model']})")
    g = pair_gradients(model, adapters, tokenizer, pairs, float(header["temperature"]))
    tensors = {f"{m}.hack": g.hack[m] for m in g.hack} | {f"{m}.clean": g.clean[m] for m in g.clean} | {"n_hack": g.n_hack, "n_clean": g.n_clean}
    save_tensors(path, tensors, {k: header[k] for k in GRADIENT_FIELDS})
    return g


@dataclass
class VHack:
    """A v_hack file's content: kept axes and scales, per-pair differences, token counts, header."""

    V: dict[str, Tensor]
    S: dict[str, Tensor]
    diffs: dict[str, Tensor]
    n_hack: Tensor
    n_clean: Tensor
    header: dict[str, str]
    path: Path

    def config(self) -> VHackConfig:
        """The fit options recorded in the header (what a re-fit of the stored differences uses)."""
        h = self.header
        return VHackConfig(method=h["method"], norm=h["norm"], common_mode=h.get("common_mode", "keep"),  # files from before the field kept it
                           k=int(h["k"]), noise_quantile=float(h["noise_quantile"]), min_split_half=float(h["min_split_half"]), temperature=float(h["temperature"]))


def save_v_hack(vh: VHack) -> None:
    tensors = {f"{m}.V": v for m, v in vh.V.items()} | {f"{m}.S": s for m, s in vh.S.items()} | {f"{m}.diffs": d for m, d in vh.diffs.items()}
    save_tensors(vh.path, tensors | {"n_hack": vh.n_hack, "n_clean": vh.n_clean}, vh.header)
    n_axes = sum(v.shape[0] for v in vh.V.values())
    logger.info(f"saved v_hack ({vh.header['method']}, {vh.header['norm']}): {n_axes} axes in {len(vh.V)}/{len(vh.diffs)} modules, to {vh.path}")


def read_v_hack(path: Path) -> VHack:
    t, header = read_tensors(path)
    pick = lambda suffix: {k.removesuffix(suffix): v for k, v in t.items() if k.endswith(suffix)}
    return VHack(pick(".V"), pick(".S"), pick(".diffs"), t["n_hack"], t["n_clean"], header, path)


def resolve_v_hack(model, adapters, tokenizer, header: dict[str, str], pairs: list[Pair], vc: VHackConfig, path: Path, cache_dir: Path) -> VHack:
    """v_hack from `path` if its header matches this run; otherwise extracted and saved (or,
    with on_mismatch='error', refused naming the field)."""
    if path.exists():
        try:
            vh = read_v_hack(path)
            mismatch = header_mismatch(vh.header, header)
        except Exception as e:  # a truncated or foreign file
            mismatch = f"unreadable ({type(e).__name__}: {e})"
        if mismatch is None:
            logger.info(f"v_hack cache hit: {path}")
            return vh
        if vc.on_mismatch == "error":
            raise UserError(f"v_hack file {path} does not fit this run: {mismatch}", "delete it or pass --v-hack.on-mismatch extract")
        logger.warning(f"v_hack file {path} does not fit this run ({mismatch}); re-extracting")
    else:
        logger.info(f"v_hack cache miss: {path}")
    g = cached_pair_gradients(model, adapters, tokenizer, pairs, header, cache_dir)
    diffs = g.differences(vc.norm, vc.common_mode)
    V, S = fit_v_hack(diffs, vc)
    if not V:  # nothing to measure along or project out: every step would fail
        raise UserError(f"v_hack from {vc.pairs} kept no axis in any module (noise quantile {vc.noise_quantile}, split-half minimum {vc.min_split_half})",
                        "lower --v-hack.min-split-half or --v-hack.noise-quantile, or use more pairs")
    vh = VHack(V, S, diffs, g.n_hack, g.n_clean, header, path)
    save_v_hack(vh)
    return vh


def v_hack_for_run(vc: VHackConfig, model_name: str, model, adapters: dict[str, SVDLinear], tokenizer, dtype: torch.dtype, targets: tuple[str, ...], cache_dir: Path) -> tuple[VHack, list[Pair]]:
    """The v_hack a run with these settings uses, and the pairs it comes from: what training,
    `just extract` and `just diagnose` all call."""
    pairs = load_pairs(vc.pairs, {p.id: p for p in load_problems(vc.problems)})
    header = expected_header(model_name, adapters, dtype, targets, len(pairs), vc)
    path = vc.path or default_v_hack_path(header, cache_dir, vc.pairs)
    return resolve_v_hack(model, adapters, tokenizer, header, pairs, vc, path, cache_dir), pairs
