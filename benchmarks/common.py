"""Shared by the benchmark scripts: provenance, result files, bandwidth, and the
caches compared (ours by name, mlx-lm's own on mlx-lm's model)."""

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_kvcache import load  # noqa: E402
from mlx_kvcache.doctor import openblas_core  # noqa: E402
from mlx_kvcache.evaluate import read_text  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def device_label() -> str:
    return "cpu" if mx.default_device() == mx.cpu else (
        "cuda" if mx.cuda.is_available() else "metal")


def _commit():
    """HEAD, with "+changes" when the code (results aside) differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parent)

    try:
        head = git("rev-parse", "--short", "HEAD").stdout.strip()
        changed = git("diff", "--quiet", "HEAD", "--", ":/", ":!benchmarks/results").returncode
    except OSError:
        return None
    return head + ("+changes" if head and changed == 1 else "")


# The code that runs is the commit checked out when the run started, not the
# one checked out when a long run writes its result.
STARTED_AT_COMMIT = _commit()


def provenance() -> dict:
    commit = STARTED_AT_COMMIT
    import mlx_lm

    return {"device": str(mx.default_device()), "backend": device_label(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "commit": commit,
            "openblas_preload": "openblas" in os.environ.get("LD_PRELOAD", ""),
            "openblas_core": openblas_core(),
            "date": time.strftime("%Y-%m-%d"),
            "command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])}


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"provenance": provenance(), **data}, indent=2) + "\n")
    return path


# The prompts the CPU path benchmarks prefill: a stretch of a real manual.
PREFILL_TEXT = "/usr/share/info/coreutils.info.gz"


def time_prefills(name: str, report: dict, lengths, repeats: int, paths, seconds) -> None:
    """report["prefill"]: a row per prompt length with the best of `repeats`
    of seconds(model, tokens, path) for each path, report["model"]'s prefill
    of that many tokens of PREFILL_TEXT, the paths interleaved so that the
    machine's drift falls on all of them alike; written after each length."""
    model, tokenizer = load(report["model"])
    text = tokenizer.encode(read_text(PREFILL_TEXT)[30000:], add_special_tokens=False)
    report["prefill"] = []
    for length in lengths:
        times = {path: [] for path in paths}
        for _ in range(repeats):
            for path in paths:
                times[path].append(seconds(model, text[:length], path))
        row = {"tokens": length, **{path: min(t) for path, t in times.items()}}
        report["prefill"].append(row)
        print(f"{length} tokens: " + ", ".join(f"{p} {row[p]:.1f} s" for p in paths),
              flush=True)
        write_result(name, report)


def load_result(name: str):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def timed(fn, repeats: int, warmup: int = 3) -> float:
    """Median ms of evaluating fn() `repeats` times, after `warmup` runs."""
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def memory_bandwidth_gbs(sizes_mb=(64, 256, 1024), repeats: int = 7):
    """(the best read bandwidth measured, GB/s; every probe's best): the
    physical limit a decode step is held against, so it must not
    under-measure. STREAM-style, after a warm-up run, best of `repeats`, over
    several sizes, three ways: MLX summing an array (a pure read), numpy
    copying one (read + write, both counted), and a float32 matrix-vector
    product (how a decode step reads its weights, through BLAS)."""
    import numpy as np

    def best(fn, nbytes):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return nbytes / min(times) / 1e9

    probes = {}
    columns = 4096
    for mb in sizes_mb:
        n = mb * 2**20 // 4
        array = mx.ones((n // columns, columns), mx.float32)
        vector = mx.ones((columns,), mx.float32)
        mx.eval(array, vector)
        probes[f"mlx sum {mb} MB"] = best(lambda: mx.eval(array.sum()), array.nbytes)
        probes[f"matvec {mb} MB"] = best(lambda: mx.eval(array @ vector), array.nbytes)
        source, target = np.ones(n, np.float32), np.empty(n, np.float32)
        probes[f"numpy copy {mb} MB"] = best(lambda: np.copyto(target, source),
                                             2 * source.nbytes)
    return max(probes.values()), probes


# Caches compared. Ours: (policy name, args) on our port; mlx-lm's: a factory of
# its cache classes, run on mlx-lm's own model with the same weights.
MLX_LM_CACHES = {
    "mlx-lm KVCache": lambda budget: KVCache(),
    "mlx-lm RotatingKVCache": lambda budget: RotatingKVCache(max_size=budget, keep=4),
    "mlx-lm QuantizedKVCache 8-bit": lambda budget: QuantizedKVCache(group_size=64, bits=8),
    "mlx-lm QuantizedKVCache 4-bit": lambda budget: QuantizedKVCache(group_size=64, bits=4),
}

OUR_POLICIES = {
    "full": ("full", {}),
    "streaming": ("streaming", {"sinks": 4}),
    "snapkv": ("snapkv", {}),
    "h2o": ("h2o", {}),
    "refreshkv (query)": ("refreshkv", {}),
    "refreshkv (stride 5)": ("refreshkv", {"refresh": "stride", "refresh_every": 5}),
    "refreshkv (score-only, every step)": ("refreshkv", {"refresh": "stride", "refresh_every": 1,
                                                         "refresh_mode": "score"}),
    "refreshkv (4-bit full cache)": ("refreshkv", {"full_cache_bits": 4}),
    "quantized 8-bit": ("quantized", {"kv_bits": 8}),
    "quantized 4-bit": ("quantized", {"kv_bits": 4}),
    "kivi 4-bit": ("kivi", {"kv_bits": 4}),
    "kivi 2-bit": ("kivi", {"kv_bits": 2}),
    "mixed (budget 16-bit, rest 4-bit)": ("mixed", {"kv_bits": 4}),
    "mixed (RefreshKV's choice 16-bit, rest 4-bit)": ("mixed", {"kv_bits": 4,
                                                       "importance": "refreshkv"}),
}

# Policies whose size does not depend on a token budget.
UNBUDGETED = {"full", "quantized", "kivi"}


def with_budget(name: str, args: dict, budget: int) -> dict:
    return args if name in UNBUDGETED else dict(args, budget=budget)
