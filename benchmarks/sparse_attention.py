"""Attention over retained indices vs full attention, one decode step, on the
current MLX device: the pure-MLX reference path (`attention.sparse`: one gather
of K rows from keys and one from values, then attention) against
`attention.dense` over all N rows. Llama-3.1-8B's attention shape (32 query
heads, 8 KV heads, head dim 128), one layer.

    python benchmarks/sparse_attention.py [--quick]

Writes benchmarks/results/sparse_attention_<device>.{json,md}.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
from common import device_label

from mlx_kvcache import attention

RESULTS = Path(__file__).parent / "results"
N_Q_HEADS, N_KV_HEADS, HEAD_DIM = 32, 8, 128


def timed(fn, repeats):
    for _ in range(3):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="float32" if mx.default_device() == mx.cpu else "float16")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)
    lengths = [8192, 32768] if args.quick else [8192, 16384, 32768, 65536]
    repeats = 5 if args.quick else 15
    scale = HEAD_DIM ** -0.5
    rows = []
    for n in lengths:
        mx.random.seed(0)
        q = mx.random.normal((1, N_Q_HEADS, 1, HEAD_DIM)).astype(dtype)
        k = mx.random.normal((1, N_KV_HEADS, n, HEAD_DIM)).astype(dtype)
        v = mx.random.normal((1, N_KV_HEADS, n, HEAD_DIM)).astype(dtype)
        mx.eval(q, k, v)
        dense_ms = timed(lambda: attention.dense(q, k, v, scale=scale), repeats)
        for ratio in (16, 8, 4):
            kept = n // ratio
            indices = mx.sort(mx.random.permutation(n)[:kept]).astype(mx.uint32)
            indices = mx.broadcast_to(indices, (1, N_KV_HEADS, kept))
            mx.eval(indices)
            sparse_ms = timed(lambda: attention.sparse(q, k, v, indices, scale), repeats)
            rows.append({"context": n, "retained": kept, "dense_ms": dense_ms[0],
                         "sparse_ms": sparse_ms[0], "dense_range_ms": dense_ms[1:],
                         "sparse_range_ms": sparse_ms[1:],
                         "sparse_over_dense": sparse_ms[0] / dense_ms[0]})
            print(rows[-1])
    device = device_label()
    result = {"benchmark": "sparse_attention", "device": str(mx.default_device()),
              "machine": f"{platform.machine()} {platform.system()}", "mlx": mx.__version__,
              "dtype": args.dtype, "shape": {"q_heads": N_Q_HEADS, "kv_heads": N_KV_HEADS,
                                             "head_dim": HEAD_DIM}, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sparse_attention_{device}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"One decode step of one layer, Llama-3.1-8B attention shape, {args.dtype}, "
             f"{result['device']}, MLX {mx.__version__}; median of {repeats}.", "",
             "| context N | retained K | full attention ms | gather + attend ms | ratio |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['retained']} | {r['dense_ms']:.2f} | "
                     f"{r['sparse_ms']:.2f} | {r['sparse_over_dense']:.2f} |")
    (RESULTS / f"sparse_attention_{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
