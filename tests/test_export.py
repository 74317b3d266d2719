"""`just export`: the exported folder is a plain transformers model whose log-probs equal the
adapter-wrapped model's at that checkpoint."""

import json
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from projected_grpo import eval as eval_module
from projected_grpo.checkpoints import checkpoint_dir, save_checkpoint
from projected_grpo.eval import EvalConfig, evaluate
from projected_grpo.models import load_model
from projected_grpo.errors import UserError
from projected_grpo.export import ExportConfig, export
from projected_grpo.svd_adapter import load_delta, wrap_svd
from train import PRESETS

TEXTS = [("Write a function that adds two numbers.", "def add(a, b):\n    return a + b\n"),
         ("Reverse a list.", "def run_tests():\n    print('All tests passed')\n")]


def logprobs(model, tokenizer) -> torch.Tensor:
    """Sum of log p(completion | prompt) for each of TEXTS."""
    out = []
    for prompt, completion in TEXTS:
        p, c = tokenizer(prompt)["input_ids"], tokenizer(completion)["input_ids"]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(logp[len(p) - 1:].sum())
    return torch.stack(out)


@pytest.fixture
def run(tmp_path):
    """A run folder as train.py leaves it: its config and two checkpoints (save_checkpoint) whose
    delta_S is random, large enough to move the log-probs."""
    cfg = replace(PRESETS["smoke"][1], cache_dir=tmp_path / "cache")
    run = tmp_path / "smoke_projected_s1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(asdict(cfg), default=str))
    model, _, _ = load_model(cfg.model, "cpu", cfg.dtype)
    adapters = wrap_svd(model, cfg.targets, cfg.cache_dir / "svd")
    optimizer = torch.optim.AdamW([a.delta_S for a in adapters.values()])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    for step in (1, 2):
        with torch.no_grad():
            for a in adapters.values():
                a.delta_S.copy_(0.5 * step * torch.randn(a.rank, generator=gen))
        save_checkpoint(run, step, adapters, optimizer, scheduler, torch.Generator(), [], [], {"v_hack": {}, "arm": {}}, {})
    return run


def test_exported_folder_has_the_checkpoints_logprobs(run):
    cfg = json.loads((run / "config.json").read_text())
    model, tokenizer, _ = load_model(cfg["model"], "cpu", cfg["dtype"])
    base = logprobs(model, tokenizer)
    adapters = wrap_svd(model, tuple(cfg["targets"]), run.parent / "cache" / "svd")
    for step in (1, 2):
        out = export(ExportConfig(run=run, step=step))
        assert out == run / "export" / f"step_{step:06d}" and (out / "model.safetensors").exists()
        load_delta(adapters, run / "checkpoints" / f"step_{step:06d}" / "delta_S.safetensors")
        wrapped = logprobs(model, tokenizer)
        exported = logprobs(AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out))
        assert (wrapped - base).abs().min() > 1e-2  # delta_S moves them: the check below can fail
        torch.testing.assert_close(exported, wrapped, rtol=1e-5, atol=1e-4)
        assert f"step_{step:06d}" in (out / "README.md").read_text()


def test_export_refuses_what_it_cannot_do(run, tmp_path):
    with pytest.raises(UserError, match="no checkpoint at step 7 .*one of 1, 2"):
        export(ExportConfig(run=run, step=7))
    with pytest.raises(UserError, match="not a run folder"):
        export(ExportConfig(run=tmp_path))
    (run / "export" / "step_000002").mkdir(parents=True)
    with pytest.raises(UserError, match="exists"):
        export(ExportConfig(run=run))  # the latest, already there: never overwritten


def test_eval_and_export_take_the_checkpoint_a_resume_would(run, monkeypatch):
    """Without --step, the latest checkpoint whose files all read (checkpoints.resumable_checkpoint), not the latest."""
    (checkpoint_dir(run, 2) / "state.pt").write_bytes(b"truncated")
    assert export(ExportConfig(run=run)) == run / "export" / "step_000001"
    taken = []

    def stop_before_the_model(saved, device, ckpt):
        taken.append(ckpt)
        raise InterruptedError

    monkeypatch.setattr(eval_module, "load_run_model", stop_before_the_model)
    with pytest.raises(InterruptedError):
        evaluate(EvalConfig(run=run, problems=ROOT / "data" / "problems.jsonl"))
    assert taken == [checkpoint_dir(run, 1)]


def test_export_takes_device_auto(run):
    """auto picks cuda or cpu, as eval's --device does (it was passed to .to() as is)."""
    out = export(ExportConfig(run=run, device="auto"))
    assert (out / "model.safetensors").exists()


def test_just_export_runs_the_module(run):
    out = run.parent / "elsewhere"
    subprocess.run([sys.executable, "-m", "projected_grpo.export", str(run), "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    assert (out / "config.json").exists() and json.loads((out / "run_config.json").read_text())["name"] == "smoke"
