"""Linux CPU notes, measured: the three ways `attention.dense` can run a large
product on MLX's CPU backend, on a real prefill.

MLX's CPU backend runs an element-wise op on one thread, and a long prefill's
time goes mostly to the softmax's exponentials. This times, in one process and
interleaved, (1) the exponentials per second of `mx.exp`, MLX's softmax and
numpy's `exp`, and (2) Qwen2.5-Coder-0.5B's prefill of a stretch of the coreutils
manual with each path: MLX's one op, split by KV heads over one CPU stream per
core, and numpy's softmax (`mlx_kvcache/cpu_attention.py`, the default for
float32), best of `--repeats`. Writes benchmarks/results/cpu_attention.{json,md}.

    python benchmarks/cpu_attention.py [--lengths 2048,4096] [--repeats 2]
"""

import argparse
import time

import mlx.core as mx
import numpy as np
from common import time_prefills

from mlx_kvcache import cpu_attention, make_cache
from mlx_kvcache.evaluate import prefill

MODEL = "qwen2.5-coder-0.5b"
PATHS = ("mlx one op", "cpu streams", "numpy softmax")


def rate(fn, n: int, repeats: int = 3) -> float:
    """Best elements per second of fn() over n elements (evaluated)."""
    mx.eval(fn())
    best = min(_seconds(fn) for _ in range(repeats))
    return n / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def prefill_seconds(model, tokens, path: str) -> float:
    threshold, supported = cpu_attention.MIN_SCORES, cpu_attention.supported
    if path == "mlx one op":
        cpu_attention.MIN_SCORES = 1 << 62
    elif path == "cpu streams":
        cpu_attention.supported = lambda *arrays: False
    try:
        cache = make_cache(model, "full")
        start = time.perf_counter()
        prefill(model, cache, tokens)
        return time.perf_counter() - start
    finally:
        cpu_attention.MIN_SCORES, cpu_attention.supported = threshold, supported


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    scores = mx.random.normal((14, 512, 4096))
    mx.eval(scores)
    scores_np = np.array(scores)
    out_np = np.empty_like(scores_np)
    report = {"benchmark": "cpu_attention", "model": MODEL, "repeats": args.repeats,
              "mx_exp_per_s": rate(lambda: mx.exp(scores), scores.size),
              "mx_softmax_per_s": rate(lambda: mx.softmax(scores, axis=-1), scores.size),
              "numpy_exp_per_s": rate(lambda: (np.exp(scores_np, out=out_np), scores)[1],
                                      scores.size)}
    print(f"mx.exp {report['mx_exp_per_s'] / 1e6:.0f} M/s, mx.softmax "
          f"{report['mx_softmax_per_s'] / 1e6:.0f} M/s, np.exp "
          f"{report['numpy_exp_per_s'] / 1e6:.0f} M/s", flush=True)
    time_prefills("cpu_attention", report, [int(n) for n in args.lengths.split(",")], args.repeats,
                  PATHS, prefill_seconds)


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
