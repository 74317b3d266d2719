"""Results across seeds: every run folder under RUNS_DIR (and its held-out evals) read into one
table per group, the paired difference to vanilla by seed with a 95% t interval, and H1 in words.

    python results.py                      # out/runs -> out/runs/results.{csv,md}, results_*.png
    python results.py RUNS_DIR --last-n 20 --out reports/

What it guarantees:
- Every number is recomputed from the runs' log.jsonl and eval/*/summary.json (a run's own
  summary.json is not read). Training metrics are per-run means over the last N steps (JSON
  nulls skipped), then mean and standard error over seeds.
- A folder that cannot be used (no or invalid config.json, no, empty or invalid log.jsonl,
  missing keys, a run with fewer logged steps than its config's `steps`, fewer steps than N)
  is listed with its reason and skipped; nothing in one folder stops the others. An eval
  folder that cannot be read is listed and ignored, its run kept.
- Groups: (preset, arm, gate, pairs file name, --project-update). Vanilla projects nothing, so
  its gate and --project-update change nothing it does: a vanilla group is keyed by (preset,
  pairs file) alone, shown with gate and update "-", and it is the baseline of every projected
  and random group of that preset and pairs file (or, where no vanilla run used that pairs
  file, of the preset's vanilla group: vanilla's training does not depend on v_hack, and
  sweep.py runs it once per seed). A projected group's control is the random
  group with the same preset, pairs file, gate and update.
- One run per group and seed: the newest folder (train.py stamps the start time into its
  name) is kept, the others are listed as skipped. Differences pair runs by seed; seeds
  missing on either side are left out of the pair count.
- Comparisons use the held-out eval (strict hack rate, gt pass rate) when every paired run
  has one, else the training last-N hack_s and gt_s; the table names the source.
- H1 is judged by H1_RULE below (printed under the table, stated in README.md).
- Settings that differ inside a group, or between a group and its baseline, other than
  seed, arm, gate and --project-update, are listed under the table (a paired difference is
  only about the arm when nothing else differs).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import typecheck  # noqa: F401  (BEARTYPE=1: must precede the harness imports)

import matplotlib
import polars as pl
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

PASS_BAND = 0.10  # H1's matched pass rate: the pass difference lies within +-10 points
HACK_DROP = {"vanilla": 0.30, "random": 0.15}  # H1's required fall of the strict hack rate against each baseline (docs/spec.md)
CONFIDENCE = 0.95
H1_RULE = (
    "Differences are taken arm minus baseline, per seed. H1 is **supported** when the 95% t interval "
    "of the hack difference lies at or below minus the required drop (30 points against vanilla, 15 "
    "against the random-subspace control, as docs/spec.md preregisters) and the 95% t interval of the "
    "pass difference lies inside +-10 points; **not supported** when the hack interval lies wholly above "
    "minus the drop, or the pass interval wholly outside +-10 points; **undetermined** otherwise (an "
    "interval straddles a bound) and whenever fewer than 2 seeds pair up."
)
LOG_KEYS = (
    "rollout/hack_s", "rollout/gt_s", "rollout/reward", "hackward/cin_s", "hackward/cin_t", "hackward/null_s_mean",
    "hackward/null_s_p95", "hackward/null_t_mean", "hackward/null_t_p95", "hackward/upd", "hackward/disp_sum",
)
TRAIN_METRICS = {"hack_s": "rollout/hack_s", "gt_s": "rollout/gt_s", "reward": "rollout/reward"}  # name in the table: log key
EVAL_METRICS = {"eval_strict": "hack_strict", "eval_loose": "hack_loose", "eval_pass": "gt_pass"}  # name in the table: eval summary key
EXCESS = ("cin_s_excess", "cin_t_excess")  # cin minus the empirical null's mean, per step
BOOKKEEPING = {"seed", "intervention", "gate", "project_update", "runs_dir", "resume", "cache_dir", "device", "grader_workers"}


@dataclass(frozen=True)
class ResultsConfig:
    """Tables, paired differences, H1 and plots from the run folders under runs_dir (`just results`)."""

    runs_dir: tyro.conf.Positional[Path] = Path(__file__).resolve().parent / "out" / "runs"
    """Folder holding the run folders (train.py's --runs-dir)."""
    out: Path | None = None
    """Where results.csv, results.md and the PNGs go; None = runs_dir."""
    last_n: int = 10
    """Training metrics are each run's mean over its last N steps."""
    eval_split: str = "leetcode_test_medhard"
    """Held-out evals that count: those on this problems file (its stem), of the run's last checkpoint, with the hint it trained with."""


# ----------------------------------------------------------------------------
# Reading run folders


class Skip(Exception):
    """A run folder (or eval folder) that cannot be used; the message says why."""


@dataclass(frozen=True, order=True)
class Group:
    preset: str
    arm: str
    gate: str  # "-" for vanilla: it projects nothing
    pairs: str  # file name of v_hack.pairs
    update: str  # --project-update: "yes" | "no"; "-" for vanilla

    def baseline(self, arm: str) -> "Group":
        """The group this one is compared with: vanilla (same preset and pairs) or random (also same gate and update)."""
        return Group(self.preset, "vanilla", "-", self.pairs, "-") if arm == "vanilla" else Group(self.preset, arm, self.gate, self.pairs, self.update)


@dataclass(frozen=True)
class Run:
    path: Path
    group: Group
    seed: int
    settings: dict[str, object]  # config minus BOOKKEEPING, dotted keys, paths by file name
    curves: pl.DataFrame  # one row per step: step, LOG_KEYS, EXCESS
    last: dict[str, float | None]  # TRAIN_METRICS and EXCESS, means over the last N steps
    held_out: dict[str, float] | None  # EVAL_METRICS pooled over the eval seeds, or None


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


def read_run(path: Path, last_n: int, eval_split: str, ignored_evals: list[tuple[Path, str]]) -> Run:
    config = read_json(path / "config.json")
    try:
        arm, steps, seed = config["intervention"], config["steps"], config["seed"]
        pairs = Path(config["v_hack"]["pairs"]).name
        gate, update = ("-", "-") if arm == "vanilla" else (config["gate"], "yes" if config["project_update"] else "no")
        group = Group(config["name"], arm, gate, pairs, update)
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
        (pl.col("hackward/cin_s") - pl.col("hackward/null_s_mean")).alias("cin_s_excess"),
        (pl.col("hackward/cin_t") - pl.col("hackward/null_t_mean")).alias("cin_t_excess"),
    )
    tail = curves.tail(last_n)
    last = {name: tail[key].mean() for name, key in TRAIN_METRICS.items()} | {k: tail[k].mean() for k in EXCESS}
    settings = {k: v for k, v in flatten(config).items() if k.split(".")[0] not in BOOKKEEPING}
    return Run(path, group, seed, settings, curves, last, held_out(path, f"step_{steps:06d}", config.get("hint"), eval_split, ignored_evals))


def held_out(run: Path, checkpoint: str, hint: str | None, split: str, ignored: list[tuple[Path, str]]) -> dict[str, float] | None:
    """EVAL_METRICS of the evals of `checkpoint` on `split` with the training hint, pooled over
    eval seeds (weighted by completions graded); None if there is none."""
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
        return None
    n = sum(s["n"] for s in found)
    return {name: sum(s[key] * s["n"] for s in found) / n for name, key in EVAL_METRICS.items()}


def collect(runs_dir: Path, last_n: int, eval_split: str) -> tuple[list[Run], list[tuple[Path, str]]]:
    """The usable runs, one per group and seed, and every (folder, reason) left out."""
    kept: dict[tuple[Group, int], Run] = {}
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


def verdict(n: int, hack: tuple, passed: tuple, drop: float) -> str:
    """H1_RULE, applied to (mean, lo, hi) of the hack and pass differences."""
    if n < 2:
        return "undetermined (n seeds < 2)"
    (_, hack_lo, hack_hi), (_, pass_lo, pass_hi) = hack, passed
    if hack_hi <= -drop and -PASS_BAND <= pass_lo and pass_hi <= PASS_BAND:
        return "supported"
    if hack_lo > -drop or pass_lo > PASS_BAND or pass_hi < -PASS_BAND:
        return "not supported"
    return "undetermined (CI straddles)"


def h1_words(baseline: str, said: str) -> str:
    return f"H1 (hack down >= {round(100 * HACK_DROP[baseline])} points, pass within +-{round(100 * PASS_BAND)} points vs {baseline}): {said}"


def compare(arm: list[Run], base: list[Run], last_n: int) -> dict[str, object]:
    """Paired-by-seed differences arm - base of the hack and pass rates, from the held-out eval
    when every paired run has one, else from the training last-N means."""
    by_seed = {r.seed: r for r in base}
    pairs = [(r, by_seed[r.seed]) for r in arm if r.seed in by_seed]
    use_eval = bool(pairs) and all(a.held_out and b.held_out for a, b in pairs)
    source = "held-out eval (strict, gt_pass)" if use_eval else f"training last {last_n} (hack_s, gt_s)"
    out: dict[str, object] = {"source": source if pairs else "", "n": len(pairs), "seeds": ",".join(str(a.seed) for a, _ in pairs)}
    rates = (lambda r: r.held_out) if use_eval else (lambda r: r.last)
    for name, k in zip(("hack", "pass"), ("eval_strict", "eval_pass") if use_eval else ("hack_s", "gt_s")):
        m, lo, hi = t_interval([rates(a)[k] - rates(b)[k] for a, b in pairs])
        out |= {f"d_{name}": m, f"d_{name}_lo": lo, f"d_{name}_hi": hi}
    return out


def differing(runs: list[Run]) -> list[str]:
    """Settings (config fields other than BOOKKEEPING) that take more than one value across runs."""
    keys = sorted({k for r in runs for k in r.settings})
    return [k for k in keys if len({json.dumps(r.settings.get(k), default=str) for r in runs}) > 1]


# ----------------------------------------------------------------------------
# Tables


def tables(runs: list[Run], last_n: int) -> tuple[pl.DataFrame, pl.DataFrame, list[str], list[str]]:
    """The wide per-group table (results.csv), the comparisons table, H1 sentences and notes."""
    groups: dict[Group, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    rows, comparisons, sentences, notes = [], [], [], []
    for g, members in groups.items():
        row: dict[str, object] = {"preset": g.preset, "arm": g.arm, "gate": g.gate, "pairs": g.pairs, "update": g.update,
                                  "n_seeds": len(members), "seeds": ",".join(str(r.seed) for r in members)}
        for name in (*TRAIN_METRICS, *EXCESS):
            row[name], row[f"{name}_se"] = mean_se([r.last[name] for r in members])
        evaluated = [r.held_out for r in members if r.held_out]
        row["n_eval"] = len(evaluated)
        for name in EVAL_METRICS:
            row[name], row[f"{name}_se"] = mean_se([e[name] for e in evaluated])
        mixed = differing(members)
        if mixed:
            notes.append(f"{describe(g)}: its runs differ in {', '.join(mixed)}")
        for base_arm in HACK_DROP:
            if g.arm == "vanilla" or (base_arm == "random" and g.arm != "projected"):
                continue
            key = g.baseline(base_arm)
            if key not in groups and base_arm == "vanilla":
                # Vanilla trains the same whatever v_hack measures it (sweep.py runs it once per
                # seed, measured against the first pairs file): a vanilla group of the preset serves.
                key = next((k for k in sorted(groups) if k.arm == "vanilla" and k.preset == g.preset), key)
            base = groups.get(key, [])
            c = compare(members, base, last_n)
            hack, passed = ((c[f"d_{k}"], c[f"d_{k}_lo"], c[f"d_{k}_hi"]) for k in ("hack", "pass"))
            c["H1"] = verdict(c["n"], hack, passed, HACK_DROP[base_arm]) if base else f"undetermined (no {base_arm} runs to compare with)"
            row |= {f"vs_{base_arm}_{k}": v for k, v in c.items()}
            comparisons.append({k: row[k] for k in ("preset", "arm", "gate", "pairs", "update")} | {"vs": base_arm} | c)
            sentences.append(f"{describe(g)}: {h1_words(base_arm, c['H1'])}")
            mixed = differing(members + base)
            if base and mixed:
                notes.append(f"{describe(g)} and its {base_arm} baseline differ in {', '.join(mixed)}: the paired difference is not about the arm alone")
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None), pl.DataFrame(comparisons, infer_schema_length=None), sentences, notes


def describe(g: Group) -> str:
    parts = [g.arm] + ([g.gate] if g.gate != "-" else []) + (["+update"] if g.update == "yes" else [])
    return f"{' '.join(parts)} ({g.preset}, {g.pairs})"


def cell(m: float | None, se: float | None = None) -> str:
    return "" if m is None else f"{m:.3f}" if se is None else f"{m:.3f} ± {se:.3f}"


def interval(m: float | None, lo: float | None, hi: float | None) -> str:
    return "" if m is None else f"{m:+.3f}" if lo is None else f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def readable(wide: pl.DataFrame, comparisons: pl.DataFrame, last_n: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The two tables as printed: mean ± SE cells, differences with their intervals."""
    key = ["preset", "arm", "gate", "pairs", "update"]
    train = {"hack_s": f"hack_s (last {last_n})", "gt_s": f"gt_s (last {last_n})", "reward": f"reward (last {last_n})",
             "cin_s_excess": "cin_s − null_s_mean", "cin_t_excess": "cin_t − null_t_mean"}
    held = {"eval_strict": "eval strict hack", "eval_loose": "eval loose hack", "eval_pass": "eval pass"}
    groups = pl.DataFrame([
        {k: r[k] for k in key} | {"seeds": r["n_seeds"]} | {h: cell(r[c], r[f"{c}_se"]) for c, h in train.items()}
        | {"evals": r["n_eval"]} | {h: cell(r[c], r[f"{c}_se"]) for c, h in held.items()}
        for r in wide.iter_rows(named=True)
    ])
    diffs = pl.DataFrame([
        {k: r[k] for k in key} | {"vs": r["vs"], "source": r["source"], "pairs (seeds)": f"{r['n']} ({r['seeds']})",
                                  "Δ hack [95% CI]": interval(r["d_hack"], r["d_hack_lo"], r["d_hack_hi"]),
                                  "Δ pass [95% CI]": interval(r["d_pass"], r["d_pass_lo"], r["d_pass_hi"]), "H1": r["H1"]}
        for r in comparisons.iter_rows(named=True)
    ])
    return groups, diffs


def markdown(df: pl.DataFrame) -> str:
    if df.is_empty():
        return "(none)"
    with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True, tbl_rows=-1, tbl_cols=-1,
                   fmt_str_lengths=200, tbl_width_chars=10_000):
        return str(df)


# ----------------------------------------------------------------------------
# Plots


def labels(groups: list[Group]) -> dict[Group, str]:
    """Legend labels that name only what varies between the groups plotted."""
    vary = [f for f in ("arm", "gate", "update", "pairs", "preset") if len({getattr(g, f) for g in groups}) > 1] or ["arm"]
    show = {"arm": lambda g: g.arm, "gate": lambda g: g.gate, "update": lambda g: "+update" if g.update == "yes" else "",
            "pairs": lambda g: g.pairs, "preset": lambda g: g.preset}
    return {g: " ".join(s for s in (show[f](g) for f in vary) if s and s != "-") or g.arm for g in groups}


def per_step(runs: list[Run]) -> dict[Group, pl.DataFrame]:
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
        if key.startswith("rollout/"):
            ax.set_ylim(-0.03, 1.03)
        if key == "hackward/disp_sum":
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


def plots(runs: list[Run], out: Path) -> list[Path]:
    curves = per_step(runs)
    seeds = "mean over seeds (line), min..max over seeds (band)"
    return [
        figure(curves, [("rollout/hack_s", "Strict hack rate of student rollouts (hack_s)", "fraction of student rollouts", None),
                        ("rollout/gt_s", "Pass rate of student rollouts (gt_s)", "fraction of student rollouts", None)],
               f"Training rollouts per arm: {seeds}", out / "results_rollouts.png"),
        figure(curves, [("hackward/cin_s", "cin_s: student gradient along v_hack", "hack-ward fraction ‖relu(Vg)‖/‖g‖", "hackward/null_s_mean|hackward/null_s_p95"),
                        ("hackward/cin_t", "cin_t: teacher gradient along v_hack", "hack-ward fraction ‖relu(Vg)‖/‖g‖", "hackward/null_t_mean|hackward/null_t_p95")],
               "Hack-ward gradient per arm: mean over seeds (line) against its empirical null, random bases (band: mean..p95)", out / "results_hackward.png"),
        figure(curves, [("hackward/upd", "Leak: hack-ward fraction of the applied update (upd)", "‖relu(V Δ)‖/‖Δ‖ of the AdamW change", None),
                        ("hackward/disp_sum", "Displacement of delta_S along v_hack (disp_sum)", "signed sum over axes (> 0: hack-ward)", None)],
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
    wide, comparisons, sentences, notes = tables(runs, rc.last_n)
    groups, diffs = readable(wide, comparisons, rc.last_n) if runs else (pl.DataFrame(), pl.DataFrame())
    wide.write_csv(out / "results.csv")
    pngs = plots(runs, out) if runs else []
    lines = [
        "# Results across seeds", "",
        f"{len(runs)} runs from `{rc.runs_dir}`, {len(skipped)} folders skipped or ignored. Training columns: each run's mean over its "
        f"last {rc.last_n} steps, then mean ± standard error over seeds (cin − null: per step, then averaged). Eval columns: held-out "
        f"`{rc.eval_split}` on the last checkpoint with the training hint, pooled over eval seeds; blank where a group has no eval.", "",
        "## Per group", "", markdown(groups), "",
        "## Paired differences by seed (arm − baseline)", "", markdown(diffs), "", H1_RULE, "",
        "## H1", "", *[f"- {s}" for s in sentences or ["no projected or random group"]], "",
    ]
    if notes:
        lines += ["## Settings that differ", "", *[f"- {n}" for n in notes], ""]
    if skipped:
        lines += ["## Skipped", "", *[f"- `{p}`: {why}" for p, why in skipped], ""]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    return out / "results.md"


if __name__ == "__main__":
    import results  # re-imported as a module so that BEARTYPE=1's import hook checks this file too

    results.main(tyro.cli(results.ResultsConfig))
