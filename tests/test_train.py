"""End to end on tiny-random-qwen3 (CPU): a few steps of both arms through the CLI, the
files and log rows they leave, and resume after a kill equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from train import PRESETS, PoolConfig, build_pool, group_advantages, grpo_token_loss, split_group

ENV = {**os.environ, "BEARTYPE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("train")
    build_pool(PoolConfig(out=work / "pool.jsonl"))
    return work


def train_cmd(work: Path, *flags: str) -> list[str]:
    return [sys.executable, "train.py", "smoke", "--runs-dir", str(work / "runs"), "--cache-dir", str(work / "cache"),
            "--teacher-pool", str(work / "pool.jsonl"), *flags]


def run_train(work: Path, *flags: str) -> Path:
    before = set((work / "runs").glob("*")) if (work / "runs").exists() else set()
    proc = subprocess.run(train_cmd(work, *flags), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = set((work / "runs").glob("*")) - before
    return run_dir


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_both_arms_end_to_end(work):
    vanilla = run_train(work, "--intervention", "vanilla", "--steps", "4", "--checkpoint-every", "2")
    projected = run_train(work, "--intervention", "projected", "--steps", "4", "--checkpoint-every", "2")
    for run_dir, arm in ((vanilla, "vanilla"), (projected, "projected")):
        assert run_dir.name.startswith(f"smoke_{arm}_s0_")
        assert json.loads((run_dir / "config.json").read_text())["intervention"] == arm
        log = rows(run_dir)
        assert [r["step"] for r in log] == [1, 2, 3, 4]
        for key in ("reward", "hack_s", "hack_t", "gt_s", "gt_t", "loss", "grad_norm", "cin_s", "cin_t", "cin", "cout", "null", "cupd", "rollouts_per_s", "seconds"):
            assert all(key in r for r in log), key
        # Teacher hacks are in the groups; the random student never writes code.
        assert all(r["hack_t"] is not None for r in log) and max(r["hack_t"] for r in log) > 0
        assert all(r["gt_s"] == 0 for r in log)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
        assert (run_dir / "summary.json").exists() and (run_dir / "curves.png").stat().st_size > 0
        assert 0 < log[0]["null"] < 1
    live = [r for r in rows(vanilla) if r["cin"] > 0]
    assert live and all(r["cout"] == r["cin"] for r in rows(vanilla))  # vanilla only measures
    live = [r for r in rows(projected) if r["cin"] > 0]
    assert live and all(r["cout"] < 1e-6 for r in live)  # projected removed the hack-ward part
    # Same seed, same first rollouts: the arms diverge only through the projection.
    d_v = load_file(vanilla / "checkpoints" / "step_000004" / "delta_S.safetensors")
    d_p = load_file(projected / "checkpoints" / "step_000004" / "delta_S.safetensors")
    assert any(not torch.equal(d_v[n], d_p[n]) for n in d_v)
    assert any(t.abs().sum() > 0 for t in d_p.values())


def test_resume_after_kill_matches_uninterrupted(work):
    full = run_train(work, "--intervention", "projected")
    # A second run, killed once its step-25 checkpoint exists, then resumed.
    before = set((work / "runs").glob("*"))
    proc = subprocess.Popen(train_cmd(work, "--intervention", "projected"), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            new = set((work / "runs").glob("*")) - before
            if new and (next(iter(new)) / "checkpoints" / "step_000025").exists():
                break
            assert proc.poll() is None, "training exited before its step-25 checkpoint"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    (killed,) = set((work / "runs").glob("*")) - before
    assert not (killed / "checkpoints" / "step_000030").exists()
    resumed = subprocess.run(train_cmd(work, "--intervention", "projected", "--resume", str(killed)), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(full / "checkpoints" / "step_000030" / "delta_S.safetensors")
    b = load_file(killed / "checkpoints" / "step_000030" / "delta_S.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [r["step"] for r in rows(killed)] == list(range(1, 31))
    assert [r["reward"] for r in rows(killed)] == [r["reward"] for r in rows(full)]


def test_resume_with_other_settings_is_refused(work):
    run_dir = run_train(work, "--steps", "2", "--checkpoint-every", "1")
    proc = subprocess.run(train_cmd(work, "--steps", "2", "--lr", "0.5", "--resume", str(run_dir)), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "lr" in proc.stderr


def test_dr_grpo_and_grpo_advantages():
    r = torch.tensor([[3.5, 0.0, 0.5, 0.0]])
    assert torch.allclose(group_advantages(r, "dr_grpo"), r - 1.0)
    assert torch.allclose(group_advantages(r, "grpo"), (r - 1.0) / (r.std() + 1e-6))
    assert torch.equal(group_advantages(torch.full((1, 4), 3.5), "dr_grpo"), torch.zeros(1, 4))


def test_loss_is_policy_gradient_at_ratio_one_and_clips():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[2.0]])
    loss, clipped, kl = grpo_token_loss(logp, logp.detach(), logp.detach(), adv, 0.2, 0.1)
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-2.0, -2.0]]))  # -A d logp, KL gradient 0 at ref = logp
    assert clipped.sum() == 0 and torch.allclose(kl, torch.zeros(1, 2))
    far = torch.tensor([[0.0]], requires_grad=True)
    loss, clipped, _ = grpo_token_loss(far, torch.tensor([[-1.0]]), None, adv, 0.2, 0.0)
    loss.sum().backward()
    assert clipped.item() == 1.0 and far.grad.item() == 0.0  # ratio e > 1.2 with A > 0: clipped, no gradient


def test_presets_resolve():
    assert set(PRESETS) == {"smoke", "fast-dev-run", "smollm2", "fast", "full"}
    smoke = PRESETS["smoke"][1]
    assert (smoke.steps, smoke.group_size, smoke.sampling.max_new_tokens, smoke.n_problems, smoke.prompts_per_step) == (30, 2, 32, 10, 1)
    full = PRESETS["full"][1]
    assert (full.steps, full.prompts_per_step, full.group_size, full.sampling.temperature, full.sampling.top_p, full.kl_beta, full.sampling.max_new_tokens) == (200, 16, 16, 0.7, 0.95, 1e-3, 1536)
    assert split_group(smoke) == (1, 1) and split_group(full) == (16, 0)


def test_pool_from_a_model_is_graded_and_keyed_by_hint(tmp_path):
    from grader import load_problems
    from train import Sampling, load_pool

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


def test_queue_full_dry_run_lists_extraction_then_six_dependent_jobs():
    proc = subprocess.run(["bash", "scripts/queue_full.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "train.py extract full" in lines[0] and " after " not in lines[0]
    jobs = lines[1:]
    assert len(jobs) == 6 and all(" after job1]" in j and "train.py full" in j for j in jobs)
    assert sorted((j.split("--intervention ")[1].split()[0], j.split("--seed ")[1]) for j in jobs) == sorted(
        (arm, seed) for arm in ("vanilla", "projected") for seed in ("1", "2", "3"))


def test_eval_grades_a_checkpoint_and_the_base_model(work, tmp_path):
    from train import EvalConfig, Sampling, evaluate

    run_dir = run_train(work, "--steps", "1")
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join((ROOT / "data" / "problems.jsonl").read_text().splitlines(keepends=True)[:2]))
    sampling = Sampling(max_new_tokens=8, temperature=1.0, top_p=1.0)
    trained = evaluate(EvalConfig(run=run_dir, problems=problems, samples_per_problem=2, sampling=sampling, device="cpu"))
    base = evaluate(EvalConfig(run=run_dir, problems=problems, samples_per_problem=2, sampling=sampling, device="cpu", base=True))
    assert trained["checkpoint"] == "step_000001" and base["checkpoint"] == "base" and trained["n"] == base["n"] == 4
    assert {"hack_strict", "hack_loose", "gt_pass", "reward"} <= trained.keys()
    rows = (run_dir / "eval" / "problems-step_000001-run_tests-s0" / "grades.jsonl").read_text().splitlines()
    assert len(rows) == 4 and (run_dir / "eval" / "problems-base-run_tests-s0" / "summary.json").exists()
    plain = evaluate(EvalConfig(run=run_dir, problems=problems, samples_per_problem=1, sampling=sampling, device="cpu", hint="none"))
    assert plain["hint"] == "none" and (run_dir / "eval" / "problems-step_000001-none-s0" / "summary.json").exists()


@pytest.mark.parametrize("bucket", [0, 64])
def test_sampler_logprobs_match_the_learner(tmp_path, bucket):
    """The PPO ratio is taken against logprobs recorded while sampling (merged weights, KV
    cache, left padding); the learner recomputes them on the adapter path: they must agree."""
    from grader import load_problems, render_prompt
    from models import completion_logprobs, load_model
    from svd_adapter import DEFAULT_TARGETS, merged, wrap_svd
    from train import Rollout, Sampling, collate, generate

    torch.manual_seed(0)
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cpu")
    adapters = wrap_svd(model, DEFAULT_TARGETS, tmp_path / "svd")
    for a in adapters.values():
        torch.nn.init.normal_(a.delta_S, std=0.5)
    problems = load_problems(ROOT / "data" / "problems.jsonl")[:3]  # prompts of different lengths: left padding
    with merged(adapters):
        samples = generate(model, tokenizer, [render_prompt(tokenizer, p, "run_tests") for p in problems],
                           Sampling(max_new_tokens=12, temperature=1.0, top_p=1.0, static_cache_bucket=bucket))
    rollouts = [Rollout(p, pi, ci, text, False, lp) for p, (pi, ci, text, lp) in zip(problems, samples)]
    assert all(len(r.completion_ids) == len(r.old_logprobs) > 0 for r in rollouts)
    ids, attn, mask, old, _ = collate(rollouts, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logp = completion_logprobs(model, ids, attn, mask)
    assert torch.allclose(logp[mask], old[mask], atol=1e-3), (logp[mask] - old[mask]).abs().max()
