"""One run over several processes (CPU, gloo): the ranks' all-reduced gradients equal the
one-process gradient of the same rollouts, and `torchrun --nproc-per-node 2 train.py smoke`
writes one run folder of whole-batch rows and checkpoints, and a plain `python train.py` resumes it."""

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import ROOT
from projected_grpo import distributed
from grader import load_problems, render_prompt
from projected_grpo.models import load_model
from projected_grpo.rollout import RolloutEngine, Sampling
from projected_grpo.metrics import table_header
from projected_grpo.paths import DATA
from projected_grpo.svd_adapter import DEFAULT_TARGETS, delta_grads, wrap_svd
from projected_grpo.teacher_pool import PoolConfig, build_pool
from train import PRESETS, Rollout, backward_parts, learner_checkpointing

ENV = {**os.environ, "BEARTYPE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
CFG = replace(PRESETS["smoke"][1], kl_beta=0.1, learner_tokens=600)  # KL on (delta_S != 0 below), packed micro-batches that straddle groups
GROUPS, N_STUDENT = 4, 2  # per group: 2 student rollouts + 1 teacher rollout
HACK = "```python\nclass Solution:\n    def run_tests(self):\n        pass\n```"  # 16 tokens: own run_tests passes, the real tests fail


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


def tiny(cache: Path):
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cpu")
    adapters = wrap_svd(model, DEFAULT_TARGETS, cache / "svd")
    gen = torch.Generator().manual_seed(1)
    for a in adapters.values():  # away from 0, so that the policy and the KL reference differ
        a.delta_S.data = 0.05 * torch.randn(a.rank, generator=gen)
    return model, tokenizer, adapters


def fixed_rollouts(model, tokenizer) -> list[list[Rollout]]:
    """GROUPS groups of sampled students (their sampler log-probs recorded) and one teacher text
    each, with fixed advantages of both signs."""
    problems = load_problems(DATA / "problems_rl.jsonl")[:GROUPS]
    torch.manual_seed(0)
    samples = RolloutEngine(model, tokenizer).generate([render_prompt(tokenizer, p, "run_tests") for p in problems], Sampling(max_new_tokens=6, temperature=1.0, top_p=1.0), n=N_STUDENT)
    teacher_ids = tokenizer(HACK, add_special_tokens=False)["input_ids"]
    groups = []
    for gi, p in enumerate(problems):
        group = [Rollout(p, c.prompt_ids, c.completion_ids, c.text, False, c.logprobs, c.truncated) for c in samples[gi * N_STUDENT : (gi + 1) * N_STUDENT]]
        group.append(Rollout(p, group[0].prompt_ids, teacher_ids[: 5 + gi], HACK, True, None, True))
        for j, r in enumerate(group):
            r.advantage = (-1.0) ** (gi + j) * (0.5 + 0.25 * j)
        groups.append(group)
    return groups


def gradients(model, adapters, groups: list[list[Rollout]], denominator: float) -> tuple[dict, dict]:
    """g_s and g of these groups, as train.learn takes them: student part, then teacher part."""
    for a in adapters.values():
        a.delta_S.grad = None
    g_s, _ = backward_parts(model, adapters, [r for g in groups for r in g], CFG, denominator, learner_checkpointing(model, adapters, CFG))
    return g_s, {n: g.clone() for n, g in delta_grads(adapters).items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_worker(rank: int, port: int, cache: Path, groups: list[list[Rollout]], denominator: float, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.init("cpu")
    try:
        assert (distributed.rank(), distributed.world_size(), distributed.local_world_size()) == (rank, 2, 2)
        assert distributed.gather_objects(rank * 10) == [0, 10] and distributed.broadcast_object(f"rank {rank}") == "rank 0"
        with pytest.raises(ValueError, match=r"--prompts-per-step 3 is not divisible by the world size 2.*pass --prompts-per-step 4"):
            distributed.share(3, "--prompts-per-step")
        model, _, adapters = tiny(cache)
        g_s, g = gradients(model, adapters, groups[distributed.share(len(groups), "groups")], denominator)
        g_s, g = distributed.all_reduce_sum(g_s, g)
        torch.save({"g_s": g_s, "g": g}, out / f"rank{rank}.pt")
    finally:
        distributed.teardown()


def test_two_ranks_all_reduced_gradients_equal_the_one_process_gradients(work):
    model, tokenizer, adapters = tiny(work / "cache")
    groups = fixed_rollouts(model, tokenizer)
    denominator = float(sum(len(g) for g in groups) * CFG.sampling.max_new_tokens)  # the whole batch's, on every rank
    g_s, g = gradients(model, adapters, groups, denominator)
    assert all(x.abs().sum() > 0 for x in (*g_s.values(), *g.values()))  # every module has a student and a teacher part
    mp.spawn(rank_worker, args=(free_port(), work / "cache", groups, denominator, work), nprocs=2)
    ranks = [torch.load(work / f"rank{r}.pt") for r in range(2)]
    for name in g:
        assert torch.equal(ranks[0]["g_s"][name], ranks[1]["g_s"][name]) and torch.equal(ranks[0]["g"][name], ranks[1]["g"][name])  # the same bits everywhere
        torch.testing.assert_close(ranks[0]["g_s"][name], g_s[name], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ranks[0]["g"][name] - ranks[0]["g_s"][name], g[name] - g_s[name], rtol=1e-4, atol=1e-7)  # g_t


# ----------------------------------------------------------------------------
# torchrun end to end


@pytest.fixture(scope="module")
def smoke_flags(work) -> list[str]:
    """Short teacher texts (a 16-token hack and a dud per problem) so that 24-token rollouts keep
    groups with reward variance; 4 extraction pairs, re-extracted after step 2 (by rank 0, sent to the others)."""
    source = work / "teacher.jsonl"
    source.write_text("".join(json.dumps({"id": p.id, "completion": c}) + "\n" for p in load_problems(DATA / "problems_rl.jsonl")[:10] for c in (HACK, "No idea.")))
    build_pool(PoolConfig(source=str(source), out=work / "pool.jsonl"))
    (work / "pairs.jsonl").write_text("".join((ROOT / "data" / "pairs.jsonl").read_text().splitlines(keepends=True)[:4]))
    return ["smoke", "--runs-dir", str(work / "runs"), "--cache-dir", str(work / "cache"), "--teacher-pool", str(work / "pool.jsonl"),
            "--v-hack.pairs", str(work / "pairs.jsonl"), "--sampling.max-new-tokens", "24", "--prompts-per-step", "2", "--steps", "4", "--checkpoint-every", "2", "--v-hack-refresh", "2"]


def launch(world: int, flags: list[str]) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)] if world > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "train.py", *flags], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def final_delta(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "step_000004" / "delta_S.safetensors")


def test_torchrun_smoke_run_logs_the_whole_batch_and_resumes_at_world_sizes_one_and_two(work, smoke_flags):
    proc = launch(2, smoke_flags)
    (run_dir,) = (work / "runs").iterdir()  # rank 0 alone made a folder
    assert proc.stdout.count(table_header()) == 1 and proc.stderr.count("run folder") == 1  # rank 1 printed nothing
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    rows = log_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["dist/world_size"] == 2 and len(r["time/gen_ranks"]) == len(r["time/learn_ranks"]) == 2
        assert r["memory/peak_gib_ranks"] == [None, None] and r["time/allreduce"] >= 0 and r["time/gen"] == max(r["time/gen_ranks"])
        assert r["time/rollouts_per_s"] * r["time/step"] == pytest.approx(2)  # both ranks' students: 2 prompts x 1
        assert r["rollout/hack_t"] in (0, 0.5, 1) and r["rollout/skipped_groups"] in (0, 0.5, 1)  # two teachers, two groups
    assert any(r["rollout/hack_t"] == 0.5 for r in rows) and any(r["hackward/cin_t"] is not None for r in rows)
    assert [r["vhack/refreshed"] for r in rows] == [False, True, False, False] and rows[1]["vhack/subspace_cos"] is not None
    two_ranks = final_delta(run_dir)
    assert any(t.abs().sum() > 0 for t in two_ranks.values())

    # As if killed after the step-2 checkpoint, resumed at world size 1 by a plain `python train.py`:
    # the same prompts and teacher picks, another sampling stream.
    shutil.rmtree(run_dir / "checkpoints" / "step_000004")
    launch(1, [*smoke_flags, "--resume", str(run_dir)])
    resumed = log_rows(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and [r["dist/world_size"] for r in resumed] == [2, 2, 1, 1]
    assert resumed[:2] == rows[:2] and final_delta(run_dir).keys() == two_ranks.keys()
    assert [(r["rollout/hack_t"], r["rollout/gt_t"]) for r in resumed[2:]] == [(r["rollout/hack_t"], r["rollout/gt_t"]) for r in rows[2:]]
    assert all(r["time/rollouts_per_s"] * r["time/step"] == pytest.approx(2) for r in resumed)
    assert (run_dir / "summary.json").exists() and len(list((work / "runs").iterdir())) == 1

    # Resumed at world size 2 instead: every rank's stream is seeded by seed, rank and step, so
    # steps 3 and 4 are the uninterrupted run's, to the last bit of delta_S.
    shutil.rmtree(run_dir / "checkpoints" / "step_000004")
    launch(2, [*smoke_flags, "--resume", str(run_dir)])
    untimed = lambda rs: [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/"))} for r in rs]  # noqa: E731
    assert untimed(log_rows(run_dir)) == untimed(rows)
    again = final_delta(run_dir)
    assert all(torch.equal(again[n], two_ranks[n]) for n in two_ranks)


def test_torchrun_one_step_off_samples_ahead_on_every_rank_and_resumes_its_prompts(tmp_path, smoke_flags):
    """--one-step-off over two ranks: each samples its share of the next step on a background
    thread while the step's collectives run; resumed from the step-2 checkpoint (taken while step
    3 was being sampled ahead), steps 3 and 4 take the uninterrupted run's prompts and teacher
    picks (sampled on time now, from other weights: the students' numbers may differ)."""
    flags = [*smoke_flags, "--one-step-off", "--runs-dir", str(tmp_path / "runs")]
    proc = launch(2, flags)
    (run_dir,) = (tmp_path / "runs").iterdir()
    header = table_header(off_policy=True)
    assert proc.stdout.count(header) == 1 and header.endswith("is_w is_cap")
    rows = log_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["dist/world_size"] == 2 for r in rows)
    shutil.rmtree(run_dir / "checkpoints" / "step_000004")
    launch(2, [*flags, "--resume", str(run_dir)])
    resumed = log_rows(run_dir)
    assert resumed[:2] == rows[:2]
    teachers = lambda rs: [(r["rollout/hack_t"], r["rollout/gt_t"], r["rollout/rollouts"]) for r in rs]  # noqa: E731
    assert teachers(resumed) == teachers(rows)
