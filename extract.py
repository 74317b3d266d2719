"""Extracting v_hack, the hack-direction basis in delta_S coordinates, from contrastive pairs.

For each (prompt, hack, clean) pair of data/pairs.jsonl (prompts rendered by grader.py
with the run_tests hint, exactly as in training) we take the gradient on every delta_S
of the completion NLL of the hack and of the clean completion (completion tokens only,
normalised like the training loss), and their difference d = grad NLL(hack) - grad
NLL(clean). Per module, the SVD of the stacked d (n_pairs x r) gives the top-k right
singular vectors; each is oriented so that most pairs have d . v > 0. With that sign a
loss gradient g with v . g > 0 is hack-ward: the descent step -lr g lowers
NLL(hack) - NLL(clean), i.e. makes hacking relatively more likely.

The result is saved as safetensors (`<module>.V`: k x r, `<module>.S`: k) with a header
naming everything it depends on (model, weight fingerprint, dtype, targets, pairs file
hash, n_pairs, k, normalisation, code version). `resolve_v_hack` never reuses a file
whose header differs from the current run's: it re-extracts, or raises naming the field.

At load, `noise_cut` pools every kept singular value over all modules, drops the axes
below a global quantile, and drops modules left with none.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import typecheck  # noqa: F401  (BEARTYPE=1: must precede the harness imports)

import torch
import tyro
from jaxtyping import Float
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from grader import Problem, jsonl_rows, load_problems, render_prompt
from svd_adapter import (
    DEFAULT_TARGETS,
    REPO_ROOT,
    SVDLinear,
    completion_logprobs,
    load_model,
    model_fingerprint,
    pick_device,
    sequence_loss,
    wrap_svd,
)

LossNorm = Literal["constant", "sequence_mean"]
CODE_VERSION = hashlib.sha256(b"".join((REPO_ROOT / f).read_bytes() for f in ("extract.py", "svd_adapter.py"))).hexdigest()[:16]
HEADER_FIELDS = ("model", "fingerprint", "dtype", "targets", "pairs_sha256", "n_pairs", "k", "loss_norm", "code_version")


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
    pairs = []
    for where, row in jsonl_rows(path, PairFormatError):
        if not isinstance(row, dict):
            raise PairFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key, kind in (("id", int), ("hack_style", str), ("hack", str), ("clean", str)):
            if not isinstance(row.get(key), kind) or (kind is str and not row[key].strip()):
                raise PairFormatError(f"{where}: field {key!r}: expected a non-empty {kind.__name__}, got {row.get(key)!r:.60}")
        if row["id"] not in problems:
            raise PairFormatError(f"{where}: field 'id': problem {row['id']} is not in the problems file")
        pairs.append(Pair(problems[row["id"]], row["hack_style"], row["hack"], row["clean"]))
    if not pairs:
        raise PairFormatError(f"{path}: no pairs")
    return pairs


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def written_completion_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a completion that was written, not sampled (pairs, teacher pool), ending
    in the EOS a sampled rollout ends with."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def completion_nll_grad(
    model: torch.nn.Module, adapters: dict[str, SVDLinear], tokenizer, prompt: str, completion: str, loss_norm: LossNorm
) -> dict[str, Tensor]:
    """Gradient on every delta_S of the completion's NLL (completion tokens only, the EOS
    that ends a rollout included), normalised like the training loss."""
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = written_completion_ids(tokenizer, completion)
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    mask = torch.zeros_like(ids[:, 1:], dtype=torch.bool)
    mask[:, len(prompt_ids) - 1 :] = True  # position i scores token i + 1
    for a in adapters.values():
        a.delta_S.grad = None
    nll = -completion_logprobs(model, ids, torch.ones_like(ids), mask)
    sequence_loss(nll, mask, loss_norm, denominator=1.0).backward()
    return {name: a.delta_S.grad.detach().clone() for name, a in adapters.items()}


def hack_basis(diffs: Float[Tensor, "n r"], k: int) -> tuple[Float[Tensor, "k2 r"], Float[Tensor, " k2"]]:
    """Top-k right singular vectors of the stacked differences, each oriented hack-ward
    by majority vote of the pairs (ties broken by the sum of projections)."""
    _, S, Vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    k = min(k, S.shape[0])
    V, S = Vh[:k], S[:k]
    proj = diffs.double() @ V.T  # n x k
    votes = torch.sign(proj).sum(dim=0)
    sign = torch.where(votes != 0, torch.sign(votes), torch.sign(proj.sum(dim=0)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (V * sign[:, None]).float(), S.float()


def extract_v_hack(
    model: torch.nn.Module, adapters: dict[str, SVDLinear], tokenizer, pairs: list[Pair], k: int, loss_norm: LossNorm
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """v_hack (per module, k x r oriented rows) and the singular values behind each axis."""
    diffs: dict[str, list[Tensor]] = {name: [] for name in adapters}
    model.eval()
    for pair in tqdm(pairs, desc="extract"):
        prompt = render_prompt(tokenizer, pair.problem, "run_tests")
        g_hack = completion_nll_grad(model, adapters, tokenizer, prompt, pair.hack, loss_norm)
        g_clean = completion_nll_grad(model, adapters, tokenizer, prompt, pair.clean, loss_norm)
        for name in adapters:
            diffs[name].append((g_hack[name] - g_clean[name]).float().cpu())
    for a in adapters.values():
        a.delta_S.grad = None
    V, S = {}, {}
    for name, rows in diffs.items():
        V[name], S[name] = hack_basis(torch.stack(rows), k)
    return V, S


def expected_header(model_name: str, adapters: dict[str, SVDLinear], dtype: torch.dtype, targets: tuple[str, ...], pairs_path: Path, n_pairs: int, k: int, loss_norm: LossNorm) -> dict[str, str]:
    return {
        "model": model_name,
        "fingerprint": model_fingerprint(adapters),
        "dtype": str(dtype).removeprefix("torch."),
        "targets": ",".join(targets),
        "pairs_sha256": file_sha256(pairs_path),
        "n_pairs": str(n_pairs),
        "k": str(k),
        "loss_norm": loss_norm,
        "code_version": CODE_VERSION,
    }


def default_v_hack_path(header: dict[str, str], cache_dir: Path) -> Path:
    """A cache path that differs whenever the header does: presets never share a file by accident."""
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"{header['model'].rstrip('/').rsplit('/', 1)[-1]}-{header['dtype']}-k{header['k']}-{digest}.safetensors"


def save_v_hack(path: Path, V: dict[str, Tensor], S: dict[str, Tensor], header: dict[str, str]) -> None:
    tensors = {f"{name}.V": V[name].contiguous().cpu() for name in V} | {f"{name}.S": S[name].contiguous().cpu() for name in S}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata=header)
    tmp.replace(path)
    logger.info(f"saved v_hack for {len(V)} modules to {path}")


def read_v_hack(path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    V = {key.removesuffix(".V"): t for key, t in tensors.items() if key.endswith(".V")}
    S = {key.removesuffix(".S"): t for key, t in tensors.items() if key.endswith(".S")}
    return V, S, header


def header_mismatch(found: dict[str, str], expected: dict[str, str]) -> str | None:
    """The first header field that differs, described; None when the file fits this run."""
    for key in HEADER_FIELDS:
        if found.get(key) != expected[key]:
            return f"field {key!r}: file has {found.get(key)!r}, this run has {expected[key]!r}"
    return None


def noise_cut(V: dict[str, Tensor], S: dict[str, Tensor], quantile: float) -> dict[str, Tensor]:
    """Drop axes whose singular value is below the global `quantile` of all kept singular
    values (pooled over modules), then modules left with no axis."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"noise quantile must be in [0, 1), got {quantile}")
    pooled = torch.cat([S[name].float() for name in V])
    threshold = torch.quantile(pooled, quantile).item() if quantile > 0 else float("-inf")
    kept = {name: V[name][S[name].float() >= threshold] for name in V}
    kept = {name: v for name, v in kept.items() if v.shape[0] > 0}
    n_axes = sum(v.shape[0] for v in kept.values())
    logger.info(f"noise cut at quantile {quantile:g} (singular value >= {threshold:.3g}): {n_axes}/{pooled.numel()} axes in {len(kept)}/{len(V)} modules survive")
    return kept


def resolve_v_hack(
    model: torch.nn.Module,
    adapters: dict[str, SVDLinear],
    tokenizer,
    header: dict[str, str],
    pairs: list[Pair],
    path: Path,
    on_mismatch: Literal["extract", "error"],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Load v_hack from `path` if its header matches this run; otherwise extract and save
    (or raise, naming the field, when on_mismatch='error')."""
    if path.exists():
        V, S, found = read_v_hack(path)
        mismatch = header_mismatch(found, header)
        if mismatch is None:
            logger.info(f"v_hack cache hit: {path}")
            return V, S
        if on_mismatch == "error":
            raise ValueError(f"v_hack file {path} does not fit this run: {mismatch}. Delete it or pass --on-v-hack-mismatch extract")
        logger.warning(f"v_hack file {path} does not fit this run ({mismatch}); re-extracting")
    else:
        logger.info(f"v_hack cache miss: {path}; extracting from {len(pairs)} pairs")
    V, S = extract_v_hack(model, adapters, tokenizer, pairs, int(header["k"]), header["loss_norm"])
    save_v_hack(path, V, S, header)
    return V, S


@dataclass
class ExtractConfig:
    """Extract v_hack from contrastive pairs and save it (what `just extract` runs)."""

    model: str = "tiny-random-qwen3"
    """HF hub id, local model folder, or tiny-random-qwen3 (built offline on first use)."""
    pairs: Path = REPO_ROOT / "data" / "pairs.jsonl"
    """Contrastive (hack, clean) pairs: JSONL rows {id, hack_style, hack, clean}."""
    problems: Path = REPO_ROOT / "data" / "problems.jsonl"
    """Problems the pairs' ids refer to (LeetCodeDataset schema)."""
    out: Path | None = None
    """Where to write v_hack; default: a path under cache_dir derived from the header."""
    k: int = 4
    """Right singular vectors kept per module before the noise cut."""
    loss_norm: LossNorm = "constant"
    """NLL normalisation; must match the training loss's (train.py's default: constant)."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Linear layers (by last name component) rewritten into SVD coordinates."""
    device: str = "auto"
    """Torch device; auto = cuda if available, else cpu."""
    cache_dir: Path = REPO_ROOT / "out" / "cache"
    """SVD cache (cache_dir/svd) and default v_hack location (cache_dir/v_hack)."""


def main(cfg: ExtractConfig) -> Path:
    problems = {p.id: p for p in load_problems(cfg.problems)}
    pairs = load_pairs(cfg.pairs, problems)
    model, tokenizer, dtype = load_model(cfg.model, pick_device(cfg.device))
    adapters = wrap_svd(model, cfg.targets, cfg.cache_dir / "svd")
    header = expected_header(cfg.model, adapters, dtype, cfg.targets, cfg.pairs, len(pairs), cfg.k, cfg.loss_norm)
    path = cfg.out or default_v_hack_path(header, cfg.cache_dir / "v_hack")
    V, S = extract_v_hack(model, adapters, tokenizer, pairs, cfg.k, cfg.loss_norm)
    save_v_hack(path, V, S, header)
    return path


if __name__ == "__main__":
    main(tyro.cli(ExtractConfig))
