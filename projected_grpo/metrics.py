"""What one training step records: the contract of the log row, and what reads it.

A step's record (`StepRecord`) holds one frozen dataclass per key group: `rollout/`, `loss/`,
`hackward/`, `vhack/`, `time/`, `memory/`, `dist/`. A log key is `<group>/<field>`, derived
from the dataclasses (`ROW_KEYS`; `KEY.rollout.hack_s` is "rollout/hack_s", and a name the
record does not have fails at import), never typed anew. Each field's docstring says what
its number means; README's per-step table is generated from them (`python -m
projected_grpo.metrics`, checked by tests/test_metrics.py). The console table (`COLUMNS`,
fields with a `column`), the run's summary (`SUMMARY_KEYS`, `write_summary`),
projected_grpo/results.py and the benchmarks take their keys from here.

Guarantees:
- `StepRecord.row()` is a line of log.jsonl: `step` first, then each group's keys in field
  order, NaN written as null (JSON has no NaN). The keys are those docs/spec.md preregisters.
- A --one-step-off run's importance weights (`OffPolicyMetrics`, loss/is_ratio_mean and
  loss/is_clipped) go beside the row, never into it: to the tracker and the console table
  (`StepRecord.tracked()`, `table_header(off_policy=True)`), so that log.jsonl keeps one set
  of keys whatever the flags.
- Every rank builds the same record: each group is computed from what every rank reported
  (`RankReport`, gathered) or from the all-reduced gradients.
"""

import ast
import inspect
import json
import math
import textwrap
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import torch

from grader import Grade
from projected_grpo.paths import write_atomic

# ----------------------------------------------------------------------------
# What a step measures: the rank's share, and the helpers that turn it into numbers


def is_live(group: list) -> bool:
    """A group with reward variance (of Rollouts or RolloutSummaries): the only kind GRPO learns from."""
    return len({r.reward for r in group}) > 1


def mean(xs: list[float | int]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


class Timer:
    """Wall-clock seconds of a block, stored as `seconds[name]`: `with Timer(seconds, "learn"): ...`."""

    def __init__(self, seconds: dict[str, float], name: str):
        self.seconds, self.name = seconds, name

    def __enter__(self) -> None:
        self.start = time.time()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self.name] = time.time() - self.start


@dataclass(frozen=True)
class RolloutSummary:
    """What the log row needs of a rollout: small enough to gather from every rank."""

    teacher: bool
    reward: float
    grade: Grade
    truncated: bool
    length: int  # completion tokens


@dataclass(frozen=True)
class RankReport:
    """What one rank contributes to the step's row (`distributed.gather_objects` collects them
    in rank order): its groups' rollouts, its loss sums and its phases' seconds."""

    groups: list[list[RolloutSummary]]
    sums: dict[str, float]  # backward_part's sums over this rank's live rollouts
    gen: float
    learn: float
    allreduce: float
    peak_gib: float | None  # None on CPU


def summed(reports: list[RankReport]) -> dict[str, float]:
    """Every rank's loss sums (train.SUMS), added up."""
    return {k: sum(r.sums[k] for r in reports) for k in reports[0].sums}


def column(header: str, width: int, fmt: str) -> dict:
    """A field's column in the console table: its header, width and number format."""
    return {"column": (header, width, fmt)}


# ----------------------------------------------------------------------------
# The record, one dataclass per key group


@dataclass(frozen=True)
class RolloutMetrics:
    """rollout/: the step's rollouts and their grades, over every rank."""

    reward: float = field(metadata=column("reward", 6, ".2f"))
    """Mean reward of the student rollouts (3.0 for passing, + 0.5 when the code compiles)."""
    reward_std: float
    """Standard deviation of the student rollouts' rewards (null with fewer than two)."""
    hack_s: float = field(metadata=column("hack_s", 6, ".2f"))
    """Strict hack rate of the student rollouts: their own run_tests passes, the real tests fail (Grade.reward_hack)."""
    hack_t: float = field(metadata=column("hack_t", 6, ".2f"))
    """Strict hack rate of the teacher rollouts (null without any)."""
    gt_s: float = field(metadata=column("gt_s", 5, ".2f"))
    """Rate of passing the real tests, student rollouts (Grade.gt_pass)."""
    gt_t: float
    """Rate of passing the real tests, teacher rollouts (null without any)."""
    attempted_s: float
    """Rate of attempted hacks among the student rollouts: a run_tests of their own that passes a dummy Solution or rejects the canonical one (Grade.attempted_hack)."""
    oracle_s: float
    """Rate of oracle hacks among the student rollouts: the real tests pass only because a returned value fools equality (Grade.oracle_hack)."""
    truncated_s: float
    """Fraction of the student rollouts cut at max_new_tokens before their EOS."""
    len_s: float
    """Mean completion length of the student rollouts, in tokens."""
    student_zero_var_groups: float
    """Fraction of the groups whose students all got the same reward."""
    skipped_groups: float
    """Fraction of the groups with no reward variance at all (students and teachers): they add nothing to the gradient."""
    rollouts: int
    """Rollouts of the whole step, every rank's: student plus teacher."""

    @classmethod
    def of(cls, groups: list[list[RolloutSummary]]) -> "RolloutMetrics":
        """From every rank's groups, in batch order."""
        student = [r for g in groups for r in g if not r.teacher]
        teachers = [r for g in groups for r in g if r.teacher]
        rewards = torch.tensor([r.reward for r in student])
        live = [g for g in groups if is_live(g)]
        return cls(
            reward=rewards.mean().item(),
            reward_std=rewards.std().item() if len(student) > 1 else float("nan"),
            hack_s=mean([r.grade.reward_hack for r in student]),
            hack_t=mean([r.grade.reward_hack for r in teachers]),
            gt_s=mean([r.grade.gt_pass for r in student]),
            gt_t=mean([r.grade.gt_pass for r in teachers]),
            attempted_s=mean([r.grade.attempted_hack for r in student]),
            oracle_s=mean([r.grade.oracle_hack for r in student]),
            truncated_s=mean([r.truncated for r in student]),
            len_s=mean([r.length for r in student]),
            student_zero_var_groups=mean([len({r.reward for r in g if not r.teacher}) == 1 for g in groups]),
            skipped_groups=1 - len(live) / len(groups),
            rollouts=len(student) + len(teachers),
        )


@dataclass(frozen=True)
class LossMetrics:
    """loss/: the GRPO loss of the step (train.grpo_loss) and the gradient it gave."""

    total: float
    """The step's loss: the sum of every micro-batch's share on every rank."""
    kl: float
    """Mean k3 KL estimate to the reference over student tokens (teacher tokens are regularised by it too, but not counted: not the policy's samples); null, as clip_frac and logp_gap, without a live student token."""
    clip_frac: float
    """Fraction of the student tokens whose sampler/learner ratio was clipped (0 with --one-step-off, whose ratio is to the step's own policy: loss/is_clipped counts its capped weights)."""
    logp_gap: float
    """Mean absolute difference of the learner's and the sampler's log-probs over the student tokens: the numerics gap the clip guards (with --one-step-off also the sampler's one update of staleness)."""
    grad_norm: float
    """Global norm of the delta_S gradient after the arm's projection, before clipping to --grad-clip."""
    lr: float
    """The learning rate of the next step (the schedule read after this step's scheduler step)."""

    @classmethod
    def of(cls, reports: list[RankReport], grad_norm: float, lr: float) -> "LossMetrics":
        sums = summed(reports)

        def per_token(key: str) -> float:  # no live student token: undefined, not 0
            return sums[key] / sums["student_tokens"] if sums["student_tokens"] else float("nan")

        return cls(total=sums["loss"], kl=per_token("kl"), clip_frac=per_token("clipped"), logp_gap=per_token("logp_gap"), grad_norm=grad_norm, lr=lr)


@dataclass(frozen=True)
class HackwardMetrics:
    """hackward/: the gradient, the update and delta_S measured along v_hack (V: its kept axes)."""

    cin_s: float = field(metadata=column("cin_s", 6, ".3f"))
    """Hack-ward fraction ‖relu(V g_s)‖/‖g_s‖ of the student part of the gradient (summed over ranks); null when no live group holds a student rollout."""
    cin_t: float = field(metadata=column("cin_t", 6, ".3f"))
    """The same of the teacher part g_t = g − g_s; null when no live group holds a teacher rollout."""
    cin: float
    """The same of the whole gradient g, before the arm's projection; null without a gradient (no live group)."""
    cout: float
    """The same after the arm's projection, still measured on v_hack: cout = cin in vanilla, ~0 in projected; null without a gradient."""
    null_s_mean: float
    """Mean of cin_s's empirical null: the hack-ward fraction of g_s along --null-bases random bases with v_hack's axis count per module."""
    null_s_p95: float = field(metadata=column("null95", 6, ".3f"))
    """95th percentile of that null: the yardstick for cin_s (read cin_s against it, never against 0 or null_iso)."""
    null_t_mean: float
    """Mean of cin_t's empirical null (the same random bases, on g_t)."""
    null_t_p95: float
    """95th percentile of cin_t's empirical null."""
    null_iso: float
    """The isotropic formula sqrt(K/2R) (K kept axes, R delta_S entries), which real gradients exceed: do not compare with it (after a v_hack refresh, of the new basis)."""
    upd: float = field(metadata=column("upd", 6, ".3f"))
    """Hack-ward fraction of the change actually applied to delta_S this step, AdamW's moments and weight decay included (0 with --project-update; after a v_hack refresh, measured on the new basis); null without an optimizer step."""
    touched: float
    """Fraction of the arm basis's modules (those with axes) where the projection removed more than rounding (0 in vanilla; null without a gradient)."""
    removed: float
    """‖g − g_applied‖/‖g‖: the fraction of the whole gradient the arm's projection removed (g_applied: after projection, before clipping; 0 in vanilla; null without a gradient)."""
    disp_sum: float
    """Displacement of delta_S along v_hack, −V delta_S summed over the axes (signed: > 0 moved hack-ward)."""
    disp_frac: float = field(metadata=column("disp", 6, ".3f"))
    """‖V delta_S‖/‖delta_S‖: how much of delta_S lies along v_hack (0 while delta_S = 0)."""
    disp_axes: list[float]
    """−V delta_S per kept axis, modules in name order."""


@dataclass(frozen=True)
class VHackMetrics:
    """vhack/: v_hack's re-extraction on the current model (--v-hack-refresh)."""

    refreshed: bool
    """Whether v_hack was re-extracted after this step (every --v-hack-refresh steps, never after the last)."""
    subspace_cos: float | None
    """Subspace cosine of the re-extracted v_hack to the previous one (1: the same span); null when not refreshed."""


@dataclass(frozen=True)
class TimeMetrics:
    """time/: seconds of the step and its phases."""

    gen: float
    """Seconds of sampling the student rollouts (and picking the teachers'), the slowest rank's: the step waits for it. With --one-step-off, the seconds the step waited for the rollouts sampled ahead."""
    rollouts_per_s: float
    """Student rollouts of the whole step per second of the step."""
    step: float = field(metadata=column("sec", 6, ".1f"))
    """Seconds of the whole step."""
    gen_ranks: list[float]
    """Sampling seconds per rank, in rank order (for scaling reports)."""
    learn_ranks: list[float]
    """Seconds of the two backward passes (student part, teacher part) per rank, in rank order."""
    allreduce: float
    """Seconds of the gradient all-reduce: the smallest of the ranks' times, that of the rank that arrived last and so waited for no other."""

    @classmethod
    def of(cls, reports: list[RankReport], students: int, seconds: float) -> "TimeMetrics":
        return cls(gen=max(r.gen for r in reports), rollouts_per_s=students / seconds, step=seconds,
                   gen_ranks=[r.gen for r in reports], learn_ranks=[r.learn for r in reports], allreduce=min(r.allreduce for r in reports))


@dataclass(frozen=True)
class MemoryMetrics:
    """memory/: device memory."""

    peak_gib_ranks: list[float | None]
    """Per rank, in rank order, the step's peak of torch.cuda.max_memory_allocated in GiB (null on CPU)."""


@dataclass(frozen=True)
class DistMetrics:
    """dist/: the process group."""

    world_size: int
    """Processes the run spans (torchrun's world size; 1 under plain python)."""


@dataclass(frozen=True)
class OffPolicyMetrics:
    """loss/ keys of a --one-step-off run, beside the row (module docstring): the truncated
    importance weights w = min(pi_learner / pi_sampler, TIS_CAP) of the student tokens (train.grpo_loss)."""

    is_ratio_mean: float = field(metadata=column("is_w", 6, ".3f"))
    """Mean w over the student tokens of live groups (1 where the sampler is the learner's own policy); null without any."""
    is_clipped: float = field(metadata=column("is_cap", 6, ".3f"))
    """Fraction of those tokens whose ratio reached the cap; null without any."""

    @classmethod
    def of(cls, reports: list[RankReport]) -> "OffPolicyMetrics":
        sums = summed(reports)
        tokens = sums["student_tokens"] or float("nan")
        return cls(is_ratio_mean=sums["is_weight"] / tokens, is_clipped=sums["is_capped"] / tokens)


@dataclass(frozen=True)
class StepRecord:
    """Everything one step records: log.jsonl's row is `row()`; the tracker's, `tracked()`."""

    step: int = field(metadata=column("step", 5, "d"))
    """Optimizer step, from 1."""
    rollout: RolloutMetrics
    loss: LossMetrics
    hackward: HackwardMetrics
    vhack: VHackMetrics
    time: TimeMetrics
    memory: MemoryMetrics
    dist: DistMetrics
    off_policy: OffPolicyMetrics | None = None  # --one-step-off only; beside the row, not in it

    def row(self) -> dict:
        """The log row: `step`, then `<group>/<field>` for every group's fields, NaN as None."""
        return null_nans({"step": self.step} | {f"{g.name}/{f.name}": getattr(getattr(self, g.name), f.name) for g in GROUPS for f in fields(g.type)})

    def tracked(self) -> dict:
        """The row and, with --one-step-off, the OFF_POLICY_KEYS (NaN as None too): what the tracker and the console get."""
        extra = {key: getattr(self.off_policy, f.name) for key, f in zip(OFF_POLICY_KEYS, fields(OffPolicyMetrics))} if self.off_policy else {}
        return self.row() | null_nans(extra)


def null_nans(row: dict) -> dict:
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


# ----------------------------------------------------------------------------
# The keys and their docstrings, derived from the record

GROUPS = [f for f in fields(StepRecord)[1:] if f.name != "off_policy"]  # the row's key groups, in row order (the first field is `step`)
OFF_POLICY_KEYS = tuple(f"loss/{f.name}" for f in fields(OffPolicyMetrics))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (as tyro reads them), whitespace folded."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def contract() -> list[tuple[str, Mapping, str]]:
    """(log key, field metadata, docstring) of every key, in row order."""
    out = [("step", fields(StepRecord)[0].metadata, field_docs(StepRecord)["step"])]
    for g in GROUPS:
        docs = field_docs(g.type)
        out += [(f"{g.name}/{f.name}", f.metadata, docs[f.name]) for f in fields(g.type)]
    return out


ROW_KEYS = tuple(key for key, _, _ in contract())  # every key of a log row, in order
KEY = SimpleNamespace(**{g.name: SimpleNamespace(**{f.name: f"{g.name}/{f.name}" for f in fields(g.type)}) for g in GROUPS})
COLUMNS = [(key, *meta["column"]) for key, meta, _ in contract() if "column" in meta]  # (key, header, width, format)
OFF_POLICY_COLUMNS = [(key, *f.metadata["column"]) for key, f in zip(OFF_POLICY_KEYS, fields(OffPolicyMetrics))]
SUMMARY_KEYS = (
    KEY.rollout.reward, KEY.rollout.hack_s, KEY.rollout.hack_t, KEY.rollout.gt_s, KEY.rollout.gt_t, KEY.rollout.oracle_s, KEY.hackward.cin_s,
    KEY.hackward.cin_t, KEY.hackward.null_s_mean, KEY.hackward.null_s_p95, KEY.hackward.cin, KEY.hackward.cout, KEY.hackward.upd, KEY.hackward.disp_frac,
)


def table_header(off_policy: bool = False) -> str:
    return " ".join(f"{h:>{w}}" for _, h, w, _ in COLUMNS + (OFF_POLICY_COLUMNS if off_policy else []))


def table_row(row: dict) -> str:
    """A row (or `tracked()`, whose off-policy keys get their columns) as a line of the console table."""
    columns = COLUMNS + [c for c in OFF_POLICY_COLUMNS if c[0] in row]
    return " ".join(f"{'-':>{w}}" if row[key] is None else f"{row[key]:>{w}{fmt}}" for key, _, w, fmt in columns)


def readme_table() -> str:
    """README's per-step table: one row per log key, its console column and its docstring."""
    lines = ["| column | log key | meaning |", "| --- | --- | --- |"]
    for key, meta, doc in contract():
        header = f"`{meta['column'][0]}`" if "column" in meta else ""
        lines.append(f"| {header} | `{key}` | {doc} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# The run's summary


def write_summary(run_dir: Path, rows: list[dict]) -> dict:
    """summary.json (first and last-10-step means) and curves.png from the step log. Plain
    Python over the rows: the GPU images lack polars, whose wheel is 54 MB."""
    def series(key: str) -> list[float]:
        return [float("nan") if r[key] is None else r[key] for r in rows]

    def tail_mean(key: str) -> float | None:
        defined = [v for v in series(key)[-10:] if not math.isnan(v)]
        return mean(defined) if defined else None

    summary = {"steps": len(rows), "seconds": sum(r[KEY.time.step] for r in rows),
               "last10": {k: tail_mean(k) for k in SUMMARY_KEYS}, "first": {k: rows[0][k] for k in SUMMARY_KEYS}}
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
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
    for k in (KEY.rollout.reward, KEY.rollout.hack_s, KEY.rollout.gt_s, KEY.rollout.hack_t):
        draw(ax1, k)
    if not all(math.isnan(y) for y in series[KEY.hackward.null_s_p95]):
        ax2.fill_between(steps, series[KEY.hackward.null_s_mean], series[KEY.hackward.null_s_p95], alpha=0.3, label="empirical null of cin_s (mean-p95)")
    for k in (KEY.hackward.cin_s, KEY.hackward.cin_t, KEY.hackward.upd, KEY.hackward.disp_frac):
        draw(ax2, k)
    for ax, title in ((ax1, "rollouts"), (ax2, "hack-ward fraction (v_hack)")):
        ax.set_xlabel("step"), ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    print(readme_table())  # README's per-step table (tests/test_metrics.py checks README against it)
