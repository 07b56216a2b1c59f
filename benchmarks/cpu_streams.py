"""Linux CPU notes, measured: dense attention split by KV heads over one CPU
stream per core (mlx_kvcache/attention.py) against one op on one thread.

MLX's CPU backend runs an element-wise op on one thread, and a long prefill's
time goes mostly to the softmax's exponentials. This times, in one process and
interleaved, (1) the exponentials per second of `mx.exp` and of a softmax, and
(2) Qwen2.5-Coder-0.5B's prefill of a stretch of the coreutils manual, with the
split and without it, best of `--repeats`. Writes
benchmarks/results/cpu_streams.{json,md}.

    python benchmarks/cpu_streams.py [--lengths 2048,4096] [--repeats 2]
"""

import argparse
import time

import mlx.core as mx
from common import write_result

from mlx_kvcache import attention, load, make_cache
from mlx_kvcache.evaluate import prefill, read_text

MODEL = "qwen2.5-coder-0.5b"
TEXT = "/usr/share/info/coreutils.info.gz"


def rate(fn, n: int, repeats: int = 3) -> float:
    """Best elements per second of evaluating fn() over n elements."""
    mx.eval(fn())
    best = min(_seconds(fn) for _ in range(repeats))
    return n / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def prefill_seconds(model, tokens, split: bool) -> float:
    threshold = attention.CPU_SPLIT_MIN_SCORES
    attention.CPU_SPLIT_MIN_SCORES = threshold if split else 1 << 62
    try:
        cache = make_cache(model, "full")
        start = time.perf_counter()
        prefill(model, cache, tokens)
        return time.perf_counter() - start
    finally:
        attention.CPU_SPLIT_MIN_SCORES = threshold


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    scores = mx.random.normal((14, 512, 4096))
    mx.eval(scores)
    report = {"benchmark": "cpu_streams", "model": MODEL, "repeats": args.repeats,
              "exp_per_s": rate(lambda: mx.exp(scores), scores.size),
              "softmax_per_s": rate(lambda: mx.softmax(scores, axis=-1), scores.size),
              "prefill": []}
    print(f"exp {report['exp_per_s'] / 1e6:.0f} M/s, softmax "
          f"{report['softmax_per_s'] / 1e6:.0f} M/s", flush=True)
    model, tokenizer = load(MODEL)
    text = tokenizer.encode(read_text(TEXT)[30000:], add_special_tokens=False)
    for length in (int(n) for n in args.lengths.split(",")):
        times = {"one stream": [], "split": []}
        for _ in range(args.repeats):
            for name in times:
                times[name].append(prefill_seconds(model, text[:length], name == "split"))
        row = {"tokens": length, **{name: min(t) for name, t in times.items()}}
        row["speedup"] = row["one stream"] / row["split"]
        report["prefill"].append(row)
        print(f"{length} tokens: {row['one stream']:.1f} s on one stream, "
              f"{row['split']:.1f} s split ({row['speedup']:.2f}x)", flush=True)
        write_result("cpu_streams", report)


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
