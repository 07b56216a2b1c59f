"""Attention over retained indices, one decode step of one layer (Llama-3.1-8B's
attention shape: 32 query heads, 8 KV heads, head dim 128) on the current MLX
device, side by side in one run:

- full: `attention.dense` over all N rows (the full cache's step);
- gather: the pure-MLX reference of `attention.sparse` (gather K rows, attend);
- fused: `attention.sparse` through the fused kernel (GPUs only);
- mlx-lm RotatingKVCache(K): its update_and_fetch of the new token, then
  attention over its K-row window (what a ring buffer costs for the same K).

    python benchmarks/sparse_attention.py [--quick] [--dtype float16]

Writes benchmarks/results/sparse_attention_<backend>.{json,md}.
"""

import argparse
import os

import mlx.core as mx
from common import device_label, timed, write_result
from mlx_lm.models.cache import RotatingKVCache

from mlx_kvcache import attention, kernels

N_Q_HEADS, N_KV_HEADS, HEAD_DIM = 32, 8, 128


def gather_reference(q, k, v, indices, scale):
    os.environ[kernels.FORCE_REFERENCE] = "1"
    try:
        return attention.sparse(q, k, v, indices, scale)
    finally:
        del os.environ[kernels.FORCE_REFERENCE]


def rotating_step(q, k, v, kept, scale):
    """A RotatingKVCache holding `kept` rows; each call appends one token and
    attends over the window, as mlx-lm's decode step does."""
    cache = RotatingKVCache(max_size=kept, keep=4)
    cache.update_and_fetch(k[:, :, :kept], v[:, :, :kept])
    one_k, one_v = k[:, :, -1:], v[:, :, -1:]

    def step():
        keys, values = cache.update_and_fetch(one_k, one_v)
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale)
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="float32" if mx.default_device() == mx.cpu else "float16")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)
    lengths = [8192, 32768] if args.quick else [8192, 16384, 32768, 65536]
    repeats = 5 if args.quick else 15
    scale = HEAD_DIM ** -0.5
    fused_available = kernels.use_kernels()
    rows = []
    for n in lengths:
        mx.random.seed(0)
        q = mx.random.normal((1, N_Q_HEADS, 1, HEAD_DIM)).astype(dtype)
        k = mx.random.normal((1, N_KV_HEADS, n, HEAD_DIM)).astype(dtype)
        v = mx.random.normal((1, N_KV_HEADS, n, HEAD_DIM)).astype(dtype)
        mx.eval(q, k, v)
        full_ms = timed(lambda: attention.dense(q, k, v, scale=scale), repeats)
        for ratio in (16, 8, 4):
            kept = n // ratio
            indices = mx.sort(mx.random.permutation(n)[:kept]).astype(mx.uint32)
            indices = mx.broadcast_to(indices, (1, N_KV_HEADS, kept))
            mx.eval(indices)
            row = {"context": n, "retained": kept, "full_ms": full_ms,
                   "gather_ms": timed(lambda: gather_reference(q, k, v, indices, scale), repeats),
                   "fused_ms": (timed(lambda: attention.sparse(q, k, v, indices, scale), repeats)
                                if fused_available else None),
                   "rotating_ms": timed(rotating_step(q, k, v, kept, scale), repeats)}
            rows.append(row)
            print(row, flush=True)
    backend = device_label()
    write_result(f"sparse_attention_{backend}", {
        "benchmark": "sparse_attention", "quick": args.quick, "dtype": args.dtype,
        "repeats": repeats, "fused_kernel": fused_available,
        "shape": {"q_heads": N_Q_HEADS, "kv_heads": N_KV_HEADS, "head_dim": HEAD_DIM},
        "rows": rows})


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
