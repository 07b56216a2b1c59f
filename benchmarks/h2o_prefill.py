"""Linux CPU notes, measured: H2O's prefill with its scores taken in the same
pass as the attention output, against a second pass that computes them again,
beside the whole cache's prefill; and mixed precision's, whose scores need
their own pass, with numpy summing them or MLX.

H2O sums every prompt query's attention probabilities per key. On the CPU a
large float32 prompt chunk's attention goes to numpy's softmax
(`mlx_kvcache/cpu_attention.py`); `dense_and_received` takes the column sums
from the same exponentials, where the second pass
(`attention.received_by_rows`, the path elsewhere) scores every row again over
every key, MLX summing the probabilities. Mixed precision attends to every
token but scores only its high-precision ones, so its scores always take a pass
of their own: numpy sums each block of rows as it goes (`cpu_attention.received`,
now), or MLX sums the probabilities (`attention.received_by_rows`, before). This
times each, and `full`, on Qwen2.5-Coder-0.5B's prefill of a stretch of the
coreutils manual, interleaved in one process, best of `--repeats`. Writes
benchmarks/results/h2o_prefill.{json,md}.

    python benchmarks/h2o_prefill.py [--lengths 4096,8192] [--repeats 1]
"""

import argparse
import time

from common import time_prefills

from mlx_kvcache import attention, cpu_attention, make_cache
from mlx_kvcache.evaluate import prefill

MODEL = "qwen2.5-coder-0.5b"


def two_passes(queries, keys, values, *, scale, mask=None):
    return (cpu_attention.dense(queries, keys, values, scale=scale, mask=mask),
            attention.received_by_rows(queries, keys, scale))


def sums_by_mlx(queries, keys, *, scale, mask=None):
    return attention.received_by_rows(queries, keys, scale)


# Each path: the cache it prefills, and the cpu_attention functions it replaces.
PATHS = {
    "full": ("full", {}),
    "h2o one pass": ("h2o", {}),
    "h2o two passes": ("h2o", {"dense_and_received": two_passes}),
    "mixed": ("mixed", {}),
    "mixed, sums by MLX": ("mixed", {"received": sums_by_mlx}),
}


def prefill_seconds(model, tokens, path: str) -> float:
    policy, replaced = PATHS[path]
    kept = {name: getattr(cpu_attention, name) for name in replaced}
    for name, function in replaced.items():
        setattr(cpu_attention, name, function)
    try:
        # H2O reads the prompt whole whatever the budget (it cuts at decode
        # steps); mixed precision demotes after each prompt chunk.
        cache = (make_cache(model, "full") if policy == "full"
                 else make_cache(model, policy, budget_ratio=1 / 8))
        start = time.perf_counter()
        prefill(model, cache, tokens)
        return time.perf_counter() - start
    finally:
        for name, function in kept.items():
            setattr(cpu_attention, name, function)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    report = {"benchmark": "h2o_prefill", "model": MODEL, "repeats": args.repeats}
    time_prefills("h2o_prefill", report, [int(n) for n in args.lengths.split(",")], args.repeats,
                  PATHS, prefill_seconds)


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
