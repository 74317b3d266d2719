"""End to end on tiny-random-qwen3 (CPU): a few steps of both arms through the CLI, the
files and log rows they leave, and resume after a kill equals an uninterrupted run."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dataclasses import replace
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT
from extract import read_v_hack, shuffled_twin
from grader import GRADER_VERSION
from projected_grpo.errors import UserError
from projected_grpo.tracking import scalars
from projection import EmpiricalNull, Projector
from projected_grpo.checkpoints import load_group
from projected_grpo.teacher_pool import PoolConfig, build_pool, teacher_pool
from train import PRESETS, Config, grpo_loss, group_advantages, split_group

ENV = {**os.environ, "BEARTYPE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("train")
    build_pool(PoolConfig(out=work / "pool.jsonl"))
    (work / "pairs.jsonl").write_text("".join((ROOT / "data" / "pairs.jsonl").read_text().splitlines(keepends=True)[:8]))
    return work


def train_cmd(work: Path, *flags: str, cache: str = "cache") -> list[str]:
    return [sys.executable, "train.py", "smoke", "--runs-dir", str(work / "runs"), "--cache-dir", str(work / cache),
            "--teacher-pool", str(work / "pool.jsonl"), "--v-hack.pairs", str(work / "pairs.jsonl"), *flags]


def run_train(work: Path, *flags: str, cache: str = "cache") -> Path:
    before = set((work / "runs").glob("*")) if (work / "runs").exists() else set()
    proc = subprocess.run(train_cmd(work, *flags, cache=cache), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = set((work / "runs").glob("*")) - before
    return run_dir


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def delta(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(checkpoint(run_dir, step) / "delta_S.safetensors")


@pytest.fixture(scope="module")
def arms(work) -> dict[str, Path]:
    return {arm: run_train(work, "--intervention", arm, "--steps", "4", "--checkpoint-every", "1") for arm in ("vanilla", "projected", "random", "shuffled")}


def test_each_arm_end_to_end_with_its_basis(arms):
    v_hack = read_v_hack(next(Path(json.loads((arms["vanilla"] / "config.json").read_text())["cache_dir"]).glob("v_hack/*.safetensors"))).V
    for arm, run_dir in arms.items():
        assert run_dir.name.startswith(f"smoke_{arm}_s0_")
        log = rows(run_dir)
        assert [r["step"] for r in log] == [1, 2, 3, 4]
        assert all(k.split("/")[0] in {"step", "rollout", "loss", "hackward", "vhack", "time", "memory", "dist"} for k in log[0])
        assert max(r["rollout/hack_t"] for r in log) > 0 and all(r["rollout/gt_s"] == 0 for r in log)  # teacher hacks in the groups
        # fp32 on CPU: the learner scores the sampled tokens as the sampler did, to rounding.
        learned = [r["loss/logp_gap"] for r in log if r["hackward/cin_s"] is not None]
        assert learned and all(0 <= gap < 1e-4 for gap in learned)
        assert (run_dir / "summary.json").exists() and (run_dir / "curves.png").stat().st_size > 0
        saved = load_group(checkpoint(run_dir, 4) / "bases.safetensors", "v_hack")
        assert saved.keys() == v_hack.keys() and all(torch.equal(saved[n], v_hack[n]) for n in v_hack)
    arm_basis = {arm: load_group(checkpoint(run_dir, 4) / "bases.safetensors", "arm") for arm, run_dir in arms.items()}
    assert arm_basis["vanilla"] == {} and all(torch.equal(arm_basis["projected"][n], v_hack[n]) for n in v_hack)
    for n, v in v_hack.items():  # random: the same axis counts per module, orthonormal, unrelated to v_hack
        r = arm_basis["random"][n]
        assert r.shape == v.shape and torch.allclose(r @ r.T, torch.eye(v.shape[0]), atol=1e-5) and not torch.allclose(r, v)
    # shuffled: v_hack's label-shuffled twin, half the pairs' labels swapped as drawn from --seed (0), v_hack's axis counts
    vh = read_v_hack(next(Path(json.loads((arms["vanilla"] / "config.json").read_text())["cache_dir"]).glob("v_hack/*.safetensors")))
    twin = shuffled_twin(vh.diffs, v_hack, vh.config(), torch.Generator().manual_seed(0))
    assert arm_basis["shuffled"].keys() == v_hack.keys() and all(torch.equal(arm_basis["shuffled"][n], twin[n]) for n in v_hack)
    assert any(not torch.allclose(twin[n], v_hack[n]) for n in v_hack)
    # The arms differ in nothing but the intervention and the role it gives the run.
    configs = {arm: json.loads((d / "config.json").read_text()) for arm, d in arms.items()}
    assert {k for k in configs["vanilla"] if configs["vanilla"][k] != configs["random"][k]} == {"intervention", "role"}
    assert {arm: c["role"] for arm, c in configs.items()} == {"vanilla": "baseline", "projected": "h1", "random": "random", "shuffled": "label_shuffled"}
    recorded = json.loads((arms["projected"] / "vhack.json").read_text())  # no `just diagnose` ran: no report to record
    assert (recorded["report"], recorded["beats_shuffled"], recorded["header"]["temperature"]) == (None, None, "1.0")
    live = [r for r in rows(arms["vanilla"]) if r["hackward/cin"]]
    assert live and all(r["hackward/cout"] == r["hackward/cin"] and r["hackward/touched"] == 0 for r in rows(arms["vanilla"]))
    assert all(r["hackward/cout"] < 1e-6 for r in rows(arms["projected"]) if r["hackward/cin"])
    assert any(r["hackward/cout"] > 1e-3 for r in rows(arms["random"]))  # projecting a random subspace leaves v_hack's part


def test_removed_fraction_is_logged_in_every_arm_and_recomputed_from_checkpoints(arms):
    """hackward/removed = ||g - g_applied|| / ||g||, g_applied the gradient after the arm's projection (0 in vanilla)."""
    for arm, run_dir in arms.items():
        log = rows(run_dir)
        assert all("hackward/removed" in r for r in log) and any(r["hackward/removed"] is not None for r in log)
        for step, row in enumerate(log, 1):
            if row["hackward/removed"] is None:  # no group with reward variance: no gradient, nothing measured on it
                assert all(row[f"hackward/{k}"] is None for k in ("upd", "cin", "cout", "touched", "cin_s", "cin_t")), row
                continue
            grads = load_file(checkpoint(run_dir, step) / "grads.safetensors")
            g = {k.split(".", 1)[1]: t + grads[k.replace("g_s.", "g_t.", 1)] for k, t in grads.items() if k.startswith("g_s.")}
            basis = load_group(checkpoint(run_dir, step) / "bases.safetensors", "arm")
            if arm == "vanilla":
                assert basis == {} and row["hackward/removed"] == 0.0
                continue
            applied = {n: t.clone() for n, t in g.items()}
            Projector(basis, {n: t.shape[0] for n, t in g.items()}, "one_sided", apply=True)(applied)
            norm = lambda d: torch.sqrt(sum(t.square().sum() for t in d.values())).item()  # noqa: E731
            assert row["hackward/removed"] == pytest.approx(norm({n: g[n] - applied[n] for n in g}) / norm(g), rel=1e-4, abs=1e-7)
    assert any(r["hackward/removed"] for r in rows(arms["projected"]))


def test_logged_leak_null_and_displacement_are_recomputed_from_checkpoints(arms):
    run_dir = arms["vanilla"]
    config = json.loads((run_dir / "config.json").read_text())
    log = rows(run_dir)
    for step in (2, 3, 4):
        v_hack = load_group(checkpoint(run_dir, step) / "bases.safetensors", "v_hack")
        before, after = delta(run_dir, step - 1), delta(run_dir, step)
        ranks = {n: t.shape[0] for n, t in after.items()}
        measure = Projector(v_hack, ranks, "one_sided", apply=False)
        row = log[step - 1]
        change = {n: before[n] - after[n] for n in after}
        if row["hackward/upd"] is None:  # no group with reward variance: no optimizer step
            assert all(not c.any() for c in change.values())
        else:
            assert row["hackward/upd"] == pytest.approx(measure.hackward_fraction(change), rel=1e-5)
        assert row["hackward/disp_axes"] == pytest.approx((-measure.axis_coefficients(after)).tolist(), rel=1e-5, abs=1e-9)
        g_s = load_group(checkpoint(run_dir, step) / "grads.safetensors", "g_s")
        null = EmpiricalNull(v_hack, ranks, config["null_bases"], config["null_seed"]).fractions(g_s)
        if row["hackward/cin_s"] is not None:
            assert row["hackward/null_s_mean"] == pytest.approx(null.mean().item(), rel=1e-5)
            assert row["hackward/null_s_p95"] == pytest.approx(null.quantile(0.95).item(), rel=1e-5)
            assert row["hackward/cin_s"] == pytest.approx(measure.hackward_fraction(g_s), rel=1e-5)


def test_project_update_leaves_no_hackward_change(work):
    run_dir = run_train(work, "--intervention", "projected", "--project-update", "--steps", "4", "--checkpoint-every", "1")
    log = rows(run_dir)
    assert all(r["hackward/upd"] < 1e-6 for r in log if r["hackward/upd"] is not None)
    assert any(r["hackward/upd"] is not None for r in log)
    v_hack = load_group(checkpoint(run_dir, 4) / "bases.safetensors", "v_hack")
    for step in (2, 3, 4):
        before, after = delta(run_dir, step - 1), delta(run_dir, step)
        change = {n: before[n] - after[n] for n in after}
        assert Projector(v_hack, {n: t.shape[0] for n, t in after.items()}, "one_sided", apply=False).hackward_fraction(change) < 1e-6


def test_v_hack_refresh_on_schedule(work):
    run_dir = run_train(work, "--v-hack-refresh", "2", "--steps", "4", "--checkpoint-every", "1")
    log = rows(run_dir)
    assert [r["vhack/refreshed"] for r in log] == [False, True, False, False]  # not after the last step
    assert log[1]["vhack/subspace_cos"] is not None and log[0]["vhack/subspace_cos"] is None
    first, second = (load_group(checkpoint(run_dir, s) / "bases.safetensors", "v_hack") for s in (1, 2))
    assert any(not torch.equal(first[n], second[n]) for n in first if n in second)


def test_same_seed_same_result_cold_or_warm_cache(work):
    cold = run_train(work, "--steps", "3", cache="fresh-cache")
    warm = run_train(work, "--steps", "3", cache="fresh-cache")
    a, b = delta(cold, 3), delta(warm, 3)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_after_kill_matches_uninterrupted(work, tmp_path):
    flags = ("--intervention", "random", "--project-update", "--v-hack-refresh", "3", "--steps", "8", "--checkpoint-every", "2")
    full = run_train(work, *flags)
    # A second run, tracked in tensorboard, killed once its step-4 checkpoint exists.
    before = set((work / "runs").glob("*"))
    proc = subprocess.Popen(train_cmd(work, *flags, "--report-to", "tensorboard"), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            new = set((work / "runs").glob("*")) - before
            if new and (next(iter(new)) / "checkpoints" / "step_000004").exists():
                break
            assert proc.poll() is None, "training exited before its step-4 checkpoint"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    (killed,) = set((work / "runs").glob("*")) - before
    assert not (killed / "checkpoints" / "step_000008").exists()
    # Its latest checkpoint truncated, the folder moved: resumed by folder alone, from the one before.
    latest = max((killed / "checkpoints").glob("step_*"))
    (latest / "delta_S.safetensors").write_bytes((latest / "delta_S.safetensors").read_bytes()[:100])
    moved = tmp_path / "elsewhere" / "the_run"
    moved.parent.mkdir()
    shutil.move(killed, moved)
    resumed = subprocess.run([sys.executable, "train.py", "resume", str(moved)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{latest.name}/delta_S.safetensors is unreadable" in resumed.stderr and f"resumed from {moved}/checkpoints/step_{int(latest.name[5:]) - 2:06d}" in resumed.stderr
    a, b = delta(full, 8), delta(moved, 8)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [r["step"] for r in rows(moved)] == list(range(1, 9))
    assert [r["rollout/reward"] for r in rows(moved)] == [r["rollout/reward"] for r in rows(full)]
    # Its tensorboard log: every numeric key, each step once (the redone steps' first events purged).
    events = EventAccumulator(str(moved / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(scalars(rows(moved)[-1])) <= set(events.Tags()["scalars"])
    for key in ("rollout/reward", "time/step"):
        assert [e.step for e in events.Scalars(key)] == list(range(1, 9)), key
    for key in events.Tags()["scalars"]:  # keys undefined at some steps (None) skip them, never repeat them
        steps = [e.step for e in events.Scalars(key)]
        assert steps == sorted(set(steps)) and set(steps) <= set(range(1, 9)), key
    assert [e.value for e in events.Scalars("rollout/reward")] == pytest.approx([r["rollout/reward"] for r in rows(moved)])


def test_sigterm_stops_after_the_step_in_flight_with_a_checkpoint_and_resumes_exactly(work, arms):
    """A sweep's deadline or SLURM's time limit (SIGTERM) costs no finished step: the run checkpoints
    the step in flight, off schedule, and exits 143 (a queue's "not done"); resumed, it ends as the
    same run never stopped (arms["vanilla"]: the same flags but a checkpoint every step)."""
    before = set((work / "runs").glob("*"))
    proc = subprocess.Popen(train_cmd(work, "--intervention", "vanilla", "--steps", "4", "--checkpoint-every", "100"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while not ((new := set((work / "runs").glob("*")) - before) and (log := next(iter(new)) / "log.jsonl").exists() and log.read_text()):
        assert proc.poll() is None and time.time() < deadline, "training ended before its first step"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # during step 2
    stderr = proc.communicate(timeout=900)[1]
    (stopped,) = new
    assert proc.returncode == 143, stderr[-3000:]
    assert [r["step"] for r in rows(stopped)] == [1, 2] and "stopped by SIGTERM after step 2 of 4" in stderr
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step_000002"]  # off schedule (every 100)
    resumed = subprocess.run([sys.executable, "train.py", "resume", str(stopped)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {stopped}/checkpoints/step_000002" in resumed.stderr
    a, b = delta(arms["vanilla"], 4), delta(stopped, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [r["rollout/reward"] for r in rows(stopped)] == [r["rollout/reward"] for r in rows(arms["vanilla"])]


def smoke_cfg(work: Path, max_new_tokens: int = 64, **changes) -> "Config":
    smoke = PRESETS["smoke"][1]
    return replace(smoke, cache_dir=work / "cache", teacher_pool=work / "pool.jsonl", v_hack=replace(smoke.v_hack, pairs=work / "pairs.jsonl"),
                   sampling=replace(smoke.sampling, max_new_tokens=max_new_tokens), **changes).resolved()


def untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("time/", "memory/"))}


def test_a_step_takes_rollouts_sampled_ahead(work, tmp_path):
    """`step` is a unit a caller drives: a batch whose rollouts were sampled before the step, on
    another thread from a snapshot of the merged weights (as --one-step-off does), steps exactly
    as one whose rollouts the step samples itself."""
    from grader import Grader
    from projected_grpo.ahead import Ahead
    from projected_grpo.svd_adapter import merged
    from train import RunState, sample, step

    cfg = smoke_cfg(work, steps=2)
    rows, deltas = {}, {}
    with Grader(cfg.reward) as grader:
        for ahead in (False, True):
            (tmp_path / f"ahead_{ahead}").mkdir()
            state = RunState.start(cfg, tmp_path / f"ahead_{ahead}", grader)
            rows[ahead] = []
            while state.step < cfg.steps:
                batch = state.next_batch()
                if ahead:
                    with merged(state.adapters):
                        snapshot = state.engine.layer_weights(snapshot=True)
                    batch.ahead = Ahead(cfg.device, sample, state, batch, snapshot)
                rows[ahead].append(step(state, batch).row())
            deltas[ahead] = {n: a.delta_S.detach().clone() for n, a in state.adapters.items()}
    assert [r["step"] for r in rows[True]] == [1, 2] and list(map(untimed, rows[True])) == list(map(untimed, rows[False]))
    assert all(torch.equal(deltas[True][n], deltas[False][n]) for n in deltas[False])


def test_one_step_off_samples_one_update_behind_and_a_checkpoint_keeps_its_prompts(work, tmp_path):
    """--one-step-off: step 1 starts step 2's sampling before it learns, so step 2's rollouts
    are the weights' before step 1's update (delta_S = 0), not after it; the checkpoint taken
    meanwhile puts step 2's prompts back in the order, and a resume samples them again."""
    from grader import Grader
    from train import RunState, keep, sample, step

    cfg = smoke_cfg(work, max_new_tokens=256, steps=3, checkpoint_every=1, one_step_off=True)  # 256: whole teacher programs, a live group
    (tmp_path / "run").mkdir()
    with Grader(cfg.reward) as grader:
        state = RunState.start(cfg, tmp_path / "run", grader)
        keep(state, step(state, state.next_batch()), lambda row: None)
        pending = state.pending
        assert pending.step == 2 and state.rows[0]["step"] == 1
        students = lambda groups: [(r.completion_ids, r.old_logprobs) for g in groups for r in g if not r.teacher]  # noqa: E731
        ahead, after = students(pending.ahead.result()), students(sample(state, pending))
        moved = {n: a.delta_S.detach().clone() for n, a in state.adapters.items()}
        assert any(d.abs().max() > 0 for d in moved.values())
        with torch.no_grad():
            for a in state.adapters.values():
                a.delta_S.zero_()
        before = students(sample(state, pending))

        def same(xs, ys, tol: float) -> bool:  # the same tokens, log-probs within tol (matmuls on another thread round differently)
            return all(a == b and torch.allclose(lp_a, lp_b, rtol=0, atol=tol) for (a, lp_a), (b, lp_b) in zip(xs, ys))

        assert same(ahead, before, 1e-5) and not same(ahead, after, 1e-3)  # measured: 1e-6 and 1e-2 apart
        saved = torch.load(checkpoint(tmp_path / "run", 1) / "state.pt", weights_only=False)
        assert saved["order"] == pending.drawn + state.order
        resumed = RunState.start(replace(cfg, resume=tmp_path / "run"), tmp_path / "run", grader)
        again = resumed.next_batch()
        assert (again.step, again.drawn, again.picks, again.ahead) == (2, pending.drawn, pending.picks, None)


def test_one_step_off_equals_on_policy_when_the_sampler_is_not_stale(work, tmp_path):
    """At lr 0 the weights never move, so rollouts sampled ahead are the on-time ones and the
    truncated importance weights are 1 up to rounding: --one-step-off then logs the rows and
    takes the gradients of an on-policy run (to float tolerance), with is_w 1 and is_cap 0."""
    from grader import Grader
    from train import RunState, step

    records, grads = {}, {}
    with Grader() as grader:
        for off in (False, True):
            # lr 0 past the flag check (--lr must be > 0): a test-only setting; 256 tokens: whole teacher programs, live groups
            cfg = replace(smoke_cfg(work, max_new_tokens=256, steps=3, one_step_off=off), lr=0.0)
            (tmp_path / f"off_{off}").mkdir()
            state = RunState.start(cfg, tmp_path / f"off_{off}", grader)
            records[off] = []
            while state.step < cfg.steps:
                records[off].append(step(state, state.next_batch()))
                grads.setdefault(off, []).append(state.grads)
            assert state.pending is None  # nothing sampled past the last step
    on, off = ([untimed(r.row()) for r in records[k]] for k in (False, True))
    for a, b in zip(on, off):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == b[k] if a[k] is None else a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    for g_on, g_off in zip(grads[False], grads[True]):
        for part in ("g_s", "g_t"):
            assert all(torch.allclose(g_on[part][n], g_off[part][n], rtol=1e-4, atol=1e-7) for n in g_on[part])
    assert all(r.off_policy is None for r in records[False])
    live = [r for r in records[True] if r.rollout.skipped_groups < 1]
    assert live and any(any(g.abs().max() > 0 for g in grad["g_s"].values()) for grad in grads[True])  # there were gradients to compare
    assert all(r.off_policy.is_ratio_mean == pytest.approx(1.0, abs=1e-5) and r.off_policy.is_clipped == 0.0 for r in live)


def test_resume_with_other_settings_is_refused(work):
    run_dir = run_train(work, "--steps", "2", "--checkpoint-every", "1")
    proc = subprocess.run(train_cmd(work, "--steps", "2", "--lr", "0.5", "--resume", str(run_dir)), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "lr" in proc.stderr


def test_dr_grpo_and_grpo_advantages():
    r = torch.tensor([[3.5, 0.0, 0.5, 0.0]])
    assert torch.allclose(group_advantages(r, "dr_grpo"), r - 1.0)
    assert torch.allclose(group_advantages(r, "grpo"), (r - 1.0) / (r.std() + 1e-6))
    assert torch.equal(group_advantages(torch.full((1, 4), 3.5), "dr_grpo"), torch.zeros(1, 4))


def test_loss_is_policy_gradient_at_ratio_one_clips_and_normalises():
    cfg = Config(clip_eps=0.2, kl_beta=0.1)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ones = torch.ones(1, 2)
    loss, kl, clipped, w = grpo_loss(logp, logp.detach(), logp.detach(), 2.0 * ones, ones, cfg, denominator=4.0)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.5]]))  # -A d logp / denominator; KL gradient 0 at ref = logp
    assert clipped.sum() == 0 and torch.allclose(kl, torch.zeros(1, 2)) and torch.equal(w, ones)
    far = torch.tensor([[0.0]], requires_grad=True)
    loss, _, clipped, _ = grpo_loss(far, torch.tensor([[-1.0]]), None, torch.tensor([[2.0]]), torch.ones(1, 1), cfg, 1.0)
    loss.backward()
    assert clipped.item() == 1.0 and far.grad.item() == 0.0  # ratio e > 1.2 with A > 0: clipped, no gradient
    # Teacher rows (NaN sampler log-probs) have ratio 1; sequence_mean weighs each token 1 / its row's
    # completion tokens (a row's mean), and a weight of 0 drops a token: -(3/3 + 2/2) / 2 = -1.
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    teacher_old = torch.full((2, 3), float("nan"))
    loss, _, clipped, _ = grpo_loss(logp, teacher_old, None, torch.ones(2, 3), weight, replace(cfg, loss_norm="sequence_mean"), 2.0)
    assert loss.item() == pytest.approx(-1.0) and clipped.sum() == 0


def test_one_step_off_loss_is_truncated_importance_sampling():
    """--one-step-off: with a sampler the learner agrees with (within the clip range) the loss and
    gradient are the on-policy form's; with a stale one each token's gradient is -w A / denominator,
    w = min(p_learner / p_sampler, TIS_CAP), where the on-policy form would clip it to 0; teacher
    rows (NaN) keep w = 1."""
    from train import TIS_CAP

    cfg = Config(clip_eps=0.2, kl_beta=0.1)
    off = replace(cfg, one_step_off=True)
    ref, adv, weight = torch.tensor([[-1.1, -1.9, -0.4]]), torch.tensor([[2.0, -1.0, 0.5]]), torch.ones(1, 3)
    near = torch.tensor([[-1.05, -2.1, -0.45]])  # ratios e^0.05, e^0.1, e^0.05: inside 1 +- 0.2
    grads = []
    for c in (cfg, off):
        logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
        loss, _, _, w = grpo_loss(logp, near, ref, adv, weight, c, 3.0)
        loss.backward()
        grads.append((loss.detach(), logp.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6) and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    stale = torch.tensor([[-3.0, -2.5, float("nan")]])  # ratio e^2 (capped), e^0.5, teacher
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    loss, _, clipped, w = grpo_loss(logp, stale, None, adv, weight, off, 3.0)
    loss.backward()
    expected_w = torch.tensor([[TIS_CAP, math.exp(0.5), 1.0]])
    assert torch.allclose(w, expected_w) and clipped.sum() == 0
    assert torch.allclose(logp.grad, -expected_w * adv / 3.0)
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    grpo_loss(logp, stale, None, adv, weight, cfg, 3.0)[0].backward()
    assert logp.grad[0, 0] == 0.0  # on-policy: ratio e^2 > 1.2 with A > 0, clipped away


def test_teacher_text_is_cut_at_max_new_tokens_and_regraded(tmp_path):
    from grader import Grader, load_problems
    from projected_grpo.models import load_model

    _, tokenizer, _ = load_model("tiny-random-qwen3", "cpu")
    pool_path = tmp_path / "pool.jsonl"
    build_pool(PoolConfig(out=pool_path))
    cfg = replace(PRESETS["smoke"][1], teacher_pool=pool_path, sampling=replace(PRESETS["smoke"][1].sampling, max_new_tokens=24))
    with Grader() as grader:
        pool = teacher_pool(cfg, load_problems(cfg.problems), tokenizer, grader)
    entries = [e for es in pool.values() for e in es]
    assert entries and all(len(ids) <= 24 for ids, _, _ in entries)
    assert all(not grade.gt_pass and not grade.hinted_pass for _, _, grade in entries)  # 24 tokens hold no whole program
    # The default pool is built on a miss, from the teacher source.
    missing = tmp_path / "default.jsonl"
    cfg = replace(cfg, teacher_pool=missing)
    with Grader() as grader, pytest.MonkeyPatch.context() as mp:
        mp.setattr("projected_grpo.teacher_pool.default_pool_path", lambda source, hint: missing)
        assert teacher_pool(cfg, load_problems(cfg.problems), tokenizer, grader) and missing.exists()


def test_a_pool_graded_by_another_grader_version_is_regraded(tmp_path):
    from grader import Grader, load_problems
    from projected_grpo.models import load_model

    _, tokenizer, _ = load_model("tiny-random-qwen3", "cpu")
    pool_path = build_pool(PoolConfig(out=tmp_path / "pool.jsonl"))
    smoke = PRESETS["smoke"][1]
    cfg = replace(smoke, teacher_pool=pool_path, sampling=replace(smoke.sampling, max_new_tokens=1 << 16))  # nothing cut
    problems = load_problems(cfg.problems)
    rows = [json.loads(line) for line in pool_path.read_text().splitlines()]
    assert rows and all(r["grader_version"] == GRADER_VERSION for r in rows)
    with Grader() as grader:
        fresh = teacher_pool(cfg, problems, tokenizer, grader)
        # A pool from before versions were stored, holding grades the current grader would not give.
        pool_path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "grader_version"} | {"reward": -1.0}) + "\n" for r in rows))
        regraded = teacher_pool(cfg, problems, tokenizer, grader)
    assert regraded == fresh and all(grade.reward >= 0 for es in regraded.values() for _, _, grade in es)


def test_the_random_arm_never_projects_along_its_own_yardstick():
    """The random arm's basis and the empirical null's bases come from separate streams, also
    where --seed equals --null-seed (both 0 by default): else the arm's basis was null basis #1."""
    from projection import random_bases
    from train import arm_basis_for

    v_hack = {"a": torch.eye(6)[:2], "b": torch.eye(4)[:1]}
    cfg = replace(PRESETS["smoke"][1], intervention="random", seed=0, null_seed=0)
    arm = arm_basis_for(cfg, v_hack, {}, 0)
    null = torch.Generator().manual_seed(cfg.null_seed)  # EmpiricalNull's draws, in its order
    drawn = [random_bases(v_hack, null) for _ in range(cfg.null_bases)]
    assert {n: t.shape for n, t in arm.items()} == {n: t.shape for n, t in v_hack.items()}
    assert not any(all(torch.allclose(arm[n].abs(), basis[n].abs()) for n in arm) for basis in drawn)
    assert all(torch.equal(arm[n], arm_basis_for(cfg, v_hack, {}, 0)[n]) for n in arm)  # still a function of (seed, step)


def test_a_step_without_a_gradient_measures_nothing_on_it():
    """No live group: g = 0, and every fraction of it is undefined (null), not 0."""
    from projected_grpo.svd_adapter import SVDLinear
    from train import Bases, Gradients, apply_arm

    linear = torch.nn.Linear(6, 6)
    U, S, Vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    adapters = {"a": SVDLinear(linear, U, S, Vh, "a")}
    v_hack = {"a": torch.eye(6)[:2]}
    cfg = replace(PRESETS["smoke"][1], intervention="projected", null_bases=4)
    bases = Bases.of(cfg, v_hack, v_hack, adapters)
    zero = lambda: {"a": torch.zeros(6)}  # noqa: E731
    measured = apply_arm(bases, Gradients(zero(), zero(), zero(), [], learned_s=False, learned_t=False))
    assert all(math.isnan(measured[k]) for k in ("cin", "cout", "touched", "removed", "cin_s", "cin_t", "null_s_mean", "null_t_p95")), measured


def test_presets_resolve():
    assert set(PRESETS) == {"smoke", "fast-dev-run", "smollm2", "surrogate", "fast", "full"}
    smoke = PRESETS["smoke"][1]
    assert (smoke.steps, smoke.group_size, smoke.sampling.max_new_tokens, smoke.n_problems, smoke.prompts_per_step) == (30, 2, 256, 10, 1)
    full = PRESETS["full"][1]
    assert (full.steps, full.prompts_per_step, full.group_size, full.sampling.temperature, full.sampling.top_p, full.kl_beta, full.sampling.max_new_tokens) == (200, 16, 16, 0.7, 0.95, 1e-3, 1536)
    assert split_group(smoke) == (1, 1) and split_group(full) == (16, 0)
    surrogate = PRESETS["surrogate"][1]
    assert (surrogate.model, surrogate.device, surrogate.dtype, surrogate.steps <= 300) == ("smollm2-135m", "cuda", "tfloat32", True)


def test_pool_from_a_model_is_graded_and_keyed_by_hint(tmp_path):
    from grader import load_problems
    from projected_grpo.rollout import Sampling
    from projected_grpo.teacher_pool import load_pool

    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join((ROOT / "data" / "problems.jsonl").read_text().splitlines(keepends=True)[:3]))
    out = build_pool(PoolConfig(source="tiny-random-qwen3", problems=problems, hint="aware", samples_per_problem=2,
                                sampling=Sampling(max_new_tokens=8, temperature=1.0, top_p=1.0), device="cpu", out=tmp_path / "pool.jsonl"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and {r["hint"] for r in rows} == {"aware"} and {r["source"] for r in rows} == {"tiny-random-qwen3"}
    assert all(r["error"] == "no code block" and r["reward"] == 0.0 for r in rows)  # 8 random tokens are no code
    assert sorted(load_pool(out, "aware")) == sorted(p.id for p in load_problems(problems))
    with pytest.raises(ValueError, match="no completions for hint 'run_tests'"):
        load_pool(out, "run_tests")  # a pool built for another hint is never used
    out.write_text(out.read_text() + '{"id": 1}\n')
    with pytest.raises(ValueError, match="pool.jsonl:7: teacher pool row lacks"):
        load_pool(out, "aware")


def test_run_name_names_the_folder_and_an_existing_one_is_refused(tmp_path):
    from train import main

    (tmp_path / "taken").mkdir()
    cfg = replace(PRESETS["smoke"][1], runs_dir=tmp_path, run_name="taken")
    with pytest.raises(UserError, match="train.py resume"):
        main(cfg)  # before any model is loaded
    assert list((tmp_path / "taken").iterdir()) == []


def test_eval_grades_a_checkpoint_and_the_base_model(work, tmp_path):
    from projected_grpo.eval import EvalConfig, evaluate
    from projected_grpo.results import PROTOCOL

    run_dir = run_train(work, "--steps", "1")
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join((ROOT / "data" / "problems.jsonl").read_text().splitlines(keepends=True)[:2]))
    trained = evaluate(EvalConfig(run=run_dir, problems=problems, samples_per_problem=2, max_new_tokens=8, device="cpu"))
    base = evaluate(EvalConfig(run=run_dir, problems=problems, samples_per_problem=2, max_new_tokens=8, device="cpu", base=True))
    assert trained["checkpoint"] == "step_000001" and base["checkpoint"] == "base" and trained["n"] == base["n"] == 4
    assert {"hack_strict", "hack_loose", "gt_pass", "reward"} <= trained.keys()
    sampling = json.loads((run_dir / "config.json").read_text())["sampling"]  # the protocol results.py compares evals by
    assert {k: trained[k] for k in PROTOCOL} == {"grader_version": GRADER_VERSION, "samples_per_problem": 2, "max_new_tokens": 8,
                                                 "temperature": sampling["temperature"], "top_p": sampling["top_p"]}
    rows = (run_dir / "eval" / "problems-step_000001-run_tests-s0" / "grades.jsonl").read_text().splitlines()
    assert len(rows) == 4 and (run_dir / "eval" / "problems-base-run_tests-s0" / "summary.json").exists()
    plain = evaluate(EvalConfig(run=run_dir, problems=problems, samples_per_problem=1, max_new_tokens=8, device="cpu", hint="none"))
    assert plain["hint"] == "none" and (run_dir / "eval" / "problems-step_000001-none-s0" / "summary.json").exists()


def test_curves_draw_what_the_legend_names():
    """Three steps, cin_t never defined, upd defined at one step only (no neighbours)."""
    from projected_grpo.metrics import curves

    keys = ("rollout/reward", "rollout/hack_s", "rollout/gt_s", "rollout/hack_t", "hackward/null_s_mean", "hackward/null_s_p95",
            "hackward/cin_s", "hackward/cin_t", "hackward/upd", "hackward/disp_frac")
    rows = [{"step": s} | {k: 0.1 * s for k in keys} | {"hackward/cin_t": None, "rollout/hack_t": None, "hackward/upd": 0.5 if s == 2 else None}
            for s in (1, 2, 3)]
    fig = curves(rows)
    rollouts, hackward = fig.axes
    for ax in fig.axes:
        assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == sorted([line.get_label() for line in ax.get_lines()] + (
            ["empirical null of cin_s (mean-p95)"] if ax is hackward else []))
    assert [line.get_label() for line in rollouts.get_lines()] == ["reward", "hack_s", "gt_s"]
    assert [line.get_label() for line in hackward.get_lines()] == ["cin_s", "upd", "disp_frac"]
    upd = hackward.get_lines()[1]
    assert upd.get_marker() == "o" and list(upd.get_markevery()) == [1]  # the lone point shows
