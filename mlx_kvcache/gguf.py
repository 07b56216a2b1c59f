"""GGUF files: check the header, then weights, config and tokenizer from the file.

`mx.load` reads files whose tensors are all F32, F16, Q4_0, Q4_1 or Q8_0 (the
quantized ones arrive as MLX affine-quantized weight/scales/biases with group
size 32). Files with any other supported type (K-quants, Q5_0/Q5_1, BF16: most
GGUFs people have, Q4_K_M above all) go through llama.cpp's `gguf` package
(gguf_package.py). Neither reader is told about files it cannot read, so the
header is walked here first: a truncated or corrupt file, or a type nobody here
reads (IQ types...), gets a clear error naming the tensor instead of a crash.
"""

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_kvcache.errors import UserError

# ggml_type id -> (name, bytes per block, elements per block).
GGML_TYPES = {
    0: ("F32", 4, 1), 1: ("F16", 2, 1), 2: ("Q4_0", 18, 32), 3: ("Q4_1", 20, 32),
    6: ("Q5_0", 22, 32), 7: ("Q5_1", 24, 32), 8: ("Q8_0", 34, 32), 9: ("Q8_1", 36, 32),
    10: ("Q2_K", 84, 256), 11: ("Q3_K", 110, 256), 12: ("Q4_K", 144, 256),
    13: ("Q5_K", 176, 256), 14: ("Q6_K", 210, 256), 15: ("Q8_K", 292, 256),
    16: ("IQ2_XXS", 66, 256), 17: ("IQ2_XS", 74, 256), 18: ("IQ3_XXS", 98, 256),
    19: ("IQ1_S", 50, 256), 20: ("IQ4_NL", 18, 32), 21: ("IQ3_S", 110, 256),
    22: ("IQ2_S", 82, 256), 23: ("IQ4_XS", 136, 256), 24: ("I8", 1, 1),
    25: ("I16", 2, 1), 26: ("I32", 4, 1), 27: ("I64", 8, 1), 28: ("F64", 8, 1),
    29: ("IQ1_M", 56, 256), 30: ("BF16", 2, 1),
}
MLX_TYPES = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}
PACKAGE_TYPES = {"BF16", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
SUPPORTED_TYPES = MLX_TYPES | PACKAGE_TYPES

# GGUF metadata value type id -> struct format of one element (8 = string, 9 = array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.data):
            raise ValueError("string runs past the end of the file")
        s = self.data[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        """A metadata value as mx.load gives it: str, list of str, or mx.array."""
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype == 8:
                return [self.string() for _ in range(count)]
            if etype not in _SCALARS:
                raise ValueError(f"unsupported metadata array of type {etype}")
            fmt = _SCALARS[etype]
            nbytes = count * struct.calcsize(fmt)
            if self.pos + nbytes > len(self.data):
                raise ValueError("metadata runs past the end of the file")
            values = np.frombuffer(self.data, np.dtype(fmt), count, self.pos)
            self.pos += nbytes
            return mx.array(values)
        if vtype in _SCALARS:
            return mx.array(self.unpack(_SCALARS[vtype]))
        raise ValueError(f"unknown metadata value type {vtype}")


@dataclass
class TensorInfo:
    name: str
    shape: Tuple[int, ...]  # row-major, as numpy and MLX see it
    type_name: str
    offset: int  # from the start of the file
    nbytes: int


def read_header(path: Path) -> Tuple[dict, List[TensorInfo]]:
    """(metadata, tensors) of a GGUF file; UserError unless it is a complete
    GGUF file whose tensors are all of supported types."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        # The header (metadata + tensor infos) sits before the data; for the
        # largest vocabularies it is a few MB.
        head = f.read(min(size, 64 << 20))
    try:
        r = _Reader(head)
        if head[:4] != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        r.pos = 4
        version = r.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        metadata = {}
        for _ in range(n_kv):
            key, vtype = r.string(), r.unpack("<I")
            metadata[key] = r.value(vtype)
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
            type_id, offset = r.unpack("<I"), r.unpack("<Q")
            type_name, block_bytes, block_elems = GGML_TYPES.get(
                type_id, (f"type id {type_id}", 0, 1)
            )
            if type_name not in SUPPORTED_TYPES:
                raise UserError(
                    f"{path}: tensor {name!r} is {type_name}, a GGUF quant type this "
                    f"package cannot load (supported: {', '.join(sorted(SUPPORTED_TYPES))})"
                )
            tensors.append(TensorInfo(name, tuple(reversed(dims)), type_name, offset,
                                      math.prod(dims) // block_elems * block_bytes))
    except (struct.error, ValueError) as e:
        raise UserError(f"{path}: corrupt GGUF file ({e})") from None
    alignment = _scalar(metadata, "general.alignment", 32)
    data_start = (r.pos + alignment - 1) // alignment * alignment
    end = data_start + max((t.offset + t.nbytes for t in tensors), default=0)
    if end > size:
        raise UserError(f"{path}: truncated GGUF file ({size} bytes, its tensors need {end})")
    for t in tensors:
        t.offset += data_start
    return metadata, tensors


def check_file(path: Path) -> set:
    """The tensor types of `path`; UserError unless it is a complete GGUF file
    of supported types."""
    return {t.type_name for t in read_header(path)[1]}


# GGUF tensor name -> Hugging Face name (the ports use HF names).
_RENAMES = [
    (r"^token_embd\.", "model.embed_tokens."),
    (r"^output_norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
    (r"^blk\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^blk\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^blk\.(\d+)\.attn_q\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^blk\.(\d+)\.attn_k\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^blk\.(\d+)\.attn_v\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^blk\.(\d+)\.attn_output\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^blk\.(\d+)\.attn_q_norm\.", r"model.layers.\1.self_attn.q_norm."),
    (r"^blk\.(\d+)\.attn_k_norm\.", r"model.layers.\1.self_attn.k_norm."),
    (r"^blk\.(\d+)\.ffn_gate\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^blk\.(\d+)\.ffn_up\.", r"model.layers.\1.mlp.up_proj."),
    (r"^blk\.(\d+)\.ffn_down\.", r"model.layers.\1.mlp.down_proj."),
]

# Gemma 3 has four norms per block; its ffn_norm is the norm before the MLP.
# These are tried before the renames above.
_GEMMA3_RENAMES = [
    (r"^blk\.(\d+)\.post_attention_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^blk\.(\d+)\.ffn_norm\.", r"model.layers.\1.pre_feedforward_layernorm."),
    (r"^blk\.(\d+)\.post_ffw_norm\.", r"model.layers.\1.post_feedforward_layernorm."),
]

# GGUF architecture -> HF model_type. llama.cpp converts Mistral to "llama".
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                  "gemma3": "gemma3_text"}


def _scalar(metadata, key, default=None):
    value = metadata.get(key, default)
    return value.item() if isinstance(value, mx.array) else value


def model_config(metadata: dict, weights) -> dict:
    """The port's config from the GGUF metadata; `weights`: the HF names the
    file holds (whether lm_head.weight is among them says if it is tied)."""
    arch = metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {arch!r} in GGUF "
            f"(supported: {', '.join(sorted(_ARCHITECTURES))})"
        )
    get = lambda key, default=None: _scalar(metadata, f"{arch}.{key}", default)  # noqa: E731
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    config = {
        "model_type": _ARCHITECTURES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "vocab_size": get("vocab_size", len(metadata.get("tokenizer.ggml.tokens", []))),
        "max_position_embeddings": get("context_length"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "attention_bias": False,
    }
    if arch == "llama":
        # llama.cpp permutes Llama's q/k rows for its interleaved ("normal") RoPE;
        # rotating interleaved pairs is the same model without un-permuting.
        config["rope_traditional"] = True
    if arch == "gemma3":
        config.update(_gemma3_config(get, config))
    return config


def _gemma3_config(get, config: dict) -> dict:
    """What a Gemma 3 GGUF leaves implicit, as llama.cpp fills it in: a global
    layer every 6th, local RoPE base 10,000, queries scaled by head_dim^-0.5
    (by (hidden/heads)^-0.5 for the 27B model, 62 layers)."""
    extra = {
        "sliding_window": get("attention.sliding_window", 512),
        "sliding_window_pattern": 6,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": (
            config["hidden_size"] // config["num_attention_heads"]
            if config["num_hidden_layers"] == 62 else config["head_dim"]
        ),
    }
    if get("rope.scaling.type") == "linear":
        extra["rope_scaling"] = {"type": "linear", "factor": get("rope.scaling.factor")}
    return extra


def _quantization(weights: dict) -> Dict[str, dict]:
    """Module path -> quantization params, read off the packed shapes."""
    quant = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            path = name[: -len(".scales")]
            packed = weights[f"{path}.weight"]
            group_size = 32  # every GGUF type MLX loads has 32-element blocks
            bits = packed.shape[-1] * 32 // (scales.shape[-1] * group_size)
            quant[path] = {"group_size": group_size, "bits": bits}
    return quant


def read(path: Path, keep_quantized: bool = True) -> Tuple[dict, dict, Dict[str, dict], dict]:
    """(config, weights with HF names, quantization per module, metadata).
    Types MLX cannot read are dequantized, then re-quantized if `keep_quantized`."""
    metadata, tensors = read_header(path)
    if {t.type_name for t in tensors} <= MLX_TYPES:
        gguf_weights, metadata = mx.load(str(path), return_metadata=True)
    else:
        from mlx_kvcache import gguf_package

        gguf_weights = gguf_package.read(path, tensors, keep_quantized)
    gemma = is_gemma(metadata)
    weights = {}
    for name, array in gguf_weights.items():
        weights[hf_name(name, gemma)] = array - 1 if stores_one_plus(name, gemma) else array
    return model_config(metadata, weights), weights, _quantization(weights), metadata


def is_gemma(metadata: dict) -> bool:
    return metadata.get("general.architecture") == "gemma3"


def hf_name(name: str, gemma: bool) -> str:
    """The Hugging Face name of GGUF tensor `name` (unchanged if unknown)."""
    for pattern, replacement in _GEMMA3_RENAMES + _RENAMES if gemma else _RENAMES:
        renamed, n = re.subn(pattern, replacement, name)
        if n:
            return renamed
    return name


def stores_one_plus(name: str, gemma: bool) -> bool:
    """llama.cpp stores Gemma's norms as 1 + weight; the port adds the 1."""
    return gemma and name.endswith("norm.weight")


class FactorScaledRoPE(nn.Module):
    """RoPE with llama.cpp's per-frequency factors (the `rope_freqs` tensor that
    Llama 3.1 GGUFs carry instead of a rope_scaling config): each rotation
    period is the base period times its factor."""

    def __init__(self, dims: int, base: float, traditional: bool, factors: mx.array):
        super().__init__()
        self.dims, self.traditional = dims, traditional
        periods = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        self._freqs = periods * factors.astype(mx.float32)

    def __call__(self, x, offset=0):
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None,
                            scale=1.0, offset=offset, freqs=self._freqs)


def apply_rope_factors(model, weights: dict) -> None:
    """Give every layer the rope_freqs factors, if the file has them."""
    factors = weights.pop("rope_freqs.weight", None)
    if factors is None:
        return
    args = model.args
    for layer in model.layers:
        attention = layer.self_attn
        attention.rope = FactorScaledRoPE(
            attention.head_dim, args.rope_theta, args.rope_traditional, factors
        )
