"""GGUF files MLX's own reader cannot load (K-quants, Q5_0/Q5_1, BF16), read
with llama.cpp's `gguf` package: its reader and its numpy dequantizers, rather
than bit unpacking of our own.

Every tensor is dequantized to float32. Kept quantized (`--keep-quantized`, and
on a GPU), a quantized tensor becomes MLX affine quantization, groups of 32, at
the nearest bit width MLX has (KEEP_BITS): a re-quantization of the dequantized
values, not a bit-exact copy of the file's blocks.
"""

from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
import numpy as np

# GGML type name -> MLX bits when kept quantized (MLX: 2, 3, 4, 5, 6, 8).
KEEP_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5,
             "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}
GROUP_SIZE = 32


def _metadata_value(field):
    """A reader field as `mx.load` gives metadata: str, list of str, or mx.array."""
    from gguf import GGUFValueType

    main = field.types[0]
    if main == GGUFValueType.STRING:
        return field.contents()
    if main == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return field.contents()
        return mx.array(np.array(field.contents()))
    return mx.array(field.contents())


def read(path: Path, keep_quantized: bool) -> Tuple[Dict[str, mx.array], dict]:
    """(weights by GGUF name, metadata): float32, or MLX-quantized
    (`name.weight`, `name.scales`, `name.biases`) when `keep_quantized`."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    metadata = {name: _metadata_value(field) for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}
    weights = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        shape = tuple(reversed(tensor.shape.tolist()))
        values = mx.array(dequantize(tensor.data, tensor.tensor_type).reshape(shape)
                          .astype(np.float32))
        bits = KEEP_BITS.get(kind)
        if keep_quantized and bits is not None and values.ndim == 2:
            base = tensor.name[: -len(".weight")]
            packed, scales, biases = mx.quantize(values, group_size=GROUP_SIZE, bits=bits)
            weights.update({f"{base}.weight": packed, f"{base}.scales": scales,
                            f"{base}.biases": biases})
        else:
            weights[tensor.name] = values
    return weights, metadata
