"""GGUF files MLX's own reader cannot load (K-quants, Q5_0/Q5_1, BF16),
dequantized by llama.cpp's `gguf` package (its numpy dequantizers, rather than
bit unpacking of our own). The header is walked by gguf.read_header: the
package's own reader takes 20 s over Gemma 3's 262K-token vocabulary.

Every tensor is dequantized to float32. Kept quantized (`--keep-quantized`, and
on a GPU), a quantized tensor becomes MLX affine quantization, groups of 32, at
the nearest bit width MLX has (KEEP_BITS): a re-quantization of the dequantized
values, not a bit-exact copy of the file's blocks.
"""

from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import numpy as np

# GGML type name -> MLX bits when kept quantized (MLX: 2, 3, 4, 5, 6, 8).
KEEP_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5,
             "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}
GROUP_SIZE = 32


# Blocks handed to the package's dequantizer at a time. Its public call splits a
# tensor into groups of 16 rows, thousands of small numpy calls for a
# 151,936-row embedding; blocks do not depend on where rows end, so we hand it
# one long row of this many blocks instead: the same values, Qwen2.5-Coder's
# Q5_0 tensors 3x faster (benchmarks/gguf_load.py).
BLOCKS_A_CALL = 4096


def dequantize(raw: np.ndarray, type_name: str, shape) -> np.ndarray:
    """Float32 values of `shape` from a GGUF tensor's bytes (`raw`, uint8): a
    whole tensor, or whole rows of one (offload/from_gguf.py reads it in row
    chunks)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize as package_dequantize

    # A plain array: numpy's memmap subclass costs a Python call per slice.
    raw = raw.view(np.ndarray)
    if type_name in ("F32", "F16"):
        values = raw.view(np.float32 if type_name == "F32" else np.float16).reshape(shape)
        return values.astype(np.float32, copy=False)
    kind = GGMLQuantizationType[type_name]
    block_values, block_bytes = GGML_QUANT_SIZES[kind]
    blocks = raw.reshape(-1, block_bytes)
    values = np.empty(len(blocks) * block_values, np.float32)
    for start in range(0, len(blocks), BLOCKS_A_CALL):
        part = blocks[start : start + BLOCKS_A_CALL]
        values[start * block_values : (start + len(part)) * block_values] = (
            package_dequantize(part.reshape(1, -1), kind).ravel())
    return values.reshape(shape)


def read(path: Path, tensors: List, keep_quantized: bool) -> Dict[str, mx.array]:
    """Weights by GGUF name, from `tensors` (gguf.TensorInfo, read_header): float32, or
    MLX-quantized (`name.weight`, `name.scales`, `name.biases`) when
    `keep_quantized`. The file is mapped, not read whole; the metadata is read
    by gguf.read_header (the package's reader builds a numpy view per token of
    the vocabulary: 20 s for Gemma's 262K)."""
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    weights = {}
    for tensor in tensors:
        kind = tensor.type_name
        raw = mapped[tensor.offset : tensor.offset + tensor.nbytes]
        values = mx.array(dequantize(raw, kind, tensor.shape))
        bits = KEEP_BITS.get(kind)
        if keep_quantized and bits is not None and values.ndim == 2:
            base = tensor.name[: -len(".weight")]
            packed, scales, biases = mx.quantize(values, group_size=GROUP_SIZE, bits=bits)
            weights.update({f"{base}.weight": packed, f"{base}.scales": scales,
                            f"{base}.biases": biases})
        else:
            weights[tensor.name] = values
    return weights
