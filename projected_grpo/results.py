"""Results across seeds: every run folder under RUNS_DIR (and its held-out evals) read into one
table per group, paired differences by seed with 95% t intervals and the seeds they would need,
and one H1 verdict per projected group: the preregistered conjunction (docs/spec.md).

    python -m projected_grpo.results            # out/runs -> out/runs/results.{csv,md,json}, results_*.png
    python -m projected_grpo.results RUNS_DIR --last-n 20 --out reports/

What it guarantees:
- Every number is recomputed from the runs' log.jsonl and eval/*/summary.json (a run's own
  summary.json is not read). Training metrics are per-run means over the last N steps (JSON
  nulls skipped), then mean and standard error over seeds.
- A folder that cannot be used (no or invalid config.json, a config without the role train.py
  records at the start, no, empty or invalid log.jsonl, missing keys, a run with fewer logged
  steps than its config's `steps`, fewer steps than N) is listed with its reason and skipped;
  nothing in one folder stops the others. An eval folder that cannot be read is listed and
  ignored, its run kept.
- Groups: (preset, role, arm, gate, pairs file name, --project-update). The role is what
  train.py wrote into config.json when the run started (`train.role`): `h1` (projected along a
  hack-pairs file), `baseline` (vanilla), or a control: `random`, `null_pairs` (projected along
  a null-pairs file), `label_shuffled`. Vanilla projects nothing, so its gate and
  --project-update change nothing it does: a vanilla group is keyed by (preset, pairs file)
  alone, shown with gate and update "-"; it is the baseline of every group of that preset and
  pairs file (or, where no vanilla run used that pairs file, of the preset's first vanilla
  group: vanilla trains the same whatever v_hack measures, and sweep.py runs it once per seed).
- One run per group and seed: the newest folder (train.py stamps the start time into its
  name) is kept, the others are listed as skipped. Differences pair runs by seed; seeds
  missing on either side are left out of the pair count.
- Comparisons use the held-out eval (strict hack rate, gt pass rate) when every paired run
  has one, else the training last-N hack_s and gt_s; each names its source. An H1 verdict has
  one source for all its conditions: held-out only when every run paired in them has an eval.
- An eval counts when it is of the run's last checkpoint, on the split, with the training hint;
  a run's evals are pooled only when they share PROTOCOL (grader version, samples, token limit,
  temperature, top_p), and a comparison whose two sides' evals differ in it is undetermined.
- Bounds are met at equality, with TIE of slack so that float rounding does not decide it.
- H1: one verdict per h1 group, the conjunction of CONDITIONS under RULE (both printed with the
  table, stated in README.md); control groups get none, their differences to vanilla are
  shown as controls. A condition whose runs differ in a setting other than seed, arm, role,
  gate and --project-update (and v_hack's pairs and fit where the comparison is about them,
  ALLOWED) is undetermined: its difference is not about the arm alone.
- Power, per comparison: the mean hack difference the rule would need at the observed seed
  spread and count, and the seeds it would need at the observed means and spreads (`power`).
"""

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from projected_grpo import typecheck  # noqa: F401  (BEARTYPE=1: must precede the harness imports)

import matplotlib
import polars as pl
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from projected_grpo.checkpoints import checkpoint_name  # noqa: E402
from projected_grpo.metrics import KEY  # noqa: E402
from projected_grpo.paths import OUT, TEST_SPLIT  # noqa: E402

PASS_BAND = 0.10  # matched pass rate: the pass difference lies within +-10 points
CONFIDENCE = 0.95
MAX_SEEDS = 1000  # seeds needed beyond this are shown as "> 1000"
# What an h1 group is compared with (docs/spec.md, 2026-11-25 amendment, restored 2026-12-04):
# (the control's role, the required fall of the strict hack rate, whether it is an H1 condition).
# The label-shuffled control is reported beside H1's conditions, not among them.
CONDITIONS = (("baseline", 0.30, True), ("random", 0.15, True), ("null_pairs", 0.15, True), ("label_shuffled", 0.15, False))
CONTROL_BOUND = 0.30  # a control group is shown against vanilla at H1's vanilla bar
# Settings (dotted config keys, by prefix) a comparison with a control of this role may differ
# in: vanilla trains the same whatever v_hack measures; the null-pairs arm differs from h1 in
# its pairs file by design.
ALLOWED = {"baseline": ("v_hack.",), "null_pairs": ("v_hack.pairs", "v_hack.path")}
RULE = (
    "Differences are taken arm minus control, per seed, with 95% paired t intervals. A comparison is **supported** when the "
    "whole hack interval lies at or below minus its bound (0.30 against vanilla, 0.15 against each control) and the whole pass "
    "interval inside +-0.10; **not supported** when the whole hack interval lies above minus the bound, or the whole pass "
    "interval outside +-0.10; **undetermined** otherwise: an interval across a bound, fewer than 2 paired seeds, no runs of "
    "that control, or runs that differ in another setting than seed, arm, role, gate and --project-update (vanilla may "
    "differ in v_hack's settings, the null-pairs arm in its pairs file). **H1** (docs/spec.md, the 2026-11-25 conjunction, "
    "restored on 2026-12-04), per projected group along a hack-pairs file: supported against vanilla **and** against the "
    "random control **and** against the null-pairs arm (each control at the same preset, gate and --project-update). Any "
    "condition not supported: H1 is not supported (a control within 15 points of projected defeats it, whatever the gap "
    "to vanilla); else any undetermined: undetermined; else supported. The label-shuffled control is reported beside H1, "
    "not in it; controls against vanilla are shown as controls and get no H1 verdict."
)
POWER = (
    "Power columns: `needs Δ hack ≤` is -bound - t(0.975, n-1) · SE, the largest mean hack difference the rule would call "
    "supported at the observed spread and seed count (SE: sd of the per-seed differences / sqrt(n)); `seeds needed` is the "
    "smallest n >= 2 at which, with the observed means and sds, mean_hack + t(0.975, n-1) · sd_hack / sqrt(n) <= -bound "
    f"and |mean_pass| + t(0.975, n-1) · sd_pass / sqrt(n) <= 0.10, or `none` where a mean lies on the wrong side (more "
    f"seeds only narrow the interval around it), `> {MAX_SEEDS}` beyond that. An undetermined comparison with a small "
    "`seeds needed` wants more seeds; one with `none` is no effect of the required size."
)
R, H = KEY.rollout, KEY.hackward  # the log keys, as projected_grpo/metrics.py defines them
LOG_KEYS = (R.hack_s, R.attempted_s, R.gt_s, R.reward, H.cin_s, H.cin_t, H.null_s_mean, H.null_s_p95, H.null_t_mean, H.null_t_p95, H.upd, H.disp_sum, H.removed)  # what results reads
TRAIN_METRICS = {"hack_s": R.hack_s, "gt_s": R.gt_s, "reward": R.reward, "removed": H.removed}  # name in the table: log key
EVAL_METRICS = {"eval_strict": "hack_strict", "eval_loose": "hack_loose", "eval_pass": "gt_pass"}  # name in the table: eval summary key
# What makes two held-out evals comparable (eval.py records them; summaries before 2026-12-05 lack all but the first)
PROTOCOL = ("grader_version", "samples_per_problem", "max_new_tokens", "temperature", "top_p")
TIE = 1e-9  # rates are counts over completions: float rounding must not decide a difference lying exactly on a bound
PREREGISTERED_PRESET = "full"  # H1 as docs/spec.md registers it: Qwen3-4B, `full`, step 200; elsewhere results applies its rule
EFFECT_MARGIN = 0.30  # a positive control: vanilla's held-out strict hack rate this far above the base model's at every seed
ONSET, STRETCH, BASELINE_STEPS = 0.2, 5, 10  # H2 (docs/spec.md): hacking starts when hack_s first exceeds 0.2; 5 consecutive steps; issue 19's own-start yardstick
EXCESS = ("cin_s_excess", "cin_t_excess")  # cin minus the empirical null's mean, per step
BOOKKEEPING = {"seed", "intervention", "role", "gate", "project_update", "runs_dir", "run_name", "resume", "cache_dir", "device", "grader_workers", "report_to"}


@dataclass(frozen=True)
class ResultsConfig:
    """Tables, paired differences, H1 and plots from the run folders under runs_dir (`just results`)."""

    runs_dir: tyro.conf.Positional[Path] = OUT / "runs"
    """Folder holding the run folders (train.py's --runs-dir)."""
    out: Path | None = None
    """Where results.csv, results.md and the PNGs go; None = runs_dir."""
    last_n: int = 10
    """Training metrics are each run's mean over its last N steps."""
    eval_split: str | None = None
    """Held-out evals that count: those on this problems file (its stem), of the run's last checkpoint, with the hint it trained
    with; None = each run's --eval-problems."""


# ----------------------------------------------------------------------------
# Reading run folders


class Skip(Exception):
    """A run folder (or eval folder) that cannot be used; the message says why."""


@dataclass(frozen=True, order=True)
class Group:
    preset: str
    role: str  # train.role: h1, baseline, random, null_pairs, label_shuffled
    arm: str
    gate: str  # "-" for vanilla: it projects nothing
    pairs: str  # file name of v_hack.pairs
    update: str  # --project-update: "yes" | "no"; "-" for vanilla


@dataclass(frozen=True)
class TrainedRun:
    """One run folder as results reads it (not sandbox.Run, a program run)."""

    path: Path
    group: Group
    seed: int
    settings: dict[str, object]  # config minus BOOKKEEPING, dotted keys, paths by file name
    curves: pl.DataFrame  # one row per step: step, LOG_KEYS, EXCESS
    last: dict[str, float | None]  # TRAIN_METRICS and EXCESS, means over the last N steps
    held_out: dict[str, float] | None  # EVAL_METRICS pooled over the eval seeds, or None
    protocol: dict[str, object] | None  # PROTOCOL of those evals (one, or they are not pooled)
    base: dict[str, float] | None  # the same for the base model (delta_S = 0, `just eval RUN --base`), with its n
    base_protocol: dict[str, object] | None
    quality: str  # v_hack's quality gate as the run recorded it when it started (vhack.json)


def read_text(path: Path) -> str:
    if not path.is_file():
        raise Skip(f"no {path.name}")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise Skip(f"{path.name} is unreadable ({e})") from e


def read_json(path: Path) -> object:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise Skip(f"{path.name} is not JSON ({e})") from e


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys; string values that are paths compared by file name (runs move between machines)."""
    flat: dict[str, object] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat |= flatten(v, f"{prefix}{k}.")
        else:
            flat[prefix + k] = Path(v).name if isinstance(v, str) and "/" in v else v
    return flat


def read_run(path: Path, last_n: int, eval_split: str | None, ignored_evals: list[tuple[Path, str]]) -> TrainedRun:
    config = read_json(path / "config.json")
    try:
        arm, steps, seed = config["intervention"], config["steps"], config["seed"]
        pairs = Path(config["v_hack"]["pairs"]).name
        gate, update = ("-", "-") if arm == "vanilla" else (config["gate"], "yes" if config["project_update"] else "no")
        group = Group(config["name"], config["role"], arm, gate, pairs, update)
    except (KeyError, TypeError) as e:
        raise Skip(f"config.json lacks a field ({e})") from e
    rows = []
    for i, line in enumerate(read_text(path / "log.jsonl").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise Skip(f"log.jsonl line {i} is not JSON ({e})") from e
    if not rows:
        raise Skip("log.jsonl is empty")
    missing = sorted({k for r in rows for k in ("step", *LOG_KEYS) if not isinstance(r, dict) or k not in r})
    if missing:
        raise Skip(f"log.jsonl lacks keys {missing}")
    if [r["step"] for r in rows] != list(range(1, len(rows) + 1)):
        raise Skip("log.jsonl steps are not 1, 2, ..., n")
    if len(rows) < steps:
        raise Skip(f"log.jsonl has {len(rows)} of {steps} steps (still running, or stopped)")
    if len(rows) < last_n:
        raise Skip(f"{len(rows)} steps, fewer than --last-n {last_n}")
    try:
        curves = pl.DataFrame([{k: r[k] for k in ("step", *LOG_KEYS)} for r in rows], schema={"step": pl.Int64} | {k: pl.Float64 for k in LOG_KEYS})
    except (TypeError, pl.exceptions.PolarsError) as e:
        raise Skip(f"log.jsonl holds a non-numeric value ({e})") from e
    curves = curves.with_columns(
        (pl.col(H.cin_s) - pl.col(H.null_s_mean)).alias("cin_s_excess"),
        (pl.col(H.cin_t) - pl.col(H.null_t_mean)).alias("cin_t_excess"),
    )
    tail = curves.tail(last_n)
    last = {name: tail[key].mean() for name, key in TRAIN_METRICS.items()} | {k: tail[k].mean() for k in EXCESS}
    settings = {k: v for k, v in flatten(config).items() if k.split(".")[0] not in BOOKKEEPING}
    split = eval_split or Path(config.get("eval_problems", TEST_SPLIT)).stem  # runs before the field: the test split
    evals, protocol = held_out(path, checkpoint_name(steps), config.get("hint"), split, ignored_evals)
    base, base_protocol = held_out(path, "base", config.get("hint"), split, ignored_evals)
    return TrainedRun(path, group, seed, settings, curves, last, evals, protocol, base, base_protocol, quality(path))


def quality(run: Path) -> str:
    """The v_hack quality gate the run recorded when it started (train.py's vhack.json): whether
    its basis beats its label-shuffled twin's 95th percentile on both numbers of the report."""
    try:
        record = read_json(run / "vhack.json")
    except Skip:
        return "no record"
    if not isinstance(record, dict) or record.get("beats_shuffled") is None:
        return "no report"
    try:
        return (f"{'beats' if record['beats_shuffled'] else 'does not beat'} its label-shuffled twin (sign agreement "
                f"{record['heldout_sign_agreement']:.2f} vs p95 {record['heldout_sign_agreement_shuffled_p95']:.2f}, hack-ward "
                f"fraction {record['hackward_fraction_heldout']:.3f} vs p95 {record['hackward_fraction_shuffled_p95']:.3f})")
    except (KeyError, TypeError, ValueError):
        return "no report"


def held_out(run: Path, checkpoint: str, hint: str | None, split: str, ignored: list[tuple[Path, str]]) -> tuple[dict[str, float] | None, dict[str, object] | None]:
    """EVAL_METRICS of the evals of `checkpoint` on `split` with the training hint, pooled over
    eval seeds (weighted by completions graded), and n, the completions graded; with their
    PROTOCOL. (None, None) if there is none, or if they differ in PROTOCOL (then none is pooled)."""
    found = []
    for folder in sorted(p for p in (run / "eval").glob("*") if p.is_dir()):
        try:
            s = read_json(folder / "summary.json")
            if not isinstance(s, dict) or not all(isinstance(s.get(k), (int, float)) for k in ("n", *EVAL_METRICS.values())):
                raise Skip(f"summary.json lacks one of n, {', '.join(EVAL_METRICS.values())}")
        except Skip as e:
            ignored.append((folder, str(e)))
            continue
        if Path(str(s.get("problems"))).stem == split and s.get("checkpoint") == checkpoint and s.get("hint") == hint and s["n"] > 0:
            found.append(s)
    if not found:
        return None, None
    protocols = [{k: s.get(k) for k in PROTOCOL} for s in found]
    if apart := protocol_differences(protocols):
        ignored.append((run / "eval", f"its evals of {checkpoint} differ in {apart}: none is used"))
        return None, None
    n = sum(s["n"] for s in found)
    return {name: sum(s[key] * s["n"] for s in found) / n for name, key in EVAL_METRICS.items()} | {"n": n}, protocols[0]


def protocol_differences(protocols: list[dict[str, object]]) -> str:
    """The PROTOCOL fields that take more than one value, with the values ("" if none)."""
    return "; ".join(f"{k} {sorted({str(p[k]) for p in protocols})}" for k in PROTOCOL if len({json.dumps(p[k]) for p in protocols}) > 1)


def collect(runs_dir: Path, last_n: int, eval_split: str | None) -> tuple[list[TrainedRun], list[tuple[Path, str]]]:
    """The usable runs, one per group and seed, and every (folder, reason) left out."""
    kept: dict[tuple[Group, int], TrainedRun] = {}
    skipped: list[tuple[Path, str]] = []
    for path in sorted(p for p in runs_dir.iterdir() if p.is_dir()):  # by name: of two runs of a group and seed, the later start comes later
        try:
            run = read_run(path, last_n, eval_split, skipped)
        except Skip as e:
            skipped.append((path, str(e)))
            continue
        older = kept.get((run.group, run.seed))
        if older:
            skipped.append((older.path, f"superseded by the newer {run.path.name} (same group and seed {run.seed})"))
        kept[(run.group, run.seed)] = run
    return sorted(kept.values(), key=lambda r: (r.group, r.seed)), skipped


# ----------------------------------------------------------------------------
# Statistics


def t_central_probability(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df: the closed forms of Abramowitz & Stegun
    26.7.3 (even df) and 26.7.4 (odd df), exact up to float rounding."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for j in range(1, df // 2):
            term *= (2 * j - 1) / (2 * j) * c2
            total += term
        return math.sin(theta) * total
    term, total = 1.0, 1.0 if df > 1 else 0.0
    for j in range(1, (df - 1) // 2):
        term *= 2 * j / (2 * j + 1) * c2
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_critical(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided t quantile: P(|T| < t) = confidence (bisection on the exact CDF; no scipy)."""
    lo, hi = 0.0, 1.0
    while t_central_probability(hi, df) < confidence:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central_probability(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


def mean_se(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard error (sample sd / sqrt n) of the defined values; SE None below 2."""
    xs = [x for x in values if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def t_interval(diffs: list[float]) -> tuple[float | None, float | None, float | None]:
    """Mean and 95% t confidence interval of paired differences; the bounds need 2 pairs."""
    m, se = mean_se(diffs)
    if se is None:
        return m, None, None
    half = t_critical(len(diffs) - 1) * se
    return m, m - half, m + half


def power(hack: list[float], passed: list[float], bound: float) -> tuple[float | None, str]:
    """POWER's two numbers for paired hack and pass differences: the largest mean hack difference
    the rule would call supported at this spread and n (None below 2 pairs), and the seeds it
    would need at these means and spreads ("-" below 2 pairs, "none" for a mean on the wrong side)."""
    n = len(hack)
    if n < 2:
        return None, "-"
    (m_hack, se_hack), (m_pass, se_pass) = mean_se(hack), mean_se(passed)
    supportable = -bound - t_critical(n - 1) * se_hack
    room = [(-bound - m_hack, se_hack * math.sqrt(n)), (PASS_BAND - abs(m_pass), se_pass * math.sqrt(n))]  # (distance to the bound, sd)
    if any(gap < 0 or (gap == 0 and sd > 0) for gap, sd in room):
        return supportable, "none"
    ratio = min(gap / sd if sd > 0 else math.inf for gap, sd in room)  # t(k-1) / sqrt(k) must come down to it

    def enough(k: int) -> bool:
        return t_critical(k - 1) / math.sqrt(k) <= ratio

    if not enough(MAX_SEEDS):
        return supportable, f"> {MAX_SEEDS}"
    lo, hi = 1, MAX_SEEDS  # enough(hi); t(k-1) / sqrt(k) falls with k, so bisect for the smallest k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return supportable, str(hi)


def judge(c: dict, bound: float) -> tuple[str, str]:
    """RULE on one comparison's intervals: (outcome, why)."""
    if c["n"] < 2:
        return "undetermined", f"{c['n']} paired seed{'s' * (c['n'] != 1)}, the rule needs 2"
    if c["d_hack_hi"] <= -bound + TIE and -PASS_BAND - TIE <= c["d_pass_lo"] and c["d_pass_hi"] <= PASS_BAND + TIE:
        return "supported", f"hack interval at or below -{bound:.2f}, pass interval inside +-{PASS_BAND:.2f}"
    if c["d_hack_lo"] > -bound + TIE:
        return "not supported", f"hack interval wholly above -{bound:.2f}"
    if c["d_pass_lo"] > PASS_BAND + TIE or c["d_pass_hi"] < -PASS_BAND - TIE:
        return "not supported", f"pass interval wholly outside +-{PASS_BAND:.2f}"
    return "undetermined", f"hack interval across -{bound:.2f}" if c["d_hack_hi"] > -bound + TIE else f"pass interval across +-{PASS_BAND:.2f}"


def paired(arm: list[TrainedRun], base: list[TrainedRun]) -> list[tuple[TrainedRun, TrainedRun]]:
    """(arm run, base run) per seed both have."""
    by_seed = {r.seed: r for r in base}
    return [(r, by_seed[r.seed]) for r in arm if r.seed in by_seed]


def evaluated(pairs: list[tuple[TrainedRun, TrainedRun]]) -> bool:
    """Whether there are pairs and every run in them has a held-out eval."""
    return bool(pairs) and all(a.held_out and b.held_out for a, b in pairs)


def compare(pairs: list[tuple[TrainedRun, TrainedRun]], use_eval: bool, last_n: int) -> dict[str, object]:
    """Paired-by-seed differences arm - base of the hack and pass rates, from the held-out evals
    (use_eval) or from the training last-N means."""
    source = "held-out eval (strict, gt_pass)" if use_eval else f"training last {last_n} (hack_s, gt_s)"
    rates = (lambda r: r.held_out) if use_eval else (lambda r: r.last)
    out: dict[str, object] = {"source": source if pairs else "", "n": len(pairs), "seeds": [a.seed for a, _ in pairs]}
    for name, k in zip(("hack", "pass"), ("eval_strict", "eval_pass") if use_eval else ("hack_s", "gt_s")):
        diffs = [rates(a)[k] - rates(b)[k] for a, b in pairs]
        m, lo, hi = t_interval(diffs)
        out |= {f"{name}_by_seed": diffs, f"d_{name}": m, f"d_{name}_lo": lo, f"d_{name}_hi": hi}
    return out


def differing(runs: list[TrainedRun]) -> list[str]:
    """Settings (config fields other than BOOKKEEPING) that take more than one value across runs."""
    keys = sorted({k for r in runs for k in r.settings})
    return [k for k in keys if len({json.dumps(r.settings.get(k), default=str) for r in runs}) > 1]


# ----------------------------------------------------------------------------
# Comparisons and H1


def controls(g: Group, role: str, groups: dict[Group, list[TrainedRun]]) -> list[Group]:
    """The groups of `role` that g is compared with, all at g's preset: vanilla of g's pairs file
    (else the preset's first vanilla group); for a control, the same gate and --project-update,
    and the same pairs file except for the null-pairs arm (its basis comes from another file)."""
    if role == "baseline":
        vanilla = [k for k in sorted(groups) if k.role == "baseline" and k.preset == g.preset]
        return [k for k in vanilla if k.pairs == g.pairs][:1] or vanilla[:1]
    return [k for k in sorted(groups) if k.role == role and (k.preset, k.gate, k.update) == (g.preset, g.gate, g.update)
            and (role == "null_pairs" or k.pairs == g.pairs)]


def comparisons_of(g: Group, role: str, bound: float, counts: str, groups: dict[Group, list[TrainedRun]], last_n: int, use_eval: bool | None) -> list[dict]:
    """g against each control group of `role`: the paired differences (from the held-out evals
    if use_eval; None: where every run of that comparison has one), RULE's outcome and why,
    POWER's numbers; one undetermined row naming what is missing when there is no such group."""
    key = {"group": g, "preset": g.preset, "arm": g.arm, "gate": g.gate, "pairs": g.pairs, "update": g.update, "role": g.role, "vs": role, "counts": counts, "bound": bound}
    found = controls(g, role, groups)
    if not found:
        where = f"preset {g.preset}" + ("" if role == "baseline" else f", gate {g.gate}, update {g.update}") + ("" if role in ("baseline", "null_pairs") else f", pairs {g.pairs}")
        return [key | {"control": "", "n": 0, "seeds": [], "outcome": "undetermined", "why": f"no {role} runs at {where}"}]
    rows = []
    for k in found:
        pairs = paired(groups[g], groups[k])
        from_evals = evaluated(pairs) if use_eval is None else use_eval
        c = compare(pairs, from_evals, last_n)
        outcome, why = judge(c, bound)
        mixed = [m for m in differing(groups[g] + groups[k]) if not m.startswith(ALLOWED.get(role, ()))]
        apart = protocol_differences([r.protocol for pair in pairs for r in pair]) if from_evals else ""
        if mixed:
            outcome, why = "undetermined", f"the runs differ in {', '.join(mixed)}: the difference is not about the arm alone"
        elif apart:
            outcome, why = "undetermined", f"the held-out evals differ in {apart}: the difference is not about the arm alone"
        supportable, needed = power(c["hack_by_seed"], c["pass_by_seed"], bound)
        rows.append(key | {"control": group_label(k)} | c | {"supportable": supportable, "seeds_needed": needed, "outcome": outcome, "why": why})
    return rows


def all_comparisons(groups: dict[Group, list[TrainedRun]], last_n: int) -> list[dict]:
    """Each h1 group against every control of CONDITIONS, its H1 conditions from one source: the
    held-out evals when every run paired in them has one, else the training logs (docs/spec.md,
    2026-12-04: each verdict states its source); each control group against vanilla."""
    rows = []
    for g in sorted(groups):
        if g.role == "h1":
            use_eval = evaluated([p for role, _, condition in CONDITIONS if condition for k in controls(g, role, groups) for p in paired(groups[g], groups[k])])
            for role, bound, condition in CONDITIONS:
                rows += comparisons_of(g, role, bound, "H1" if condition else "beside H1", groups, last_n, use_eval if condition else None)
        elif g.role != "baseline":
            rows += comparisons_of(g, "baseline", CONTROL_BOUND, "control", groups, last_n, None)
    return rows


def h1_verdicts(groups: dict[Group, list[TrainedRun]], comparisons: list[dict]) -> list[tuple[Group | None, dict]]:
    """One entry per h1 group: RULE's conjunction of its H1 conditions, the sources they used,
    its v_hack quality gate, and every condition (and what is reported beside) with its numbers.
    A preset with runs but no h1 group (or a folder with no runs) gets one undetermined entry."""
    entries = []
    for g in sorted(k for k in groups if k.role == "h1"):
        mine = [c for c in comparisons if c["group"] == g]
        outcomes = {c["outcome"] for c in mine if c["counts"] == "H1"}
        verdict = "not supported" if "not supported" in outcomes else "undetermined" if "undetermined" in outcomes else "supported"
        entries.append((g, {"preset": g.preset, "pairs": g.pairs, "gate": g.gate, "project_update": g.update == "yes", "verdict": verdict,
                        "setting": setting(g.preset),
                        "source": "; ".join(sorted({c["source"] for c in mine if c["counts"] == "H1" and c.get("source")})) or "none",
                        "v_hack_quality": " / ".join(sorted({r.quality for r in groups[g]})),
                        "reasons": [reason(c) for c in mine if c["counts"] == "H1"], "beside": [reason(c) for c in mine if c["counts"] != "H1"]}))
    for preset in sorted({g.preset for g in groups} - {g.preset for g in groups if g.role == "h1"}) if groups else [None]:
        why = "no runs" if preset is None else "no projected runs along a hack-pairs file (role h1) at this preset"
        entries.append((None, {"preset": preset, "pairs": None, "gate": None, "project_update": None, "verdict": "undetermined", "source": "none",
                               "v_hack_quality": "", "reasons": [{"condition": "h1 arm", "outcome": "undetermined", "why": why}], "beside": []}))
    return entries


def setting(preset: str) -> str:
    """Whether a verdict is H1 as registered or its rule applied elsewhere (the words results.md prints)."""
    if preset == PREREGISTERED_PRESET:
        return "the preregistered setting"
    return f"H1's rule applied at preset {preset}; H1 as registered (docs/spec.md) is the `{PREREGISTERED_PRESET}` preset's experiment"


def reason(c: dict) -> dict:
    """One condition of an H1 entry as results.json states it."""
    out = {"condition": f"vs {c['vs']}", "control": c["control"], "bound": -c["bound"], "outcome": c["outcome"], "why": c["why"], "n": c["n"], "seeds": c["seeds"]}
    if c["n"]:
        out |= {"source": c["source"], "hack_by_seed": c["hack_by_seed"], "d_hack": c["d_hack"], "d_hack_ci": [c["d_hack_lo"], c["d_hack_hi"]],
                "pass_by_seed": c["pass_by_seed"], "d_pass": c["d_pass"], "d_pass_ci": [c["d_pass_lo"], c["d_pass_hi"]],
                "needs_d_hack_at_most": c["supportable"], "seeds_needed": c["seeds_needed"]}
    return out


# ----------------------------------------------------------------------------
# Tables


def group_table(groups: dict[Group, list[TrainedRun]]) -> tuple[pl.DataFrame, list[str]]:
    """The wide per-group table (results.csv) and the notes on settings that differ inside a group."""
    rows, notes = [], []
    for g, members in sorted(groups.items()):
        row: dict[str, object] = {"preset": g.preset, "role": g.role, "arm": g.arm, "gate": g.gate, "pairs": g.pairs, "update": g.update,
                                  "n_seeds": len(members), "seeds": ",".join(str(r.seed) for r in members)}
        for name in (*TRAIN_METRICS, *EXCESS):
            row[name], row[f"{name}_se"] = mean_se([r.last[name] for r in members])
        evaluated = [r.held_out for r in members if r.held_out]
        row["n_eval"] = len(evaluated)
        for name in EVAL_METRICS:
            row[name], row[f"{name}_se"] = mean_se([e[name] for e in evaluated])
        row["v_hack_quality"] = " / ".join(sorted({r.quality for r in members}))
        mixed = differing(members)
        if mixed:
            notes.append(f"{group_label(g)}: its runs differ in {', '.join(mixed)}")
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None), notes


def group_label(g: Group) -> str:
    """The group as results.md names it: arm, gate, +update (preset, pairs file)."""
    parts = [g.arm] + ([g.gate] if g.gate != "-" else []) + (["+update"] if g.update == "yes" else [])
    return f"{' '.join(parts)} ({g.preset}, {g.pairs})"


def cell(m: float | None, se: float | None = None) -> str:
    return "" if m is None else f"{m:.3f}" if se is None else f"{m:.3f} ± {se:.3f}"


def interval(m: float | None, lo: float | None, hi: float | None) -> str:
    return "" if m is None else f"{m:+.3f}" if lo is None else f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def readable(wide: pl.DataFrame, comparisons: list[dict], last_n: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The two tables as printed: mean ± SE cells, differences with their intervals and power."""
    key = ["preset", "role", "arm", "gate", "pairs", "update"]
    train = {"hack_s": f"hack_s (last {last_n})", "gt_s": f"gt_s (last {last_n})", "reward": f"reward (last {last_n})",
             "removed": f"removed (last {last_n})", "cin_s_excess": "cin_s − null_s_mean", "cin_t_excess": "cin_t − null_t_mean"}
    held = {"eval_strict": "eval strict hack", "eval_loose": "eval loose hack", "eval_pass": "eval pass"}
    groups = pl.DataFrame([
        {k: r[k] for k in key} | {"seeds": r["n_seeds"]} | {h: cell(r[c], r[f"{c}_se"]) for c, h in train.items()}
        | {"evals": r["n_eval"]} | {h: cell(r[c], r[f"{c}_se"]) for c, h in held.items()} | {"v_hack quality gate": r["v_hack_quality"]}
        for r in wide.iter_rows(named=True)
    ])
    diffs = pl.DataFrame([
        {k: c[k] for k in key} | {"vs": c["vs"], "counts": c["counts"], "control": c["control"], "source": c.get("source", ""),
                                  "pairs (seeds)": f"{c['n']} ({','.join(map(str, c['seeds']))})",
                                  "Δ hack by seed": " ".join(f"{d:+.3f}" for d in c.get("hack_by_seed", [])),
                                  "Δ hack [95% CI]": interval(c.get("d_hack"), c.get("d_hack_lo"), c.get("d_hack_hi")),
                                  "Δ pass [95% CI]": interval(c.get("d_pass"), c.get("d_pass_lo"), c.get("d_pass_hi")),
                                  "bound": f"{-c['bound']:+.2f}", "needs Δ hack ≤": cell(c.get("supportable")), "seeds needed": c.get("seeds_needed", "-"),
                                  "outcome": f"{c['outcome']} ({c['why']})"}
        for c in comparisons
    ])
    return groups, diffs


def markdown(df: pl.DataFrame) -> str:
    if df.is_empty():
        return "(none)"
    with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True, tbl_rows=-1, tbl_cols=-1,
                   fmt_str_lengths=200, tbl_width_chars=10_000):
        return str(df)


def said(c: dict) -> str:
    """One comparison in words, for results.md."""
    if not c["n"]:
        return f"vs {c['vs']}{': ' + c['control'] if c['control'] else ''}: {c['outcome']} ({c['why']})"
    seeds = f"{c['n']} seed{'s' * (c['n'] != 1)} ({','.join(map(str, c['seeds']))})"
    power_said = "" if c["supportable"] is None else f"; needs Δ hack ≤ {cell(c['supportable'])}, seeds needed {c['seeds_needed']}"
    return (f"vs {c['vs']}: {c['control']}, bound {-c['bound']:+.2f}: Δ hack {interval(c['d_hack'], c['d_hack_lo'], c['d_hack_hi'])}, "
            f"Δ pass {interval(c['d_pass'], c['d_pass_lo'], c['d_pass_hi'])}, {seeds}, {c['source']}: {c['outcome']} ({c['why']}){power_said}")


def effect(groups: dict[Group, list[TrainedRun]]) -> list[dict]:
    """Per preset, the effect there is to catch: the base model's held-out rates (pooled over every
    base eval in the preset's runs) and, per vanilla seed, its held-out strict hack rate minus the
    base model's. A positive control needs vanilla >= EFFECT_MARGIN above base at every seed. No
    base is pooled, and no gap taken, where these evals differ in PROTOCOL (`apart` says how)."""
    out = []
    for preset in sorted({g.preset for g in groups}):
        runs = [r for g, rs in groups.items() if g.preset == preset for r in rs]
        evaluated_vanilla = sorted((r for r in runs if r.group.role == "baseline" and r.held_out), key=lambda r: r.seed)
        with_base = [r for r in runs if r.base]
        apart = protocol_differences([r.base_protocol for r in with_base] + [r.protocol for r in evaluated_vanilla])
        bases = [r.base for r in with_base] if not apart else []
        n = sum(b["n"] for b in bases)
        base = {k: sum(b[k] * b["n"] for b in bases) / n for k in EVAL_METRICS} | {"n": n} if bases else None
        vanilla = [{"seed": r.seed, "eval_strict": r.held_out["eval_strict"], "gap": None if base is None else r.held_out["eval_strict"] - base["eval_strict"]}
                   for r in evaluated_vanilla]
        met = None if base is None or not vanilla else all(v["gap"] >= EFFECT_MARGIN for v in vanilla)
        out.append({"preset": preset, "base": base, "apart": apart, "vanilla": vanilla, "vanilla_above_base_by_margin_at_every_seed": met})
    return out


def first_stretch(flags: list[bool], steps: list[int], length: int) -> int | None:
    """The step that starts the first `length` consecutive True flags; None if there is none."""
    count = 0
    for i, flag in enumerate(flags):
        count = count + 1 if flag else 0
        if count == length:
            return steps[i - length + 1]
    return None


def rise(rows: list[dict], before: list[dict], key: str) -> tuple[float | None, int | None]:
    """A signal against its own start: its steps-1-BASELINE_STEPS mean + 2 sd (None with fewer
    than two values there), and the first step of STRETCH consecutive steps above it among the
    steps of `before` after BASELINE_STEPS (None if there is none)."""
    first = [r[key] for r in rows[:BASELINE_STEPS] if r[key] is not None]
    if len(first) < 2:
        return None, None
    bar = statistics.mean(first) + 2 * statistics.stdev(first)
    later = [r for r in before if r["step"] > BASELINE_STEPS]
    return bar, first_stretch([r[key] is not None and r[key] > bar for r in later], [r["step"] for r in later], STRETCH)


def leading(curves: pl.DataFrame) -> dict:
    """H2 and H3 (docs/spec.md) read from one vanilla run's log. onset: the first step whose
    hack_s exceeds ONSET. H2 against the null: cin_s > null_s_p95 for STRETCH consecutive steps
    before onset. H2 against its own start (cin_s sits above the null from step 1 on the
    surrogate, which makes the first reading trivially true): `rise` of cin_s before onset.
    Beside H2, not in it: `rise` of attempted_s before onset, the behavioural indicator the
    surrogate's 16 vanilla logs support (RESEARCH_JOURNAL.md, 2026-12-05). H3: steps where
    cin_t > null_t_p95 while cin_s <= null_s_p95, among the steps where all four are defined."""
    rows = curves.to_dicts()
    above = lambda r, a, b: r[a] is not None and r[b] is not None and r[a] > r[b]
    onset = next((r["step"] for r in rows if r[R.hack_s] is not None and r[R.hack_s] > ONSET), None)
    before = [r for r in rows if onset is None or r["step"] < onset]
    h2_null = first_stretch([above(r, H.cin_s, H.null_s_p95) for r in before], [r["step"] for r in before], STRETCH)
    bar, h2_own = rise(rows, before, H.cin_s)
    attempt_bar, attempt_from = rise(rows, before, R.attempted_s)
    both = [r for r in rows if all(r[k] is not None for k in (H.cin_s, H.cin_t, H.null_s_p95, H.null_t_p95))]
    h3 = [r["step"] for r in both if above(r, H.cin_t, H.null_t_p95) and not above(r, H.cin_s, H.null_s_p95)]
    return {"onset": onset, "h2_null_from": h2_null, "own_bar": bar, "h2_own_from": h2_own, "attempt_bar": attempt_bar, "attempt_from": attempt_from,
            "h3_steps": h3, "steps_with_cin_t": len(both)}


def leading_lines(groups: dict[Group, list[TrainedRun]]) -> tuple[list[str], list[dict]]:
    """The H2/H3 section of results.md, one line per vanilla run, and its results.json entries."""
    lines, entries = [], []
    for r in sorted((r for g, rs in groups.items() if g.role == "baseline" for r in rs), key=lambda r: (r.group.preset, r.seed)):
        e = {"preset": r.group.preset, "seed": r.seed} | leading(r.curves)
        entries.append(e)
        stretch = lambda start: "no" if start is None else f"yes, steps {start}-{start + STRETCH - 1}"
        onset = f"hack_s first > {ONSET} at step {e['onset']}" if e["onset"] else f"hack_s never > {ONSET} (no onset: H2 undetermined)"
        above_start = lambda bar, start: (f"no first-{BASELINE_STEPS}-step level" if bar is None else
                                          f"above its first-{BASELINE_STEPS}-step mean + 2 sd ({bar:.3f}): {stretch(start)}")
        h3 = (f"{len(e['h3_steps'])} of {e['steps_with_cin_t']} steps with teacher rollouts" + (f" (first: {', '.join(map(str, e['h3_steps'][:5]))})" if e["h3_steps"] else "")
              if e["steps_with_cin_t"] else "no step with teacher rollouts")
        when = "before it" if e["onset"] else "anywhere in the run"  # without an onset there is nothing to lead
        lines.append(f"- {r.group.preset} vanilla seed {r.seed}: {onset}; H2, cin_s > null_s_p95 for {STRETCH} steps {when}: "
                     f"{stretch(e['h2_null_from'])}; {above_start(e['own_bar'], e['h2_own_from'])}; "
                     f"beside H2, not in it: attempted_s {above_start(e['attempt_bar'], e['attempt_from'])}; H3, cin_t > its null p95 while cin_s is not: {h3}")
    return lines, entries


def effect_lines(effects: list[dict]) -> list[str]:
    lines = []
    for e in effects:
        b = e["base"]
        base = (f"base model (delta_S = 0) strict hack {b['eval_strict']:.3f}, loose {b['eval_loose']:.3f}, pass {b['eval_pass']:.3f} (n = {b['n']})" if b
                else f"the base-model and vanilla evals differ in {e['apart']}: not compared" if e["apart"] else "no base-model eval (`just eval RUN --base`)")
        seeds = ", ".join(f"seed {v['seed']} {v['eval_strict']:.3f}" + ("" if v["gap"] is None else f" ({v['gap']:+.3f})") for v in e["vanilla"])
        met = {None: "undetermined", True: "yes", False: "no"}[e["vanilla_above_base_by_margin_at_every_seed"]]
        lines.append(f"- {e['preset']}: {base}; vanilla's held-out strict hack by seed: {seeds or '(no eval)'}; "
                     f">= {EFFECT_MARGIN:+.2f} above base at every seed: {met}")
    return lines


def h1_lines(verdicts: list[tuple[Group | None, dict]], comparisons: list[dict]) -> list[str]:
    """The H1 section: one bold line per entry, its conditions and what is beside them below it."""
    lines = []
    for g, e in verdicts:
        if g is None:
            lines.append(f"- **H1 ({e['preset'] or 'no runs'}): {e['verdict']}.** {e['reasons'][0]['why']}")
            continue
        lines.append(f"- **H1, {group_label(g)}: {e['verdict']}.** Setting: {e['setting']}. Source: {e['source']}. v_hack quality gate: {e['v_hack_quality']}.")
        lines += [f"  - {'' if c['counts'] == 'H1' else 'beside H1, not in it: '}{said(c)}" for c in comparisons if c["group"] == g]
    return lines


# ----------------------------------------------------------------------------
# Plots


def labels(groups: list[Group]) -> dict[Group, str]:
    """Legend labels that name only what varies between the groups plotted."""
    vary = [f for f in ("arm", "gate", "update", "pairs", "preset") if len({getattr(g, f) for g in groups}) > 1] or ["arm"]
    show = {"arm": lambda g: g.arm, "gate": lambda g: g.gate, "update": lambda g: "+update" if g.update == "yes" else "",
            "pairs": lambda g: g.pairs, "preset": lambda g: g.preset}
    return {g: " ".join(s for s in (show[f](g) for f in vary) if s and s != "-") or g.arm for g in groups}


def per_step(runs: list[TrainedRun]) -> dict[Group, pl.DataFrame]:
    """Per group and step: mean, min and max over seeds of every logged curve."""
    cols = [*LOG_KEYS, *EXCESS]
    out = {}
    for g in sorted({r.group for r in runs}):
        df = pl.concat([r.curves for r in runs if r.group == g])
        out[g] = df.group_by("step").agg(*[pl.col(c).mean().alias(c) for c in cols], *[pl.col(c).min().alias(f"{c}:min") for c in cols],
                                         *[pl.col(c).max().alias(f"{c}:max") for c in cols]).sort("step")
    return out


def np_col(df: pl.DataFrame, col: str):
    return df[col].cast(pl.Float64).fill_null(float("nan")).to_numpy()


def figure(curves: dict[Group, pl.DataFrame], panels: list[tuple[str, str, str, str | None]], suptitle: str, path: Path) -> Path:
    """One panel per (log key, title, y label, band): the mean over seeds as a line; the band is
    min..max over seeds (band None), or between two keys' means ('low|high')."""
    names = labels(list(curves))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    for ax, (key, title, ylabel, band) in zip(axes[0], panels):
        for i, (g, df) in enumerate(curves.items()):
            color, style, step = f"C{i % 10}", ("-", "--", ":", "-.")[i % 4], df["step"].to_numpy()  # styles: arms that coincide stay visible
            low, high = band.split("|") if band else (f"{key}:min", f"{key}:max")
            ax.fill_between(step, np_col(df, low), np_col(df, high), color=color, alpha=0.18, linewidth=0)
            ax.plot(step, np_col(df, key), color=color, linestyle=style, linewidth=2, marker="o" if len(step) < 20 else None, markersize=3, label=names[g])
        if key in (R.hack_s, R.gt_s):  # rates
            ax.set_ylim(-0.03, 1.03)
        if key == H.disp_sum:
            ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(title), ax.set_xlabel("optimizer step"), ax.set_ylabel(ylabel), ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, legend = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, legend, loc="lower center", ncol=min(len(legend), 4), frameon=False, fontsize=10)
    fig.suptitle(suptitle, fontsize=12)
    fig.tight_layout(rect=(0, 0.05 + 0.04 * math.ceil(len(legend) / 4), 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plots(runs: list[TrainedRun], out: Path) -> list[Path]:
    curves = per_step(runs)
    seeds = "mean over seeds (line), min..max over seeds (band)"
    return [
        figure(curves, [(R.hack_s, "Strict hack rate of student rollouts (hack_s)", "fraction of student rollouts", None),
                        (R.gt_s, "Pass rate of student rollouts (gt_s)", "fraction of student rollouts", None)],
               f"Training rollouts per arm: {seeds}", out / "results_rollouts.png"),
        figure(curves, [(H.cin_s, "cin_s: student gradient along v_hack", "hack-ward fraction ‖relu(Vg)‖/‖g‖", f"{H.null_s_mean}|{H.null_s_p95}"),
                        (H.cin_t, "cin_t: teacher gradient along v_hack", "hack-ward fraction ‖relu(Vg)‖/‖g‖", f"{H.null_t_mean}|{H.null_t_p95}")],
               "Hack-ward gradient per arm: mean over seeds (line) against its empirical null, random bases (band: mean..p95)", out / "results_hackward.png"),
        figure(curves, [(H.upd, "Leak: hack-ward fraction of the applied update (upd)", "‖relu(V Δ)‖/‖Δ‖ of the AdamW change", None),
                        (H.disp_sum, "Displacement of delta_S along v_hack (disp_sum)", "signed sum over axes (> 0: hack-ward)", None)],
               f"Update-level leak and cumulative displacement per arm: {seeds}", out / "results_leak.png"),
    ]


# ----------------------------------------------------------------------------
# Main


def main(rc: ResultsConfig) -> Path:
    if not rc.runs_dir.is_dir():
        raise FileNotFoundError(f"{rc.runs_dir} is not a folder of run folders (train.py --runs-dir)")
    out = rc.out or rc.runs_dir
    out.mkdir(parents=True, exist_ok=True)
    runs, skipped = collect(rc.runs_dir, rc.last_n, rc.eval_split)
    groups: dict[Group, list[TrainedRun]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    wide, notes = group_table(groups)
    comparisons = all_comparisons(groups, rc.last_n)
    verdicts = h1_verdicts(groups, comparisons)
    effects = effect(groups)
    leads, lead_entries = leading_lines(groups)
    table, diffs = readable(wide, comparisons, rc.last_n) if runs else (pl.DataFrame(), pl.DataFrame())
    wide.write_csv(out / "results.csv")
    (out / "results.json").write_text(json.dumps({
        "h1": [e for _, e in verdicts], "effect": effects, "h2_h3": lead_entries, "comparisons": [{k: v for k, v in c.items() if k != "group"} for c in comparisons],
        "notes": notes, "skipped": [{"folder": str(p), "why": why} for p, why in skipped]}, indent=2))
    pngs = plots(runs, out) if runs else []
    split = f"`{rc.eval_split}`" if rc.eval_split else "each run's --eval-problems"
    lines = [
        "# Results across seeds", "",
        f"{len(runs)} runs from `{rc.runs_dir}`, {len(skipped)} folders skipped or ignored. Training columns: each run's mean over its "
        f"last {rc.last_n} steps, then mean ± standard error over seeds (cin − null: per step, then averaged). Eval columns: held-out "
        f"{split} on the last checkpoint with the training hint, "
        "pooled over eval seeds; blank where a group has no eval.", "",
        "## The effect to catch (held-out, base model vs vanilla)", "", *(effect_lines(effects) or ["(no runs)"]), "",
        "## H1", "", *h1_lines(verdicts, comparisons), "",
        "## Controls against vanilla (no H1 verdict)", "",
        *([f"- control {group_label(c['group'])} [{c['role']}]: {said(c)}" for c in comparisons if c["counts"] == "control"] or ["(none)"]), "",
        "## H2 and H3 (vanilla runs, training logs)", "", *(leads or ["(no vanilla runs)"]), "",
        "## Per group", "", markdown(table), "",
        "## Paired differences by seed (arm − control)", "", markdown(diffs), "", RULE, "", POWER, "",
    ]
    if notes:
        lines += ["## Settings that differ inside a group", "", *[f"- {n}" for n in notes], ""]
    if skipped:
        lines += ["## Skipped", "", *[f"- `{p}`: {why}" for p, why in skipped], ""]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    print(f"wrote {', '.join(str(out / n) for n in ('results.md', 'results.json', 'results.csv'))}" + "".join(f", {p}" for p in pngs))
    return out / "results.md"


if __name__ == "__main__":
    from projected_grpo import results  # re-imported as a module so that BEARTYPE=1's import hook checks this file too

    results.main(tyro.cli(results.ResultsConfig))
