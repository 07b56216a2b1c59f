"""`--model NAME` -> files -> (model, tokenizer).

Resolution order: an alias (served offline by an installed package, see
packaged_models.py, else from the hub repo in ALIASES), a local directory
(Hugging Face / mlx-community layout), a `.gguf` file, a hub repo id
(huggingface-hub's cache).
"""

import glob
import json
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_kvcache import gguf
from mlx_kvcache.errors import UserError
from mlx_kvcache.models import build_model
from mlx_kvcache.packaged_models import packaged_gguf

# alias -> hub repo id (mlx-community 4-bit conversions: the size a laptop runs).
ALIASES = {
    "llama3": "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
    "llama3-3b": "mlx-community/Llama-3.2-3B-Instruct-4bit",
    "llama3-1b": "mlx-community/Llama-3.2-1B-Instruct-4bit",
    "llama2": "mlx-community/Llama-2-7b-chat-mlx",
    "mistral": "mlx-community/Mistral-7B-Instruct-v0.3-4bit",
    "qwen2.5": "mlx-community/Qwen2.5-7B-Instruct-4bit",
    "qwen2.5-3b": "mlx-community/Qwen2.5-3B-Instruct-4bit",
    "qwen3": "mlx-community/Qwen3-8B-4bit",
    "qwen3-4b": "mlx-community/Qwen3-4B-4bit",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen2.5-coder-0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
    "gemma3": "mlx-community/gemma-3-4b-it-4bit",
    "gemma3-1b": "mlx-community/gemma-3-1b-it-4bit",
}
DEFAULT_MODEL = "smollm2"

_HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def resolve(name: Optional[str]) -> Path:
    """A model name -> a local directory or .gguf file (fetching from the hub)."""
    name = name or DEFAULT_MODEL
    if name in ALIASES:
        local = packaged_gguf(name)
        return local if local is not None else _download(ALIASES[name])
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() or path.suffix == ".gguf":
            return path
        raise UserError(f"{name}: not a model directory or a .gguf file")
    looks_like_path = name.endswith(".gguf") or name.startswith((".", "/", "~"))
    if looks_like_path or name.count("/") != 1:
        if looks_like_path:
            raise UserError(f"{name}: no such file or directory")
        raise UserError(
            f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), "
            "not a local directory or .gguf file, not a hub repo id (owner/name)"
        )
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated on the Hugging Face hub: accept its licence and "
            "log in (`hf auth login`), or pass a local directory or .gguf file"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id}: no such repository on the Hugging Face hub") from None
    except HFValidationError as e:
        raise UserError(f"{repo_id}: not a valid hub repo id ({e})") from None
    except (LocalEntryNotFoundError, OSError):
        raise UserError(
            f"cannot reach the Hugging Face hub to fetch {repo_id} and it is not in "
            "the local cache; pass a local directory or .gguf file with --model PATH"
        ) from None


def _read_directory(path: Path):
    config_file = path / "config.json"
    if not config_file.exists():
        raise UserError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{config_file}: unreadable ({e})") from None
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise UserError(f"{path}: no .safetensors weight files")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(f))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{f}: unreadable safetensors file ({e})") from None
    return config, weights


def _directory_quantization(config: dict, weights: dict) -> dict:
    """Module path -> quantization params, for the weights as the port names
    them (after sanitize: a multimodal checkpoint's prefixes are gone)."""
    q = config.get("quantization")
    if not q:
        return {}
    defaults = {k: q[k] for k in ("group_size", "bits", "mode") if k in q}
    quant = {}
    for name in weights:
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            quant[module] = q[module] if isinstance(q.get(module), dict) else defaults
    return quant


def load_tokenizer(path: Path):
    """The tokenizer of a resolved model path, without its weights."""
    if path.suffix == ".gguf":
        from mlx_kvcache.gguf_tokenizer import load_tokenizer as from_metadata

        return from_metadata(gguf.read_header(path)[0])
    return _load_directory_tokenizer(path)


def _load_directory_tokenizer(path: Path):
    from mlx_lm.utils import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load its tokenizer ({e})") from None


def load(
    name: Optional[str] = None, *, dequantize: Optional[bool] = None
) -> Tuple[nn.Module, object]:
    """Load a model and its tokenizer: `model, tokenizer = load("smollm2")`.

    name: an alias (see ALIASES; default "smollm2"), a local directory, a .gguf
    file, or a hub repo id. dequantize: store quantized weights as float32; the
    default is True on the CPU backend (quantized matmul over many rows, as in
    prefill, is ~20x slower there) and False on a GPU.
    """
    path = resolve(name)
    if dequantize is None:
        dequantize = mx.default_device() == mx.cpu
    if path.suffix == ".gguf":
        config, weights, quant, metadata = gguf.read(path, keep_quantized=not dequantize)
        from mlx_kvcache.gguf_tokenizer import load_tokenizer

        tokenizer = load_tokenizer(metadata)
    else:
        config, weights = _read_directory(path)
        tokenizer = None

    try:
        model = build_model(config)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: config does not describe a model we can build ({e})") from None
    gguf.apply_rope_factors(model, weights)
    weights = model.sanitize(weights)
    if path.suffix != ".gguf":
        quant = _directory_quantization(config, weights)
    if quant:
        nn.quantize(model, class_predicate=lambda p, m: quant.get(p, False))
    try:
        model.load_weights(list(weights.items()))
    except ValueError as e:
        raise UserError(f"{path}: weights do not match the config ({e})") from None

    if dequantize:
        dequantize_to_float32(model)
    mx.eval(model.parameters())
    model.eval()

    if tokenizer is None:
        tokenizer = _load_directory_tokenizer(path)
    model.source = str(path)
    model.context_length = config.get("max_position_embeddings")
    return model, tokenizer


def dequantized_weight(module) -> mx.array:
    """A quantized layer's weight as float32. Affine 2/4/8-bit weights are
    unpacked by numpy in float32 (scale * q + bias, as llama.cpp dequantizes):
    MLX's CPU dequantize works in the scales' float16 and ran at ~40 M
    weights/s here, 4x slower than numpy (SmolLM2's load: 3.3 s of 5.9)."""
    bits, group = module.bits, module.group_size
    if getattr(module, "mode", "affine") != "affine" or bits not in (2, 4, 8):
        return mx.dequantize(module.weight, module.scales.astype(mx.float32),
                             module.biases.astype(mx.float32), group, bits).astype(mx.float32)
    packed = np.asarray(module.weight).view(np.uint8)  # little-endian: low bits first
    per_byte = 8 // bits
    q = np.empty(packed.shape[:-1] + (packed.shape[-1] * per_byte,), np.uint8)
    for i in range(per_byte):
        np.bitwise_and(np.right_shift(packed, i * bits), (1 << bits) - 1, out=q[..., i::per_byte])
    rows = q.shape[0]
    weight = q.reshape(rows, -1, group).astype(np.float32)
    weight *= np.asarray(module.scales.astype(mx.float32))[..., None]
    weight += np.asarray(module.biases.astype(mx.float32))[..., None]
    return mx.array(weight.reshape(rows, -1))


def dequantize_to_float32(model: nn.Module) -> None:
    """Quantized layers become float32 Linear / Embedding layers, and every
    other floating parameter float32 (the CPU backend's fast matmul)."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            weight = dequantized_weight(module)
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias
        elif isinstance(module, nn.QuantizedEmbedding):
            weight = dequantized_weight(module)
            layer = nn.Embedding(*weight.shape)
        else:
            continue
        layer.weight = weight
        layers.append((name, layer))
    if layers:
        model.update_modules(tree_unflatten(layers))
    model.update(tree_map(
        lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
        model.parameters()))


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))
