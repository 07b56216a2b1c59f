"""Fused kernels for attention over retained indices and for RefreshKV's refresh
scores. The sources live in metal/ (shipped as `mlx_kvcache.metal`): a `.metal`
file per kernel family and its `.cu` twin, each split into `// header` and
`// kernel: NAME` sections. They are built once, at import, for the GPU backend
present (`mx.fast.metal_kernel` on Apple GPUs, `mx.fast.cuda_kernel` on MLX's
CUDA backend); on the CPU there is nothing to build and callers use the
pure-MLX references in `attention`. MLX_KVCACHE_REFERENCE=1 forces the
references everywhere.

The wrappers here compute grids and sizes; callers go through
`attention.sparse` and `attention.refresh_scores`, which decide whether a
kernel applies (`use_kernels`, `sparse_supported`, `refresh_supported`).
"""

import math
import os
from importlib import resources
from typing import Dict, Optional, Tuple

import mlx.core as mx

FORCE_REFERENCE = "MLX_KVCACHE_REFERENCE"
FAMILIES = ("sparse_attention", "refresh_scores")
SIGNATURES = {  # kernel -> (input names, output names), as the sources use them
    "sparse_attention_partials": (
        ["queries", "keys", "values", "indices", "sizes", "scale_factor"],
        ["partial_out", "partial_max", "partial_sum"]),
    "sparse_attention_reduce": (
        ["partial_out", "partial_max", "partial_sum", "sizes"], ["out"]),
    "score_logits": (
        ["queries", "keys", "sizes", "scale_factor"], ["logits", "block_maxima", "block_sums"]),
    "score_logits_quantized": (
        ["queries", "words", "scales", "biases", "sizes", "scale_factor"],
        ["logits", "block_maxima", "block_sums"]),
    "refresh_scores": (
        ["logits", "block_maxima", "block_sums", "sizes"], ["per_head"]),
}

DTYPES = (mx.float16, mx.bfloat16, mx.float32)
HEAD_DIMS = (64, 80, 96, 128)
MAX_QUERIES = 8  # L: decode steps, or a few speculative tokens
MAX_QUERY_ROWS = 64  # (Hq / Hkv) * L held in registers per KV head
QUANTIZED_BITS = (2, 4, 8)  # whole codes per 32-bit word

LANES = 32
WARPS = 4  # simdgroups per threadgroup in the sparse pass
TILE_ROWS = 16  # retained rows staged in threadgroup memory at once
TARGET_THREADGROUPS = 256  # splits enough to fill the GPU at batch 1
BLOCK_KEYS = 256  # keys per threadgroup in the scoring passes


def read_sources(path) -> Tuple[str, Dict[str, str]]:
    """A kernel file -> (its header, {kernel name: body})."""
    header, bodies, current = [], {}, None
    seen_header = False
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("// header"):
            seen_header = True
            continue
        if line.startswith("// kernel: "):
            current = line[len("// kernel: "):].strip()
            bodies[current] = ""
            continue
        if current is not None:
            bodies[current] += line
        elif seen_header:
            header.append(line)
    return "".join(header), bodies


def gpu_backend() -> Optional[str]:
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def source_path(family: str, backend: str):
    suffix = ".metal" if backend == "metal" else ".cu"
    return resources.files("mlx_kvcache.metal") / f"{family}{suffix}"


def build(backend: Optional[str]) -> dict:
    if backend is None:
        return {}
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    kernels = {}
    for family in FAMILIES:
        header, bodies = read_sources(source_path(family, backend))
        for name, body in bodies.items():
            inputs, outputs = SIGNATURES[name]
            kernels[name] = make(name=name, input_names=inputs, output_names=outputs,
                                 source=body, header=header)
    return kernels


KERNELS = build(gpu_backend())


def use_kernels() -> bool:
    """Kernels are built, the default device is the GPU, and not forced off."""
    return (bool(KERNELS) and mx.default_device().type == mx.gpu
            and os.environ.get(FORCE_REFERENCE, "") in ("", "0"))


def sparse_supported(queries: mx.array, keys: mx.array, indices: mx.array, mask) -> bool:
    B, n_q_heads, L, D = queries.shape
    n_kv_heads = keys.shape[1]
    return (use_kernels() and mask is None and queries.dtype in DTYPES
            and keys.dtype == queries.dtype and D in HEAD_DIMS and L <= MAX_QUERIES
            and n_q_heads // n_kv_heads * L <= MAX_QUERY_ROWS and indices.shape[-1] > 0)


def refresh_supported(queries: mx.array, quantization: Optional[Tuple[int, int]]) -> bool:
    B, n_q_heads, L, D = queries.shape
    return (use_kernels() and L == 1 and queries.dtype in DTYPES and D in HEAD_DIMS
            and (quantization is None or quantization[0] in QUANTIZED_BITS))


def sparse_attention(queries, keys, values, indices, scale: float) -> mx.array:
    """Fused attention over retained rows: queries [B, Hq, L, D], keys/values
    the whole cache buffers [B, Hkv, rows, D], indices [B, Hkv, K]."""
    B, n_q_heads, L, D = queries.shape
    n_kv_heads = keys.shape[1]
    K = indices.shape[-1]
    query_rows = n_q_heads // n_kv_heads * L
    wanted_splits = max(1, TARGET_THREADGROUPS // (B * n_kv_heads))
    split_rows = TILE_ROWS * math.ceil(K / wanted_splits / TILE_ROWS)
    splits = math.ceil(K / split_rows)
    sizes = mx.array([keys.shape[2], K, splits, split_rows], mx.int32)
    template = [("T", queries.dtype), ("D", D), ("QR", query_rows)]
    partial_shape = (B, n_kv_heads, splits, query_rows)
    partials = KERNELS["sparse_attention_partials"](
        inputs=[queries, keys, values, indices.astype(mx.uint32), sizes,
                mx.array([scale], mx.float32)],
        template=template + [("TILE_ROWS", TILE_ROWS), ("WARPS", WARPS)],
        grid=(splits * WARPS * LANES, n_kv_heads, B), threadgroup=(WARPS * LANES, 1, 1),
        output_shapes=[partial_shape + (D,), partial_shape, partial_shape],
        output_dtypes=[mx.float32] * 3)
    return KERNELS["sparse_attention_reduce"](
        inputs=[*partials, sizes], template=template,
        grid=(LANES, n_kv_heads * query_rows, B), threadgroup=(LANES, 1, 1),
        output_shapes=[queries.shape], output_dtypes=[queries.dtype])[0]


def refresh_scores(queries, keys, n_keys: int, scale: float, pool_kernel: int,
                   quantization: Optional[Tuple[int, int]] = None) -> mx.array:
    """Fused refresh scores [B, Hkv, n_keys]: one query per head [B, Hq, 1, D]
    over the cache buffer [B, Hkv, rows, D], or over its quantized (words,
    scales, biases) with quantization = (bits, group_size)."""
    B, n_q_heads, _, D = queries.shape
    packed = quantization is not None
    n_kv_heads, buffer_rows = (keys[0] if packed else keys).shape[1:3]
    group = n_q_heads // n_kv_heads
    blocks = math.ceil(n_keys / BLOCK_KEYS)
    sizes = mx.array([buffer_rows, n_keys, blocks], mx.int32)
    grid, threadgroup = (blocks * BLOCK_KEYS, n_kv_heads, B), (BLOCK_KEYS, 1, 1)
    template = [("T", queries.dtype), ("D", D), ("GROUP", group), ("BLOCK_KEYS", BLOCK_KEYS)]
    if packed:
        name, key_inputs = "score_logits_quantized", list(keys)
        template += [("BITS", quantization[0]), ("GROUP_SIZE", quantization[1])]
    else:
        name, key_inputs = "score_logits", [keys]
    first_pass = KERNELS[name](
        inputs=[queries, *key_inputs, sizes, mx.array([scale], mx.float32)],
        template=template, grid=grid, threadgroup=threadgroup,
        output_shapes=[(B, n_q_heads, n_keys), (B, n_q_heads, blocks), (B, n_q_heads, blocks)],
        output_dtypes=[mx.float32] * 3)
    return KERNELS["refresh_scores"](
        inputs=[*first_pass, sizes],
        template=[("GROUP", group), ("BLOCK_KEYS", BLOCK_KEYS), ("POOL", max(pool_kernel, 1))],
        grid=grid, threadgroup=threadgroup,
        output_shapes=[(B, n_kv_heads, n_keys)], output_dtypes=[mx.float32])[0]
