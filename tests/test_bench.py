"""The step benchmark runs end to end on CPU (as `just bench` does in CI) and its report is
self-consistent: ratios and fractions are recomputed from the numbers they divide. No timing
is asserted (timings live in the benchmark's output, never in tests)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_step
from projected_grpo.errors import UserError
from projected_grpo.models import load_model
from projected_grpo.paths import REPO_ROOT
from projected_grpo.rollout import KV_WINDOW, RolloutEngine
from projected_grpo.svd_adapter import DEFAULT_TARGETS


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "benchmarks/bench_step.py", "--batches", "2", "4", "--new-tokens", "8", "--pairs", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()) | {"stdout": proc.stdout}


def test_decode_rows_are_consistent(bench: dict):
    assert [r["batch"] for r in bench["decode"]] == [2, 4]
    for r in bench["decode"]:
        assert r["generate_tok_s"] > 0 and r["engine_tok_s"] > 0 and r["bound_tok_s"] > 0
        assert math.isclose(r["ratio"], r["engine_tok_s"] / r["generate_tok_s"], rel_tol=1e-9)
        assert math.isclose(r["fraction_of_bound"], r["engine_tok_s"] / r["bound_tok_s"], rel_tol=1e-9)
        assert r["last_call_s"]["prefill"] > 0 and r["last_call_s"]["decode"] > 0  # what a call spends besides decode steps, and on them
    assert bench["bandwidth_gbs"] > 0 and "B=4's last call: prefill" in bench["stdout"]
    # The bound is B / ((weights + mean KV) / bandwidth): doubling B less than doubles it.
    b2, b4 = bench["decode"]
    assert b2["bound_tok_s"] < b4["bound_tok_s"] < 2 * b2["bound_tok_s"]
    fused = bench["decode_fused"]  # the engine's fused projections against one matmul per projection, at the largest batch
    assert fused["batch"] == 4 and fused["fused_tok_s"] > 0 and fused["unfused_tok_s"] > 0
    assert math.isclose(fused["ratio"], fused["fused_tok_s"] / fused["unfused_tok_s"], rel_tol=1e-9) and "decode B=4 fused vs unfused" in bench["stdout"]
    attention = bench["decode_attention"]  # flex (each slot's own KV blocks) against SDPA (the whole window), ragged prompts
    assert attention["batch"] == 4 and attention["flex_tok_s"] > 0 and attention["sdpa_tok_s"] > 0
    assert math.isclose(attention["ratio"], attention["flex_tok_s"] / attention["sdpa_tok_s"], rel_tol=1e-9)
    assert "decode B=4 flex (live KV blocks) vs sdpa (whole window)" in bench["stdout"]


def test_profile_accounts_for_its_kernels(bench: dict):
    prof = bench["decode_profile"]
    assert prof["batch"] == 4
    assert math.isclose(sum(prof["by_kind_ms"].values()), prof["kernel_ms"], rel_tol=1e-9)
    assert prof["by_kind_ms"]["matmul"] > 0 and prof["by_kind_ms"]["attention"] > 0
    assert math.isclose(prof["engine_step_ms"], 1e3 * 4 / bench["decode"][-1]["engine_tok_s"], rel_tol=1e-9)


def test_a_profiler_that_records_nothing_gives_no_profile_not_zeros(monkeypatch, capsys):
    """Where the profiler records no events (CUPTI did not initialize on an H100 image), the
    profile says so and holds no numbers, where it printed 0.00 ms of kernels before."""
    import torch.profiler

    class Empty:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return []

    monkeypatch.setattr(torch.profiler, "profile", lambda **kwargs: Empty())
    model, tokenizer, _ = load_model("tiny-random-qwen3", "cpu")
    prof = bench_step.decode_profile(RolloutEngine(model, tokenizer), 2, KV_WINDOW, bench_step.SAMPLING, 1.0)
    assert prof["kernel_ms"] is None and "by_kind_ms" not in prof and prof["error"] == "the profiler recorded no events"
    assert "the profiler recorded no ops here; no profile" in capsys.readouterr().out


def test_step_and_the_rest_are_reported(bench: dict):
    step = bench["step"]
    assert set(step["seconds"]) == {"gen", "grade", "learn", "allreduce", "arm", "update", "refresh"}  # train.step's phases
    assert math.isclose(step["step_s"], sum(step["seconds"].values()), rel_tol=1e-9)
    assert step["rollouts"] > 0 and 0 <= step["truncated"] <= 1 and step["first_generation_s"] > 0
    call = step["generation_call"]  # the steady step's generate call: its students, through the preset's KV slots
    assert call["sequences"] == round(step["rollouts"] * (1 - step["teacher_mix"])) and 0 < call["mean_live"] <= call["slots"]
    assert math.isclose(call["mean_live"], call["live_slot_steps"] / call["decode_steps"], rel_tol=1e-9) and "slots live on average" in bench["stdout"]
    assert sum(s[2] for s in call["shapes"]) == call["decode_steps"] and "the step's generation: prefill" in bench["stdout"]
    assert step["first_generation_call"]["sequences"] == call["sequences"] and "the first step's generation: prefill" in bench["stdout"]
    wide = bench["generation_slots"]  # the step's generation again, a slot for every student
    assert wide["wide_slots"] == wide["wide_call"]["sequences"] == call["sequences"] and wide["slots"] == call["slots"]
    assert math.isclose(wide["ratio"], wide["wide_tok_s"] / wide["tok_s"], rel_tol=1e-9) and f"{wide['wide_slots']} slots vs the step's" in bench["stdout"]
    flex = bench["generation_flex"]  # the step's generation again, flex attention: matched shape by shape
    assert flex["flex_call"]["sequences"] == call["sequences"] and 0 < flex["matched_steps"] <= call["decode_steps"]
    assert math.isclose(flex["ratio"], flex["matched_sdpa_s"] / flex["matched_flex_s"], rel_tol=1e-9) and "flex vs sdpa on the" in bench["stdout"]
    learner = bench["learner"]  # the padded adapter path (the baseline) and the packed, merged learner, same rollouts
    assert learner["padded_tok_s"] > 0 and math.isclose(learner["ratio"], learner["packed_tok_s"] / learner["padded_tok_s"], rel_tol=1e-9)
    assert learner["max_rel_grad_diff"] < 1e-4 and bench["extraction_s_per_pair"] > 0  # fp32 on CPU: the two learners agree
    assert 0 <= learner["noise_rel_grad_diff"] < 1e-4 and "padded against itself in micro-batches of 4" in bench["stdout"]  # fp32: the floor is rounding too
    # Its yardstick for cutting micro-batches to recompute nothing: the preset's cap kept (on the CPU's memory the two are one plan).
    assert math.isclose(learner["ratio_recomputing"], learner["packed_tok_s"] / learner["recomputing_tok_s"], rel_tol=1e-9)
    assert learner["recomputing_checkpointed_layers"] == learner["packed_checkpointed_layers"] and learner["recomputing_rel_grad_diff"] < 1e-4
    assert math.isclose(learner["ratio_compiled"], learner["packed_tok_s"] / learner["eager_tok_s"], rel_tol=1e-9)
    assert learner["compiled_rel_grad_diff"] < 1e-4 and "its decoder layers compiled (not on CPU, as a run there)" in bench["stdout"]
    # Its yardstick for the reference pass: the same passes with kl_beta 0, which skips it.
    assert math.isclose(learner["reference_share"], 1 - learner["packed_tok_s"] / learner["no_reference_tok_s"], rel_tol=1e-9)
    assert learner["no_reference_tok_s"] > 0 and "without the reference pass (kl_beta 0)" in bench["stdout"]
    prof = learner["profile"]  # one packed pass profiled: its ops by kind (CPU) and its matmuls' rate against one large matmul's
    assert math.isclose(sum(prof["by_kind_ms"].values()), prof["kernel_ms"], rel_tol=1e-9) and prof["by_kind_ms"]["matmul"] > 0
    assert prof["matmul_tflop"] > 0 and math.isclose(prof["matmul_tflops"], prof["matmul_tflop"] / (prof["by_kind_ms"]["matmul"] / 1e3), rel_tol=1e-9)
    assert prof["best_matmul_tflops"] > 0 and math.isclose(prof["wall_ms"], 1e3 * learner["tokens"] / learner["packed_tok_s"], rel_tol=1e-9)
    assert "its matmuls:" in bench["stdout"] and "TFLOP/s of one large matmul here" in bench["stdout"]
    assert "cut to recompute nothing" in bench["stdout"]
    wrap = bench["svd_wrap"]  # cold in stacks (the default) beside cold with one SVD per weight (the yardstick), then warm
    assert wrap["modules"] > 0 and wrap["cold_s"] > 0 and wrap["cold_per_weight_s"] > 0 and wrap["warm_s"] > 0
    assert "one SVD per weight" in bench["stdout"]
    # Its parts: the keys and the SVDs timed alone; the cache holds each weight's thin U, Vh (its dtype) and S (fp32), plus headers.
    model, _, _ = load_model("tiny-random-qwen3", "cpu")
    weights = [m.weight for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in DEFAULT_TARGETS]
    held = sum(min(W.shape) * (sum(W.shape) * W.element_size() + 4) for W in weights) / 2**30
    assert wrap["keys_s"] > 0 and wrap["svds_s"] > 0 and held <= wrap["cache_gib"] < 1.01 * held + 1e-4
    assert "its cold wrap's parts: cache keys" in bench["stdout"]
    assert "wrote" in bench["stdout"] and "decode step at B=4" in bench["stdout"]
    # Issue 21's targets: every part that ran has its row (the peak memory needs CUDA), none judged off CUDA.
    rows = {r["row"]: r for r in bench["targets"]}
    assert set(rows) == {"step, steady (s)", "first step - steady (s)", "learner tok/s, reference included",
                         "decode at the largest batch, fraction of bound", "SVD wrap, cold (s)", "SVD wrap, warm (s)"}
    assert all(r["met"] is None for r in rows.values()) and "issue 21's targets" in bench["stdout"]
    assert step["held_before_gib"] is None  # CUDA only: what the parts before the step left allocated
    assert rows["step, steady (s)"]["value"] == step["step_s"] and rows["first step - steady (s)"]["value"] == step["first_step_s"] - step["step_s"]
    assert "graphs made: first step 0.0 s, steady 0.0 s" in rows["first step - steady (s)"]["yardstick"]  # none on CPU
    assert rows["learner tok/s, reference included"]["value"] == learner["packed_tok_s"]
    assert rows["SVD wrap, cold (s)"]["yardstick"].endswith(f"one SVD per weight {wrap['cold_per_weight_s']:.1f} s")


def test_a_bench_cut_short_keeps_the_parts_it_measured(tmp_path: Path, monkeypatch):
    """A part that fails (here the step, the last) still leaves bench.json, with every part
    measured before it and no "targets" (those come only at the end), and the error is raised."""
    monkeypatch.setattr(bench_step, "pick_device", lambda device: "cpu")

    def failing_step(*args, **kwargs):
        raise RuntimeError("the step's part failed")

    monkeypatch.setattr(bench_step, "realistic_step", failing_step)
    with pytest.raises(RuntimeError, match="the step's part failed"):
        bench_step.main(bench_step.Args(batches=(2,), new_tokens=4, learner_rollouts=2, pairs=1, out=tmp_path))
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["batch"] for r in report["decode"]] == [2] and report["learner"]["packed_tok_s"] > 0 and report["svd_wrap"]["modules"] > 0
    assert report["extraction_s_per_pair"] > 0 and "step" not in report and "targets" not in report


def test_a_stop_while_the_bench_cleans_up_still_leaves_its_report(tmp_path: Path, monkeypatch):
    """`timeout`'s SIGTERM (main's handler: SystemExit 143) arriving while the scratch folder is
    removed, after every part: the report is written already."""
    monkeypatch.setattr(bench_step, "pick_device", lambda device: "cpu")
    monkeypatch.setattr(bench_step, "measure", lambda args, device, preset, work, report: report.update(learner={"packed_tok_s": 1.0}, targets=[]))

    remove, left = bench_step.shutil.rmtree, []

    def stopped(path, **kwargs):
        left.append(path)
        raise SystemExit(143)

    monkeypatch.setattr(bench_step.shutil, "rmtree", stopped)
    with pytest.raises(SystemExit):
        bench_step.main(bench_step.Args(out=tmp_path))
    remove(left[0])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["learner"] == {"packed_tok_s": 1.0} and report["targets"] == []


def test_a_resumed_bench_measures_only_what_is_missing(bench: dict, tmp_path: Path, monkeypatch):
    """--resume keeps the parts an earlier run under the same header measured and measures the
    rest; the target table comes from the union."""
    monkeypatch.setattr(bench_step, "pick_device", lambda device: "cpu")
    args = bench_step.Args(batches=(2, 4), new_tokens=8, pairs=1, out=tmp_path, resume=True)
    # a run whose step had no teacher rollouts (dead groups: measured again), or was cut short before it
    earlier = {k: v for k, v in bench.items() if k not in ("stdout", "targets")} | {"step": {k: v for k, v in bench["step"].items() if k != "teacher_mix"}}
    (tmp_path / "bench.json").write_text(json.dumps(earlier))
    calls = []

    def model_parts(*a):
        raise AssertionError("the model's parts were measured already")

    monkeypatch.setattr(bench_step, "model_parts", model_parts)
    monkeypatch.setattr(bench_step, "realistic_step", lambda preset, *a: calls.append(preset) or a[-1].update(step=bench["step"]))
    report = bench_step.main(args)
    assert calls == ["smoke"] and report["step"] == bench["step"] and report["learner"] == bench["learner"]
    assert "generation_flex" not in report and "generation_slots" not in report  # the earlier run's went with its step
    assert bench["step"]["teacher_mix"] == 0.5 and bench["step"]["live_groups"] > 0  # smoke's own mix: live groups on tiny-random-qwen3
    assert report["targets"] == bench["targets"]  # every row, as the run that measured all of it in one go
    assert json.loads((tmp_path / "bench.json").read_text())["targets"] == bench["targets"]

    # a model's part missing: model_parts runs with the others kept; the step kept
    earlier = {k: v for k, v in bench.items() if k not in ("stdout", "targets", "learner")}
    (tmp_path / "bench.json").write_text(json.dumps(earlier))

    def model_parts(h, device, work, report):
        assert all(report[k] == bench[k] for k in bench_step.MODEL_PARTS if k != "learner")
        calls.append("model")
        report["learner"] = bench["learner"]

    monkeypatch.setattr(bench_step, "model_parts", model_parts)
    monkeypatch.setattr(bench_step, "realistic_step", lambda *a: pytest.fail("the step was measured already"))
    report = bench_step.main(args)
    assert calls == ["smoke", "model"] and report["step"] == bench["step"] and report["targets"] == bench["targets"]
    assert report["generation_flex"] == bench["generation_flex"] and report["generation_slots"] == bench["generation_slots"]  # kept with its step

    # older code's learner row, without the eager yardstick: its target row kept, the yardstick said to be missing
    older = {k: v for k, v in bench.items() if k not in ("stdout", "targets")} | {"learner": {k: v for k, v in bench["learner"].items() if k != "eager_tok_s"}}
    (tmp_path / "bench.json").write_text(json.dumps(older))
    row = next(r for r in bench_step.main(args)["targets"] if r["row"] == "learner tok/s, reference included")
    assert row["value"] == bench["learner"]["packed_tok_s"] and row["yardstick"] == "(its yardstick is not in this report)"


def test_a_resumed_bench_measures_the_model_parts_it_lacks_and_no_other(bench: dict, tmp_path: Path, monkeypatch):
    """A call cut short after the decode rows (2026-12-07: device calls too short for every part):
    the next measures extraction and the learner on a fresh wrap and nothing else; the decode
    rows cut short after the bandwidth are measured again with it."""
    monkeypatch.setattr(bench_step, "pick_device", lambda device: "cpu")
    args = bench_step.Args(batches=(2, 4), new_tokens=8, pairs=1, step_preset="", out=tmp_path, resume=True)
    unmeasured = ("stdout", "targets", "learner", "extraction_s_per_pair", "step", *bench_step.STEP_VARIANTS)
    (tmp_path / "bench.json").write_text(json.dumps({k: v for k, v in bench.items() if k not in unmeasured}))
    for name in ("bandwidth", "plain_generate_tok_s", "svd_wrap_times", "decode_rows"):
        monkeypatch.setattr(bench_step, name, lambda *a, name=name: pytest.fail(f"{name} ran, where its part was kept"))
    report = bench_step.main(args)
    assert report["learner"]["packed_tok_s"] > 0 and report["extraction_s_per_pair"] > 0
    assert all(report[k] == bench[k] for k in ("svd_wrap", *bench_step.DECODE_PARTS))

    decode = [k for k in bench_step.DECODE_PARTS if k != "bandwidth_gbs"]
    (tmp_path / "bench.json").write_text(json.dumps({k: v for k, v in report.items() if k not in (*decode, "targets")}))
    monkeypatch.setattr(bench_step, "bandwidth", lambda device: 1e12)
    monkeypatch.setattr(bench_step, "plain_generate_tok_s", lambda *a: {})
    monkeypatch.setattr(bench_step, "decode_rows", lambda *a: {k: bench[k] for k in decode})
    report = bench_step.main(args)
    assert report["bandwidth_gbs"] == 1e3 and all(report[k] == bench[k] for k in decode) and report["learner"]["packed_tok_s"] > 0


def test_no_model_parts_times_the_step_alone(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(bench_step, "pick_device", lambda device: "cpu")
    monkeypatch.setattr(bench_step, "model_parts", lambda *a: pytest.fail("--no-model-parts measured the model's parts"))
    monkeypatch.setattr(bench_step, "realistic_step", lambda preset, *a: a[-1].update(step={"preset": preset}))
    report = bench_step.main(bench_step.Args(model_parts=False, out=tmp_path))
    assert report["step"] == {"preset": "smoke"} and not any(k in report for k in bench_step.MODEL_PARTS)


def test_a_resume_under_another_header_is_refused_and_keeps_the_file(bench: dict, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(bench_step, "pick_device", lambda device: "cpu")
    written = json.dumps({k: v for k, v in bench.items() if k != "stdout"})
    (tmp_path / "bench.json").write_text(written)
    with pytest.raises(UserError, match=r"--resume: .*bench.json was measured with another new_tokens \(new_tokens=8\) \(give --out a new folder"):
        bench_step.main(bench_step.Args(batches=(2, 4), new_tokens=16, pairs=1, out=tmp_path, resume=True))
    assert (tmp_path / "bench.json").read_text() == written


def test_an_unknown_step_preset_is_refused_before_anything_runs(tmp_path: Path):
    with pytest.raises(UserError, match=r"--step-preset nosuch is not a preset \(give one of smoke, .*or '' to skip the step\)"):
        bench_step.main(bench_step.Args(step_preset="nosuch", out=tmp_path))
    assert not (tmp_path / "bench.json").exists()


def test_scaling_bench_reads_what_train_logs(tmp_path: Path):
    """bench_scaling.py on CPU at N=1 (torchrun, gloo): its table comes from the keys train.py logs."""
    out = tmp_path / "scaling"
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    extra = f"--prompts-per-step 1 --sampling.max-new-tokens 16 --cache-dir {tmp_path / 'cache'}"
    cmd = [sys.executable, "benchmarks/bench_scaling.py", "--nprocs", "1", "--preset", "smoke", "--model", "tiny-random-qwen3", "--steps", "2", f"--extra={extra}", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads((out / "scaling.json").read_text()).values()
    assert r["n"] == 1 and r["efficiency"] == 1.0 and r["world_size_logged"] == [1] and r["steps_timed"] == 1
    assert r["rollouts_per_step"] == [2]  # smoke: 1 prompt x (1 student + 1 teacher)
    assert len(r["gen_s_ranks"]) == len(r["learn_s_ranks"]) == 1 and r["step_s"] >= r["gen_s_ranks"][0] > 0
    assert r["cin_s"] is None or 0.0 <= r["cin_s"] <= 1.0
    assert "efficiency" in proc.stdout


def test_off_policy_bench_compares_the_two_arms(tmp_path: Path):
    """bench_off_policy.py on CPU (smoke, 3 steps per arm): the same steps on-policy and one-step-off,
    the speed-up recomputed from the steps it names (not the first, not the last), the importance
    weights only where they exist, each side's waits for its turn through the model (a sampler's
    only where there is one); fewer steps are refused in one line."""
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    refused = subprocess.run([sys.executable, "benchmarks/bench_off_policy.py", "--steps", "2"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--steps 2 leaves no steady step" in refused.stderr and "Traceback" not in refused.stderr
    cmd = [sys.executable, "benchmarks/bench_off_policy.py", "--steps", "3", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "off_policy.json").read_text())
    arms = report["arms"]
    assert list(arms) == ["on_policy", "one_step_off"] and all([r["step"] for r in rows] == [1, 2, 3] for rows in arms.values())
    steady = {name: rows[1]["step_s"] for name, rows in arms.items()}
    assert report["steady_step_s"] == steady and math.isclose(report["speedup"], steady["on_policy"] / steady["one_step_off"], rel_tol=1e-9)
    assert all(r["loss/is_ratio_mean"] is None and r["loss/is_clipped"] is None for r in arms["on_policy"])
    weights = [r["loss/is_ratio_mean"] for r in arms["one_step_off"] if r["loss/is_ratio_mean"] is not None]
    assert all(0 < w <= 2 for w in weights) and "steady step (steps 2..2)" in proc.stdout
    assert all(r["learner_wait_s"] >= 0 and r["sampler_wait_s"] >= 0 for rows in arms.values() for r in rows)
    assert all(r["sampler_wait_s"] == 0 for r in arms["on_policy"])  # no sampler thread to wait
