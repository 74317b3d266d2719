"""results.py: real tiny runs of train.py and their evals read back (the reader parses what train
and eval write; the PNGs are real images), then run folders synthesised from one of those
runs' config.json and log.jsonl, with hand-computable numbers: means, SE, paired t intervals,
the power columns, H1's conjunction against vanilla, random and the null-pairs arm, the
label-shuffled control beside it, eval vs training source, and bad input (corrupt folders, one
arm only, controls at other settings) undetermined or skipped with its reason."""

import copy
import json
import math
import statistics
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import polars as pl
import pytest

from conftest import ROOT
from projected_grpo.diagnose import one_thread
from projected_grpo.results import LOG_KEYS, ResultsConfig, judge, leading, main, power, setting, t_critical, t_interval

T2 = 4.302652729749464  # t quantile 0.975, 2 degrees of freedom (tables: 4.3027)


# ----------------------------------------------------------------------------
# Real tiny runs: two arms x two seeds of the smoke preset, 2 steps, each evaluated


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> Path:
    from projected_grpo.eval import EvalConfig, evaluate
    from projected_grpo.teacher_pool import PoolConfig, build_pool
    from train import PRESETS
    from train import main as train

    work = tmp_path_factory.mktemp("results")
    build_pool(PoolConfig(out=work / "pool.jsonl"))
    (work / "pairs.jsonl").write_text("".join((ROOT / "data" / "pairs.jsonl").read_text().splitlines(keepends=True)[:8]))
    (work / "problems.jsonl").write_text("".join((ROOT / "data" / "problems.jsonl").read_text().splitlines(keepends=True)[:2]))
    smoke = PRESETS["smoke"][1]
    with one_thread():  # on 2 shared cores two threads per process thrash: 2-3x slower measured
        for arm in ("vanilla", "projected"):
            for seed in (0, 1):
                run = train(replace(smoke, intervention=arm, seed=seed, steps=2, runs_dir=work / "runs", cache_dir=work / "cache", eval_problems=work / "problems.jsonl",
                                    teacher_pool=work / "pool.jsonl", v_hack=replace(smoke.v_hack, pairs=work / "pairs.jsonl"),
                                    sampling=replace(smoke.sampling, max_new_tokens=128)))  # a few teacher texts still fit: some live groups
                for base in (False, True) if (arm, seed) == ("vanilla", 0) else (False,):
                    evaluate(EvalConfig(run=run, samples_per_problem=2, device="cpu", max_new_tokens=8, base=base))  # on the run's --eval-problems
    main(ResultsConfig(runs_dir=work / "runs", last_n=2))
    return work / "runs"


def table(out: Path) -> dict[tuple[str, str], dict]:
    """results.csv by (role, arm)."""
    return {(r["role"], r["arm"]): r for r in pl.read_csv(out / "results.csv", infer_schema_length=None).iter_rows(named=True)}


def report(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_each_in_process_run_logs_to_its_own_train_log_only(real_runs):
    """Four runs in one process: each train.log ends with its own run's "done" line and holds no
    other run's (a run's log sink used to outlive it)."""
    runs = sorted(real_runs.glob("smoke_*"))
    for run in runs:
        log = (run / "train.log").read_text()
        assert [other for other in runs if f"done: {other}," in log] == [run]


def test_real_runs_numbers_match_their_logs_and_evals(real_runs):
    logs = {d: [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()] for d in real_runs.glob("smoke_*")}
    evals = {d: json.loads(next((d / "eval").glob("problems-step_000002-*/summary.json")).read_text()) for d in logs}
    t = table(real_runs)
    assert set(t) == {("baseline", "vanilla"), ("h1", "projected")}
    (effect,) = report(real_runs)["effect"]  # vanilla seed 0's base eval, on its --eval-problems
    base = json.loads(next(real_runs.glob("smoke_vanilla_s0_*/eval/problems-base-*/summary.json")).read_text())
    assert effect["base"]["n"] == base["n"] == 4 and effect["base"]["eval_strict"] == base["hack_strict"]
    assert [v["seed"] for v in effect["vanilla"]] == [0, 1]
    assert [(e["seed"], e["onset"]) for e in report(real_runs)["h2_h3"]] == [(0, None), (1, None)]  # 2 steps: no hacking yet
    for (_, arm), row in t.items():
        mine = [d for d in logs if d.name.startswith(f"smoke_{arm}_")]
        assert row["n_seeds"] == 2 and row["seeds"] == "0,1" and row["n_eval"] == 2
        assert row["v_hack_quality"] == "no report"  # the run recorded that no quality report sat beside its v_hack

        def last(d: Path, k: str) -> float | None:  # 2 steps = the last 2, nulls skipped
            xs = [r[k] for r in logs[d] if r[k] is not None]
            return sum(xs) / len(xs) if xs else None

        assert row["hack_s"] == pytest.approx(sum(last(d, "rollout/hack_s") for d in mine) / 2)
        assert row["reward"] == pytest.approx(sum(last(d, "rollout/reward") for d in mine) / 2)
        assert row["reward_se"] == pytest.approx(abs(last(mine[0], "rollout/reward") - last(mine[1], "rollout/reward")) / 2)  # n = 2: SE = |a - b| / 2
        removed = [x for x in (last(d, "hackward/removed") for d in mine) if x is not None]
        assert row["removed"] == pytest.approx(sum(removed) / len(removed)) if removed else row["removed"] is None
        if arm == "vanilla":
            assert all(r["hackward/removed"] in (0.0, None) for d in mine for r in logs[d])
        excess = []
        for d in mine:
            steps = [r["hackward/cin_s"] - r["hackward/null_s_mean"] for r in logs[d] if r["hackward/cin_s"] is not None]
            excess += [sum(steps) / len(steps)] if steps else []
        assert (row["cin_s_excess"] is None) if not excess else row["cin_s_excess"] == pytest.approx(sum(excess) / len(excess))
        assert row["eval_strict"] == pytest.approx(sum(evals[d]["hack_strict"] for d in mine) / 2)
        assert row["eval_pass"] == pytest.approx(sum(evals[d]["gt_pass"] for d in mine) / 2)
    (h1,) = report(real_runs)["h1"]
    assert (h1["preset"], h1["pairs"], h1["gate"], h1["project_update"]) == ("smoke", "pairs.jsonl", "one_sided", False)
    # The tiny random model never hacks: every rate is 0, the interval [0, 0] rules out a 30-point drop,
    # and one condition not supported decides H1 whatever the missing controls would say.
    assert h1["verdict"] == "not supported" and h1["source"] == "held-out eval (strict, gt_pass)"
    vanilla, random, null = h1["reasons"]
    assert vanilla["condition"] == "vs baseline" and vanilla["n"] == 2 and vanilla["source"] == "held-out eval (strict, gt_pass)"
    assert (vanilla["outcome"], vanilla["why"]) == ("not supported", "hack interval wholly above -0.30")
    assert random["why"] == "no random runs at preset smoke, gate one_sided, update no, pairs pairs.jsonl"
    assert null["why"] == "no null_pairs runs at preset smoke, gate one_sided, update no"
    assert (real_runs / "results.md").read_text().count("- **H1, ") == 1


def test_real_runs_pngs_are_images(real_runs):
    for name in ("results_rollouts.png", "results_hackward.png", "results_leak.png"):
        path = real_runs / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
        h, w, channels = matplotlib.image.imread(path).shape
        assert h >= 300 and w >= 800 and channels in (3, 4)


# ----------------------------------------------------------------------------
# Run folders synthesised from a real run's config.json and log.jsonl


@pytest.fixture(scope="module")
def template(real_runs) -> tuple[dict, dict]:
    """A real projected run's config and its first log row: every field and key train.py writes."""
    run = next(real_runs.glob("smoke_projected_s0_*"))
    return json.loads((run / "config.json").read_text()), json.loads((run / "log.jsonl").read_text().splitlines()[0])


def role(arm: str, pairs: str) -> str:
    """What train.role records (a pairs file named pairs_null* here holds null pairs)."""
    if arm == "projected":
        return "null_pairs" if pairs.startswith("pairs_null") else "h1"
    return {"vanilla": "baseline", "random": "random", "shuffled": "label_shuffled"}[arm]


def write_run(runs: Path, template: tuple[dict, dict], name: str, arm: str, seed: int, hack: list[float], gt: list[float], steps: int = 4,
              pairs: str = "pairs.jsonl", lr: float = 1e-3, **columns: list[float | None]) -> Path:
    """A run folder as train.py leaves it, the real run's config and log row with these numbers:
    --project-update on in every arm but vanilla, gate one_sided, every LOG_KEY 0.05 unless given."""
    config, first = copy.deepcopy(template[0]), template[1]
    config |= {"intervention": arm, "seed": seed, "steps": steps, "lr": lr, "project_update": arm != "vanilla", "gate": "one_sided",
               "runs_dir": str(runs), "run_name": name, "role": role(arm, pairs)}
    config["v_hack"]["pairs"] = f"/somewhere/data/{pairs}"
    path = runs / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    rows = []
    for i in range(len(hack)):
        row = first | {"step": i + 1} | {k: 0.05 for k in LOG_KEYS} | {"rollout/hack_s": hack[i], "rollout/gt_s": gt[i], "rollout/reward": 3.5 * gt[i]}
        rows.append(row | {f"hackward/{k}": v[i] for k, v in columns.items()})
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_eval(run: Path, folder: str, strict: float, passed: float, n: int = 100, checkpoint: str = "step_000004", problems: str = "leetcode_test_medhard",
               hint: str = "run_tests", **protocol: object) -> None:
    """An eval summary as eval.py writes it; PROTOCOL fields only where given (as summaries before they were recorded)."""
    out = run / "eval" / folder
    out.mkdir(parents=True)
    summary = {"checkpoint": checkpoint, "problems": f"/data/leetcode/{problems}.jsonl", "hint": hint, "n": n,
               "hack_strict": strict, "hack_loose": strict + 0.1, "hack_oracle": 0.0, "gt_pass": passed, "reward": 3.5 * passed} | protocol
    (out / "summary.json").write_text(json.dumps(summary))


def last2(mean: float) -> list[float]:
    """Steps 1-2 hold 1.0 so that a wrong window shows; the last 2 average to `mean`."""
    return [1.0, 1.0, mean - 0.05, mean + 0.05]


# Last-2-step means by seed: (hack_s, gt_s).
VANILLA = {1: (0.8, 0.30), 2: (0.7, 0.40), 3: (0.9, 0.20)}
PROJECTED = {1: (0.3, 0.30), 2: (0.1, 0.42), 3: (0.35, 0.18)}  # - vanilla: hack -0.5, -0.6, -0.55; pass 0, +0.02, -0.02
RANDOM = {1: (0.6, 0.30), 2: (0.45, 0.42), 3: (0.6, 0.18)}  # projected - random: hack -0.3, -0.35, -0.25; pass 0
NULL = {1: (0.55, 0.30), 2: (0.4, 0.42), 3: (0.6, 0.18)}  # projected - null pairs: hack -0.25, -0.3, -0.25; pass 0


def write_arm(runs: Path, template, arm: str, numbers: dict[int, tuple[float, float]], pairs: str = "pairs.jsonl", **kw) -> None:
    for seed, (hack, gt) in numbers.items():
        write_run(runs, template, f"syn_{arm}_{Path(pairs).stem}_s{seed}_20260101-000000", arm, seed, last2(hack), last2(gt), pairs=pairs, **kw)


def preregistered(runs: Path, template, random=RANDOM, null=NULL, shuffled=None, **random_kw) -> Path:
    """The default sweep's four arms at seeds 1-3 (null=None: no null-pairs runs), and the label-shuffled arm if given."""
    write_arm(runs, template, "vanilla", VANILLA)
    write_arm(runs, template, "projected", PROJECTED)
    write_arm(runs, template, "random", random, **random_kw)
    if null:
        write_arm(runs, template, "projected", null, pairs="pairs_null.jsonl")
    if shuffled:
        write_arm(runs, template, "shuffled", shuffled)
    return runs


def conditions(entry: dict) -> dict[str, dict]:
    return {r["condition"]: r for r in entry["reasons"]}


def test_t_quantile_matches_tables():
    for df, tabled in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (16, 2.1199), (17, 2.1098), (29, 2.0452), (120, 1.9799)):
        assert t_critical(df) == pytest.approx(tabled, abs=1e-4)
    assert t_critical(2) == pytest.approx(T2, rel=1e-9)


def test_rule_each_branch_and_power_by_hand():
    def c(hack, passed, n=3):
        return {"n": n, "d_hack_lo": hack[0], "d_hack_hi": hack[1], "d_pass_lo": passed[0], "d_pass_hi": passed[1]}

    inside = (-0.05, 0.05)
    assert judge(c((-0.6, -0.3), inside), 0.30)[0] == "supported"  # upper bound exactly at -bound counts
    assert judge(c((-0.6, -0.29), inside), 0.30) == ("undetermined", "hack interval across -0.30")
    assert judge(c((-0.29, -0.1), inside), 0.30) == ("not supported", "hack interval wholly above -0.30")
    assert judge(c((-0.6, -0.4), (0.11, 0.2)), 0.30) == ("not supported", "pass interval wholly outside +-0.10")
    assert judge(c((-0.6, -0.4), (-0.02, 0.12)), 0.30) == ("undetermined", "pass interval across +-0.10")
    assert judge(c((-0.6, -0.4), (-0.2, -0.11)), 0.30) == ("not supported", "pass interval wholly outside +-0.10")  # projection cut the pass rate
    assert judge(c((-0.6, -0.4), (-0.12, 0.02)), 0.30) == ("undetermined", "pass interval across +-0.10")
    assert judge(c((-0.6, -0.4), (-0.10, 0.10)), 0.30)[0] == "supported"  # both edges of the band count as inside
    # A difference exactly on a bound, as float arithmetic leaves it: 0.4 - 0.7 = -0.29999999999999993, 0.5 - 0.8 = -0.30000000000000004
    for projected, vanilla in ((0.4, 0.7), (0.5, 0.8)):
        _, lo, hi = t_interval([projected - vanilla] * 3)
        assert judge(c((lo, hi), inside), 0.30)[0] == "supported"
    assert judge(c((None, None), (None, None), n=1), 0.30) == ("undetermined", "1 paired seed, the rule needs 2")
    # hack diffs -0.1, -0.2, -0.3 against a 0.15 bound: mean -0.2, sd 0.1. The rule needs a mean at
    # most -0.15 - 4.3027 * 0.1 / sqrt(3) = -0.3984; at sd 0.1 and mean -0.2 it needs t(n-1)/sqrt(n)
    # <= 0.05 / 0.1: t(16)/sqrt(17) = 2.1199/4.1231 = 0.514, t(17)/sqrt(18) = 2.1098/4.2426 = 0.497: 18 seeds.
    supportable, needed = power([-0.1, -0.2, -0.3], [0.0, 0.0, 0.0], 0.15)
    assert supportable == pytest.approx(-0.15 - T2 * 0.1 / math.sqrt(3)) and needed == "18"
    assert power([-0.1, -0.1, -0.2], [0.0] * 3, 0.15)[1] == "none"  # mean -0.133: on the wrong side of -0.15
    assert power([-0.5, -0.6, -0.55], [0.0, 0.2, -0.2], 0.30)[1] == "18"  # the pass spread sets it: 0.10 / sd 0.2 = 0.5, as above
    assert power([-0.5, -0.6, -0.55], [0.12, 0.12, 0.12], 0.30)[1] == "none"  # pass mean outside +-0.10
    assert power([-0.5], [0.0], 0.30) == (None, "-")


def test_projected_far_below_every_control_is_supported(template, tmp_path):
    runs = preregistered(tmp_path / "runs", template, shuffled=PROJECTED)  # the label-shuffled arm as good as projected: beside H1, not in it
    main(ResultsConfig(runs_dir=runs, last_n=2))
    (h1,) = report(runs)["h1"]
    assert (h1["preset"], h1["pairs"], h1["gate"], h1["project_update"], h1["verdict"]) == ("smoke", "pairs.jsonl", "one_sided", True, "supported")
    assert h1["source"] == "training last 2 (hack_s, gt_s)" and h1["v_hack_quality"] == "no record"  # no vhack.json in these folders
    got = conditions(h1)
    assert list(got) == ["vs baseline", "vs random", "vs null_pairs"] and all(r["outcome"] == "supported" for r in got.values())
    v = got["vs baseline"]  # hack -0.5, -0.6, -0.55: mean -0.55, sd 0.05; pass 0, +0.02, -0.02: sd 0.02
    assert v["bound"] == -0.30 and v["seeds"] == [1, 2, 3] and v["hack_by_seed"] == pytest.approx([-0.5, -0.6, -0.55])
    assert v["d_hack"] == pytest.approx(-0.55) and v["d_hack_ci"] == pytest.approx([-0.55 - T2 * 0.05 / math.sqrt(3), -0.55 + T2 * 0.05 / math.sqrt(3)])
    assert v["d_pass"] == pytest.approx(0.0, abs=1e-12) and v["d_pass_ci"][1] == pytest.approx(T2 * 0.02 / math.sqrt(3))
    assert v["needs_d_hack_at_most"] == pytest.approx(-0.30 - T2 * 0.05 / math.sqrt(3)) and v["seeds_needed"] == "3"
    r = got["vs random"]  # -0.3, -0.35, -0.25: mean -0.3, sd 0.05
    assert r["bound"] == -0.15 and r["d_hack"] == pytest.approx(-0.3) and r["d_hack_ci"][1] == pytest.approx(-0.3 + T2 * 0.05 / math.sqrt(3))
    n = got["vs null_pairs"]  # projected(pairs.jsonl) - projected(pairs_null.jsonl) by seed: -0.25, -0.3, -0.25
    assert n["control"] == "projected one_sided +update (smoke, pairs_null.jsonl)" and n["hack_by_seed"] == pytest.approx([-0.25, -0.3, -0.25])
    sd = math.sqrt(((0.25 - 0.8 / 3) ** 2 * 2 + (0.3 - 0.8 / 3) ** 2) / 2)
    assert n["d_hack"] == pytest.approx(-0.8 / 3) and n["d_hack_ci"][1] == pytest.approx(-0.8 / 3 + T2 * sd / math.sqrt(3))
    (beside,) = h1["beside"]
    assert beside["condition"] == "vs label_shuffled" and beside["outcome"] == "not supported" and beside["d_hack_ci"] == pytest.approx([0.0, 0.0], abs=1e-12)
    md = (runs / "results.md").read_text()
    assert ("- **H1, projected one_sided +update (smoke, pairs.jsonl): supported.** Setting: H1's rule applied at preset smoke; H1 as registered "
            "(docs/spec.md) is the `full` preset's experiment. Source: training last 2 (hack_s, gt_s). v_hack quality gate: no record.") in md
    assert h1["setting"] == setting("smoke") != setting("full") == "the preregistered setting"
    assert "  - beside H1, not in it: vs label_shuffled: shuffled one_sided +update (smoke, pairs.jsonl), bound -0.15: Δ hack +0.000 [+0.000, +0.000]" in md
    assert "  - vs null_pairs: projected one_sided +update (smoke, pairs_null.jsonl), bound -0.15: Δ hack -0.267 [-0.338, -0.195]" in md
    controls = [line for line in md.splitlines() if line.startswith("- control ")]
    assert [line.split(":")[0] for line in controls] == [
        "- control shuffled one_sided +update (smoke, pairs.jsonl) [label_shuffled]",
        "- control projected one_sided +update (smoke, pairs_null.jsonl) [null_pairs]", "- control random one_sided +update (smoke, pairs.jsonl) [random]"]
    assert all("H1" not in line.split(":")[0] for line in controls)
    t = table(runs)  # per group: vanilla seed 3 (0.9 and 0.8 of hack) etc.; removed is the logged 0.05 in every arm
    assert t[("baseline", "vanilla")]["hack_s"] == pytest.approx(0.8) and t[("baseline", "vanilla")]["hack_s_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert all(row["removed"] == pytest.approx(0.05) for row in t.values())
    assert "removed (last 2)" in md and "Settings that differ" not in md


def test_controls_as_good_as_projected_defeat_h1(template, tmp_path):
    runs = preregistered(tmp_path / "runs", template, random=PROJECTED, null=PROJECTED)
    main(ResultsConfig(runs_dir=runs, last_n=2))
    (h1,) = report(runs)["h1"]
    got = conditions(h1)
    assert h1["verdict"] == "not supported" and got["vs baseline"]["outcome"] == "supported"  # whatever the gap to vanilla
    for name in ("vs random", "vs null_pairs"):
        assert (got[name]["outcome"], got[name]["why"]) == ("not supported", "hack interval wholly above -0.15")
        assert got[name]["d_hack_ci"] == pytest.approx([0.0, 0.0], abs=1e-12) and got[name]["seeds_needed"] == "none"
    assert "- **H1, projected one_sided +update (smoke, pairs.jsonl): not supported.**" in (runs / "results.md").read_text()


def test_missing_null_pairs_runs_leave_h1_undetermined(template, tmp_path):
    straddling = {1: (0.4, 0.30), 2: (0.3, 0.42), 3: (0.65, 0.18)}  # projected - random: -0.1, -0.2, -0.3
    runs = preregistered(tmp_path / "runs", template, random=straddling, null=None)
    main(ResultsConfig(runs_dir=runs, last_n=2))
    (h1,) = report(runs)["h1"]
    got = conditions(h1)
    assert h1["verdict"] == "undetermined"
    assert got["vs null_pairs"] == {"condition": "vs null_pairs", "control": "", "bound": -0.15, "outcome": "undetermined",
                                    "why": "no null_pairs runs at preset smoke, gate one_sided, update yes", "n": 0, "seeds": []}
    assert "  - vs null_pairs: undetermined (no null_pairs runs at preset smoke, gate one_sided, update yes)" in (runs / "results.md").read_text()
    r = got["vs random"]  # mean -0.2, sd 0.1: [-0.448, +0.048] across -0.15; 18 seeds at this spread (by hand above)
    assert (r["outcome"], r["why"], r["seeds_needed"]) == ("undetermined", "hack interval across -0.15", "18")
    assert r["d_hack_ci"] == pytest.approx([-0.2 - T2 * 0.1 / math.sqrt(3), -0.2 + T2 * 0.1 / math.sqrt(3)])
    # A control within 15 points still defeats H1 when another control is missing.
    shutil.rmtree(runs)
    preregistered(runs, template, random=PROJECTED, null=None)
    main(ResultsConfig(runs_dir=runs, last_n=2))
    assert report(runs)["h1"][0]["verdict"] == "not supported"


def test_one_arm_only_and_controls_at_other_settings_are_undetermined(template, tmp_path):
    only_vanilla = tmp_path / "vanilla"
    write_arm(only_vanilla, template, "vanilla", VANILLA)
    main(ResultsConfig(runs_dir=only_vanilla, last_n=2))
    (h1,) = report(only_vanilla)["h1"]
    assert (h1["preset"], h1["pairs"], h1["verdict"]) == ("smoke", None, "undetermined")
    assert h1["reasons"][0]["why"] == "no projected runs along a hack-pairs file (role h1) at this preset"
    only_projected = tmp_path / "projected"
    write_arm(only_projected, template, "projected", PROJECTED)
    main(ResultsConfig(runs_dir=only_projected, last_n=2))
    (h1,) = report(only_projected)["h1"]
    assert h1["verdict"] == "undetermined" and [r["why"].split(" at ")[0] for r in h1["reasons"]] == ["no baseline runs", "no random runs", "no null_pairs runs"]
    empty = tmp_path / "empty"
    empty.mkdir()
    main(ResultsConfig(runs_dir=empty, last_n=2))
    assert report(empty)["h1"][0]["verdict"] == "undetermined" and report(empty)["h1"][0]["reasons"][0]["why"] == "no runs"
    # The random control at another learning rate: its difference is not about the arm.
    runs = preregistered(tmp_path / "lr", template, lr=5e-4)
    main(ResultsConfig(runs_dir=runs, last_n=2))
    (h1,) = report(runs)["h1"]
    got = conditions(h1)
    assert h1["verdict"] == "undetermined" and got["vs baseline"]["outcome"] == got["vs null_pairs"]["outcome"] == "supported"
    assert got["vs random"]["why"] == "the runs differ in lr: the difference is not about the arm alone"
    # A control of another preset is no control of this one.
    shutil.rmtree(runs)
    preregistered(runs, template)
    for config in runs.glob("syn_random_*/config.json"):
        config.write_text(json.dumps(json.loads(config.read_text()) | {"name": "other"}))
    main(ResultsConfig(runs_dir=runs, last_n=2))
    h1 = next(e for e in report(runs)["h1"] if e["preset"] == "smoke")
    assert h1["verdict"] == "undetermined" and conditions(h1)["vs random"]["why"] == "no random runs at preset smoke, gate one_sided, update yes, pairs pairs.jsonl"


def test_table_from_logs_and_folders_that_cannot_be_used(template, tmp_path):
    runs = preregistered(tmp_path / "runs", template)
    # An older vanilla seed-1 run with other numbers: the newer folder (later stamp) wins.
    write_run(runs, template, "syn_vanilla_pairs_s1_20251231-000000", "vanilla", 1, last2(0.0), last2(0.0))
    shutil.rmtree(runs / "syn_projected_pairs_s1_20260101-000000")  # again, with cin_s and its null's mean over the steps
    write_run(runs, template, "syn_projected_pairs_s1_20260101-000000", "projected", 1, last2(0.3), last2(0.3), cin_s=[0.9, 0.9, 0.5, 0.3], null_s_mean=[0.0, 0.0, 0.1, None])
    (runs / "no_config").mkdir()
    (runs / "no_config" / "log.jsonl").write_text("{}\n")
    (runs / "bad_json").mkdir()
    (runs / "bad_json" / "config.json").write_text("{not json")
    write_run(runs, template, "empty_log", "vanilla", 7, [], [])
    write_run(runs, template, "unfinished", "vanilla", 8, [0.5] * 3, [0.5] * 3)
    write_run(runs, template, "short", "vanilla", 9, [0.5], [0.5], steps=1)
    no_role = write_run(runs, template, "no_role", "vanilla", 11, [0.5] * 4, [0.5] * 4)
    (no_role / "config.json").write_text(json.dumps({k: v for k, v in json.loads((no_role / "config.json").read_text()).items() if k != "role"}))
    broken = write_run(runs, template, "missing_key", "vanilla", 10, [0.5] * 4, [0.5] * 4)
    (broken / "log.jsonl").write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "hackward/removed"}) + "\n"
                                              for line in (broken / "log.jsonl").read_text().splitlines()))
    main(ResultsConfig(runs_dir=runs, last_n=2))
    p = table(runs)[("h1", "projected")]
    # cin_s - null_s_mean per step, then the last-2 mean where defined: seed 1 (0.5 - 0.1) = 0.4, seeds 2, 3 0.05 - 0.05 = 0
    assert p["cin_s_excess"] == pytest.approx(0.4 / 3) and p["n_eval"] == 0 and p["eval_strict"] is None
    md = (runs / "results.md").read_text()
    assert "| -0.550 [-0.674, -0.426] |" in md and "0.800 ± 0.058" in md
    reasons = dict(line[3:].split("`: ", 1) for line in md.splitlines() if line.startswith("- `"))
    assert reasons[str(runs / "no_config")] == "no config.json"
    assert reasons[str(runs / "bad_json")].startswith("config.json is not JSON")
    assert reasons[str(runs / "empty_log")] == "log.jsonl is empty"
    assert reasons[str(runs / "unfinished")] == "log.jsonl has 3 of 4 steps (still running, or stopped)"
    assert reasons[str(runs / "short")] == "1 steps, fewer than --last-n 2"
    assert reasons[str(runs / "no_role")] == "config.json lacks a field ('role')"
    assert reasons[str(runs / "missing_key")] == "log.jsonl lacks keys ['hackward/removed']"
    assert reasons[str(runs / "syn_vanilla_pairs_s1_20251231-000000")].startswith("superseded by the newer syn_vanilla_pairs_s1_20260101-000000")
    assert len(report(runs)["skipped"]) == 8


def test_held_out_eval_is_the_source_when_every_pair_has_one(template, tmp_path):
    runs = preregistered(tmp_path / "runs", template)
    strict = {"vanilla": 0.6, "projected": 0.5, "random": 0.9, "projected_pairs_null": 0.9}  # hack diff -0.1 on every seed vs vanilla: rules out a 30-point drop
    for arm in strict:
        for s in (1, 2, 3):
            run = runs / f"syn_{arm}{'' if arm.endswith('null') else '_pairs'}_s{s}_20260101-000000"
            write_eval(run, "leetcode_test_medhard-step_000004-run_tests-s0", strict[arm], 0.3, n=100)
            write_eval(run, "leetcode_test_medhard-step_000004-run_tests-s1", strict[arm] + 0.3, 0.3, n=300)  # pooled: +0.225
            write_eval(run, "leetcode_test_medhard-base-run_tests-s0", 0.0, 0.0, checkpoint="base")  # not the trained model
            write_eval(run, "problems-step_000004-run_tests-s0", 0.0, 0.0, problems="problems")  # another split
            write_eval(run, "leetcode_test_medhard-step_000002-run_tests-s0", 0.0, 0.0, checkpoint="step_000002")  # not the last checkpoint
            write_eval(run, "leetcode_test_medhard-step_000004-none-s0", 0.0, 0.0, hint="none")  # not the training hint
    garbled = runs / "syn_projected_pairs_s1_20260101-000000" / "eval" / "garbled"
    garbled.mkdir()
    (garbled / "summary.json").write_text("[1, 2")
    main(ResultsConfig(runs_dir=runs, last_n=2, eval_split="leetcode_test_medhard"))  # not the runs' own --eval-problems
    v = table(runs)[("baseline", "vanilla")]
    assert v["n_eval"] == 3 and v["eval_strict"] == pytest.approx(0.825) and v["eval_loose"] == pytest.approx(0.925) and v["eval_pass"] == pytest.approx(0.3)
    (h1,) = report(runs)["h1"]
    got = conditions(h1)
    assert all(c["source"] == "held-out eval (strict, gt_pass)" for c in got.values()) and got["vs baseline"]["d_hack_ci"] == pytest.approx([-0.1, -0.1])
    assert h1["verdict"] == "not supported" and h1["source"] == "held-out eval (strict, gt_pass)"
    assert "garbled" in (runs / "results.md").read_text()
    (e,) = report(runs)["effect"]  # the base evals: one per run, 12 x 100 completions, strict 0
    assert e["base"]["eval_strict"] == 0 and e["base"]["n"] == 1200
    assert [v["gap"] for v in e["vanilla"]] == pytest.approx([0.825] * 3) and e["vanilla_above_base_by_margin_at_every_seed"] is True
    assert "at every seed: yes" in (runs / "results.md").read_text()
    # The base model evaluated at another token limit than vanilla: no base pooled, no gap taken.
    for base_eval in runs.glob("*/eval/leetcode_test_medhard-base-run_tests-s0"):
        shutil.rmtree(base_eval)
    write_eval(runs / "syn_vanilla_pairs_s1_20260101-000000", "leetcode_test_medhard-base-run_tests-s1", 0.0, 0.0, checkpoint="base", max_new_tokens=64)
    main(ResultsConfig(runs_dir=runs, last_n=2, eval_split="leetcode_test_medhard", out=tmp_path / "protocols"))
    (e,) = report(tmp_path / "protocols")["effect"]
    assert e["base"] is None and "max_new_tokens" in e["apart"] and e["vanilla_above_base_by_margin_at_every_seed"] is None
    assert [v["gap"] for v in e["vanilla"]] == [None] * 3 and "differ in max_new_tokens" in (tmp_path / "protocols" / "results.md").read_text()
    # One paired run of one condition without its eval: every condition of the verdict back to the training numbers (one source).
    shutil.rmtree(runs / "syn_random_pairs_s2_20260101-000000" / "eval")
    main(ResultsConfig(runs_dir=runs, last_n=2, eval_split="leetcode_test_medhard", out=tmp_path / "again"))
    (h1,) = report(tmp_path / "again")["h1"]
    assert {c["source"] for c in conditions(h1).values()} == {"training last 2 (hack_s, gt_s)"} == {h1["source"]} and h1["verdict"] == "supported"


def test_evals_of_another_protocol_are_not_compared(template, tmp_path):
    runs = preregistered(tmp_path / "runs", template)
    for arm in ("vanilla", "projected", "random", "projected_pairs_null"):
        for s in (1, 2, 3):
            run = runs / f"syn_{arm}{'' if arm.endswith('null') else '_pairs'}_s{s}_20260101-000000"
            tokens = 256 if arm == "vanilla" else 512  # vanilla's evals cut completions shorter
            write_eval(run, "leetcode_test_medhard-step_000004-run_tests-s0", 0.5, 0.3, grader_version="2026-12-04", max_new_tokens=tokens)
    write_eval(runs / "syn_projected_pairs_s1_20260101-000000", "leetcode_test_medhard-step_000004-run_tests-s1", 0.5, 0.3, grader_version="2026-11-01", max_new_tokens=512)
    main(ResultsConfig(runs_dir=runs, last_n=2, eval_split="leetcode_test_medhard"))
    got = report(runs)
    assert any("differ in grader_version" in s["why"] and s["folder"].endswith("syn_projected_pairs_s1_20260101-000000/eval") for s in got["skipped"])
    (h1,) = got["h1"]  # projected s1 has no usable eval: the training numbers, where every condition is supported
    assert h1["source"] == "training last 2 (hack_s, gt_s)" and h1["verdict"] == "supported"
    shutil.rmtree(runs / "syn_projected_pairs_s1_20260101-000000" / "eval" / "leetcode_test_medhard-step_000004-run_tests-s1")
    main(ResultsConfig(runs_dir=runs, last_n=2, eval_split="leetcode_test_medhard", out=tmp_path / "again"))
    (h1,) = report(tmp_path / "again")["h1"]
    vs = conditions(h1)
    assert h1["source"] == "held-out eval (strict, gt_pass)" and h1["verdict"] == "not supported"
    assert vs["vs baseline"]["outcome"] == "undetermined" and "max_new_tokens ['256', '512']" in vs["vs baseline"]["why"]
    assert vs["vs random"]["outcome"] == "not supported"  # same protocol: judged (hack diff 0)


def test_quality_gate_recorded_by_the_run_is_shown(template, tmp_path):
    runs = preregistered(tmp_path / "runs", template)
    record = {"v_hack": "x.safetensors", "header": {}, "report": "x.report.json", "beats_shuffled": True, "heldout_sign_agreement": 0.928,
              "heldout_sign_agreement_shuffled_p95": 0.736, "hackward_fraction_heldout": 0.462, "hackward_fraction_shuffled_p95": 0.363}
    for run in runs.glob("syn_projected_pairs_s*"):
        (run / "vhack.json").write_text(json.dumps(record))
    main(ResultsConfig(runs_dir=runs, last_n=2))
    assert report(runs)["h1"][0]["v_hack_quality"] == "beats its label-shuffled twin (sign agreement 0.93 vs p95 0.74, hack-ward fraction 0.462 vs p95 0.363)"
    assert table(runs)[("null_pairs", "projected")]["v_hack_quality"] == "no record"  # no vhack.json: a run from before 2026-12-04


def test_vanilla_of_another_pairs_file_is_the_baseline_when_none_used_this_one(template, tmp_path):
    runs = tmp_path / "runs"  # as sweep.py queues it: vanilla once per seed, measured with the first pairs file
    for seed in (1, 2):
        write_run(runs, template, f"v{seed}", "vanilla", seed, last2(0.9), last2(0.3))
        write_run(runs, template, f"p{seed}", "projected", seed, last2(0.2 + 0.1 * seed), last2(0.3), pairs="pairs_minimal.jsonl")
    main(ResultsConfig(runs_dir=runs, last_n=2))
    (h1,) = report(runs)["h1"]
    v = conditions(h1)["vs baseline"]
    assert h1["pairs"] == "pairs_minimal.jsonl" and v["n"] == 2 and v["d_hack"] == pytest.approx(-0.55) and v["control"] == "vanilla (smoke, pairs.jsonl)"


def test_cli_writes_into_out(template, tmp_path):
    runs = preregistered(tmp_path / "runs", template)
    proc = subprocess.run([sys.executable, "-m", "projected_grpo.results", str(runs), "--last-n", "2", "--out", str(tmp_path / "report")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "- **H1, projected one_sided +update (smoke, pairs.jsonl): supported.**" in proc.stdout
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"results.csv", "results.md", "results.json", "results_rollouts.png", "results_hackward.png", "results_leak.png"}
    with pytest.raises(FileNotFoundError, match="not a folder of run folders"):
        main(ResultsConfig(runs_dir=tmp_path / "absent"))


def curves_of(hack: list[float], cin_s: list[float | None], null_s: float, cin_t: list[float | None] | None = None, null_t: float = 0.25,
              attempted: list[float] | None = None) -> pl.DataFrame:
    """A vanilla run's per-step curves with only what H2 and H3 read set (attempted_s: hack_s unless given)."""
    n = len(hack)
    cols = {"step": list(range(1, n + 1)), "rollout/hack_s": hack, "rollout/attempted_s": attempted or hack, "hackward/cin_s": cin_s,
            "hackward/null_s_p95": [null_s] * n, "hackward/cin_t": cin_t or [None] * n, "hackward/null_t_p95": [null_t] * n}
    return pl.DataFrame({k: cols.get(k, [0.0] * n) for k in ("step", *LOG_KEYS)}, schema={"step": pl.Int64} | {k: pl.Float64 for k in LOG_KEYS})


def test_h2_and_h3_read_from_a_vanilla_log():
    quiet = [0.10, 0.12] * 5  # steps 1-10: mean 0.11, sd 0.0105: own bar 0.131
    rising = leading(curves_of([0.0] * 15 + [0.3] * 5, quiet + [0.5] * 10, null_s=0.2))
    assert rising["onset"] == 16 and rising["h2_null_from"] == 11 and rising["h2_own_from"] == 11
    assert rising["own_bar"] == pytest.approx(0.11 + 2 * statistics.stdev(quiet))
    # The same rise cut short by an earlier onset (step 14): 3 steps above before it, not 5.
    cut = leading(curves_of([0.0] * 13 + [0.3] * 7, quiet + [0.5] * 10, null_s=0.2))
    assert cut["onset"] == 14 and cut["h2_null_from"] is None and cut["h2_own_from"] is None
    # Above the null from step 1 but flat: H2 by the letter, not against its own start.
    flat = leading(curves_of([0.0] * 15 + [0.3] * 5, quiet + [0.11] * 10, null_s=0.05))
    assert flat["h2_null_from"] == 1 and flat["h2_own_from"] is None
    # Never hacks: no onset; H3 counts the steps where cin_t beats its null and cin_s does not.
    never = leading(curves_of([0.0] * 20, [0.1] * 18 + [None, 0.3], null_s=0.2, cin_t=[0.3, 0.2] * 10))
    assert never["onset"] is None and never["h3_steps"] == [1, 3, 5, 7, 9, 11, 13, 15, 17] and never["steps_with_cin_t"] == 19
    # A step whose cin_s null is missing counts neither way.
    no_null = curves_of([0.0] * 20, [0.1] * 20, null_s=0.2, cin_t=[0.3, 0.2] * 10)
    no_null = no_null.with_columns(pl.when(pl.col("step") == 1).then(None).otherwise(pl.col("hackward/null_s_p95")).alias("hackward/null_s_p95"))
    assert leading(no_null)["h3_steps"] == list(range(3, 20, 2)) and leading(no_null)["steps_with_cin_t"] == 19
    # Beside H2: attempted_s rising from step 11 against its own start leads an onset at 16; one at 14 cuts it short.
    attempts = [0.02, 0.04] * 5 + [0.15] * 10
    early = leading(curves_of([0.0] * 15 + [0.3] * 5, quiet + [0.11] * 10, null_s=0.05, attempted=attempts))
    assert early["attempt_from"] == 11 and early["attempt_bar"] == pytest.approx(0.03 + 2 * statistics.stdev(attempts[:10])) and early["h2_own_from"] is None
    assert leading(curves_of([0.0] * 13 + [0.3] * 7, quiet + [0.11] * 10, null_s=0.05, attempted=attempts))["attempt_from"] is None
