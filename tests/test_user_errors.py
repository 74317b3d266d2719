"""A user's bad input ends in one line, `error: <what> (<fix>)`, exit status 2, before a model
loads, an extraction runs or a run folder is made (issue 22)."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

import train
from conftest import ROOT
from projected_grpo.errors import UserError

BAD_FLAGS = [  # (flags after the preset, what the message must name)
    (["--n-problems", "0"], "--n-problems 0"),
    (["--group-size", "1"], "--group-size 1"),
    (["--steps", "0"], "--steps 0"),
    (["--steps", "-1"], "--steps -1"),
    (["--prompts-per-step", "0"], "--prompts-per-step 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0"),
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "0"], "--lr 0"),
    (["--teacher-mix", "1.5"], "--teacher-mix 1.5"),
    (["--sampling.top-p", "0"], "--sampling.top-p 0"),
    (["--sampling.temperature", "0"], "--sampling.temperature 0"),
    (["--problems", "nope.jsonl"], "--problems nope.jsonl does not exist"),
    (["--v-hack.pairs", "nope.jsonl"], "--v-hack.pairs nope.jsonl does not exist"),
    (["--v-hack.problems", "nope.jsonl"], "--v-hack.problems nope.jsonl does not exist"),
    (["--v-hack.k", "0"], "--v-hack.k 0"),
    (["--v-hack.noise-quantile", "1"], "--v-hack.noise-quantile 1.0"),
    (["--v-hack.min-split-half", "1.5"], "--v-hack.min-split-half 1.5"),
    (["--v-hack.temperature", "0"], "--v-hack.temperature 0.0"),
    (["--report-to", "wandb"], "needs the wandb package"),
    (["--targets", "q_proj", "lm_head"], "--targets lm_head: the LM head is never adapted"),
]


@pytest.fixture
def nothing_starts(monkeypatch, tmp_path):
    """Fails the test if a model loads or an extraction runs; returns the runs folder to watch."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model loaded or an extraction ran before the input was checked")

    for name in ("load_model", "resolve_model", "v_hack_for_run", "wrap_svd"):
        monkeypatch.setattr(train, name, forbidden)
    return tmp_path / "runs"


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        train.cli(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("flags", "named"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_before_anything_starts(flags, named, nothing_starts, capsys):
    if flags[:2] == ["--report-to", "wandb"] and train.missing_package("wandb") is None:
        pytest.skip("wandb is installed here")
    err = one_line_error(capsys, ["smoke", "--runs-dir", str(nothing_starts), *flags])
    assert named in err and "(" in err  # what is wrong, then how to fix it
    assert not nothing_starts.exists()  # no run folder


def test_bad_files_are_named_with_their_line(nothing_starts, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text((ROOT / "data" / "problems.jsonl").read_text().splitlines()[0] + "\n{not json\n")
    assert f"{bad}:2" in one_line_error(capsys, ["smoke", "--runs-dir", str(nothing_starts), "--problems", str(bad)])
    pairs = tmp_path / "pairs.jsonl"  # a pair whose problem the --v-hack.problems file lacks
    pairs.write_text(json.dumps({"id": 10**9, "hack_style": "x", "hack": "a", "clean": "b"}) + "\n")
    assert f"{pairs}:1: field 'id'" in one_line_error(capsys, ["smoke", "--runs-dir", str(nothing_starts), "--v-hack.pairs", str(pairs)])
    # eval: a folder that is not a run, and a run whose held-out problems were never downloaded.
    assert "not a run folder" in one_line_error(capsys, ["eval", "--run", str(tmp_path)])
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"eval_problems": str(tmp_path / "leetcode" / "leetcode_test_medhard.jsonl")}))
    assert "just download-data" in one_line_error(capsys, ["eval", "--run", str(run)])
    assert "not a run folder" in one_line_error(capsys, ["resume", str(tmp_path / "nowhere")])


@pytest.mark.parametrize("flags", [["--samples-per-problem", "0"], ["--max-new-tokens", "0"], ["--max-new-tokens", "-1"], ["--grader-workers", "0"]])
def test_bad_eval_count_is_one_line_before_a_model_loads(flags, monkeypatch, capsys, tmp_path):
    from projected_grpo import eval as eval_module

    monkeypatch.setattr(eval_module, "load_run_model", lambda *a, **k: pytest.fail("a model loaded before the flags were checked"))
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"eval_problems": str(ROOT / "data" / "problems.jsonl")}))
    err = one_line_error(capsys, ["eval", "--run", str(run), *flags])
    assert f"{' '.join(flags)}: must be >= 1 (give {flags[0]} a value >= 1)" in err


def test_debug_shows_the_traceback(nothing_starts):
    with pytest.raises(UserError, match="--steps 0"):
        train.cli(["smoke", "--runs-dir", str(nothing_starts), "--steps", "0", "--debug"])


def test_the_command_line_exits_2_without_hanging(tmp_path):
    """--n-problems 0 used to hang after the table header."""
    proc = subprocess.run([sys.executable, "train.py", "smoke", "--runs-dir", str(tmp_path / "runs"), "--n-problems", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --n-problems 0") and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_start_that_fails_before_its_first_step_leaves_no_folder(monkeypatch, tmp_path):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(train, "load_model", out_of_memory)  # after the folder is made, before step 1
    runs = tmp_path / "runs"
    with pytest.raises(RuntimeError, match="out of memory"):
        train.main(replace(train.PRESETS["smoke"][1], runs_dir=runs))
    assert runs.is_dir() and list(runs.iterdir()) == []


def test_a_truncated_or_foreign_delta_file_is_named(tmp_path):
    import torch
    from safetensors.torch import save_file

    from projected_grpo.svd_adapter import load_delta

    path = tmp_path / "delta_S.safetensors"
    save_file({"model.layers.0.mlp.up_proj": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="other modules than this model's adapters"):
        load_delta({}, path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(UserError, match=f"{path} is unreadable"):
        load_delta({}, path)


def test_build_pool_names_a_missing_or_malformed_file(tmp_path, capsys):
    problems, source = ROOT / "data" / "problems.jsonl", tmp_path / "written.jsonl"
    source.write_text('{"id": 1, "completion": "x"}\n{oops\n')
    build = lambda *flags: one_line_error(capsys, ["build-pool", "--out", str(tmp_path / "pool.jsonl"), *flags])
    assert "--problems nope.jsonl does not exist" in build("--problems", "nope.jsonl", "--source", str(source))
    assert "--source nope.jsonl does not exist" in build("--problems", str(problems), "--source", "nope.jsonl")
    assert f"{source}:2: invalid JSON" in build("--problems", str(problems), "--source", str(source))
    assert not (tmp_path / "pool.jsonl").exists()


def test_a_bad_teacher_pool_or_source_row_is_one_line(tmp_path, capsys):
    from projected_grpo.teacher_pool import load_pool

    source = tmp_path / "written.jsonl"
    source.write_text('{"id": 900001, "completion": "x"}\n{"id": 42, "completion": "y"}\n')
    err = one_line_error(capsys, ["build-pool", "--source", str(source), "--problems", str(ROOT / "data" / "problems.jsonl"), "--out", str(tmp_path / "pool.jsonl")])
    assert f"{source}:2: needs an 'id' from" in err and not (tmp_path / "pool.jsonl").exists()
    pool = tmp_path / "broken.jsonl"
    pool.write_text('{"id": 1, "hint": "aware", "completion": "x"}\nnot json\n')
    with pytest.raises(UserError, match=rf"{pool}:2: invalid JSON.*just build-pool --hint aware"):
        load_pool(pool, "aware")
    with pytest.raises(UserError, match=r"does not exist \(rebuild it with `just build-pool --hint aware`, or pass --teacher-mix 0\)"):
        load_pool(tmp_path / "absent.jsonl", "aware")
