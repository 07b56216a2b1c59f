"""Weight offloading measured honestly: exact mode (`--offload layers`) at
weight budgets of 25%, 50% and 75% beside the fully resident model and the
naive baseline ("LLM in a flash"'s: every weight read again for every token).

Each configuration runs in its own process, with the layout file dropped from
the page cache first (posix_fadvise DONTNEED; a warm page cache is not
storage) and again after every read of a unit, so every byte counted as read
came from the disk. Per configuration: bytes read per decoded token, decode
ms/token, the achieved read bandwidth, peak RSS and MLX peak memory, and
whether the greedy tokens equal the resident model's. The physical limit: at
budget b a token cannot take less than the bytes the budget leaves out
divided by the disk's sequential read bandwidth, measured here on the same
file the same way.

    python benchmarks/offload.py --quick        # SmolLM2
    python benchmarks/offload.py                # SmolLM2 and Qwen2.5-Coder-0.5B
    python benchmarks/offload.py --prepare      # writing the layout: streamed vs loaded

Writes benchmarks/results/offload.json (offload_quick.json, offload_prepare.json).
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from common import RESULTS, write_result

from mlx_kvcache import load, make_cache
from mlx_kvcache.generate import generate_step, make_sampler
from mlx_kvcache.offload import from_gguf, layout_path, prepare
from mlx_kvcache.offload import layout as layout_file
from mlx_kvcache.offload import runtime
from mlx_kvcache.evaluate import read_text
from mlx_kvcache.loading import resolve
from mlx_kvcache.offload.neurons import thresholds_path
from mlx_kvcache.offload.sparsity import thresholded

PROMPT = "Write a Python function that returns the square of x."
BUDGETS = ["25%", "50%", "75%"]
# Neurons mode: its defaults, and the window beside them at the middle budget.
FFN_SPARSITY = 0.3
NEURON_RUNS = [(b, 0) for b in BUDGETS] + [("50%", 1)]
HELD_OUT = "/usr/share/info/gettext.info.gz"
PPL_TOKENS = 1024
DECODE_TOKENS = 16
READ_BLOCK = 16 << 20


def drop_from_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_read_gbs(path, repeats: int = 3) -> float:
    """Sequential read of the whole file from storage, best of `repeats`."""
    best = 0.0
    for _ in range(repeats):
        drop_from_page_cache(path)
        fd = os.open(path, os.O_RDONLY)
        total, start = 0, time.perf_counter()
        try:
            while block := os.pread(fd, READ_BLOCK, total):
                total += len(block)
        finally:
            os.close(fd)
        best = max(best, total / (time.perf_counter() - start) / 1e9)
    drop_from_page_cache(path)
    return best


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def run_one(model_name: str, budget: str, mode: str = "layers", window: str = "0") -> dict:
    """One configuration, in this (fresh) process."""
    if budget == "naive":
        # Nothing pinned, nothing prefetched: every unit read for every token.
        def naive_plan(layout, _budget):
            cycle = [n for n in layout.units if n.startswith("layer.")] + [
                "head" if "head" in layout.units else "embed"]
            largest = max(layout.units[n].nbytes for n in cycle)
            return runtime.Plan([], cycle, False, layout.units["rest"].nbytes + largest)
        runtime.plan = naive_plan
    drop_from_page_cache(layout_path(resolve(model_name), mode))
    reset_peak_rss()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    if budget == "resident":
        model, tokenizer = load(model_name)
    else:
        model, tokenizer = load(model_name, weights_budget="100%" if budget == "naive" else budget,
                                offload=mode, ffn_sparsity=FFN_SPARSITY,
                                neuron_window=int(window))
    load_s = time.perf_counter() - t0
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                        add_generation_prompt=True)
    cache = make_cache(model, "full")
    steps = generate_step(ids, model, cache, make_sampler(0.0))
    tokens = [next(steps)]  # prefill and the first token
    offload = getattr(model, "offload", None)
    read_before = bytes_read(offload)
    read_s_before = offload.store.counters.read_seconds if offload else 0.0
    start = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        tokens.append(next(steps))
    decode_s = time.perf_counter() - start
    result = {"model": model_name, "budget": budget, "window": int(window), "load_s": load_s,
              "decode_ms_per_token": decode_s / DECODE_TOKENS * 1e3, "tokens": tokens,
              "peak_rss_bytes": peak_rss_bytes(), "peak_mlx_bytes": mx.get_peak_memory(),
              "kv_bytes": sum(c.nbytes for c in cache)}
    if offload:
        read = bytes_read(offload) - read_before
        result.update(offload.stats())
        result["bytes_read_per_token"] = read / DECODE_TOKENS
        seconds = offload.store.counters.read_seconds - read_s_before
        result["read_gbs"] = read / seconds / 1e9 if seconds else None
    return result


def bytes_read(offload) -> int:
    """Units and FFN neurons read so far (the embedding rows are not counted:
    a few KiB a token)."""
    if offload is None:
        return 0
    return offload.store.counters.bytes_read + offload.store.counters.neuron_bytes_read


def thresholded_ppl(model_name: str) -> dict:
    """Perplexity of the resident model on held-out text, dense and with the
    FFN thresholds neurons mode calibrated (what it computes, tested equal)."""
    model, tokenizer = load(model_name)
    path = thresholds_path(layout_path(resolve(model_name), "neurons"))
    thresholds = json.loads(path.read_text())[f"{FFN_SPARSITY:g}"]
    tokens = tokenizer.encode(read_text(HELD_OUT))[2000 : 2000 + PPL_TOKENS]
    inputs, targets = mx.array(tokens[:-1])[None], mx.array(tokens[1:])

    def ppl():
        logits = model(inputs)[0].astype(mx.float32)
        return math.exp(nn.losses.cross_entropy(logits, targets).mean().item())

    dense = ppl()
    with thresholded(model, thresholds):
        sparse = ppl()
    return {"dense_ppl": dense, "neurons_ppl": sparse, "ppl_ratio": sparse / dense,
            "ppl_tokens": PPL_TOKENS, "ppl_text": HELD_OUT}


def prepare_one(model_name: str, how: str) -> dict:
    """Write the layout once, in this (fresh) process, to a scratch folder:
    `streamed` (from_gguf, what prepare does for a GGUF) or `loaded` (the
    model loaded whole, then written: what it did before)."""
    source = resolve(model_name)
    scratch = Path(tempfile.mkdtemp(dir=layout_path(source).parent))
    target = scratch / "layout.safetensors"
    try:
        baseline = peak_rss_bytes()  # the interpreter, MLX and numpy imported
        t0 = time.perf_counter()
        if how == "streamed":
            from_gguf.write_layout(source, target)
        else:
            model, _ = load(model_name, dequantize=True)
            layout_file.write(model, dataclasses.asdict(model.args), target, str(source))
        seconds = time.perf_counter() - t0
        layout = layout_file.read(target)
        return {"model": model_name, "how": how, "seconds": seconds,
                "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline,
                "layout_bytes": target.stat().st_size,
                "largest_unit_bytes": max(u.nbytes for u in layout.units.values()),
                "source_bytes": source.stat().st_size}
    finally:
        shutil.rmtree(scratch)


def in_child(*args) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=os.environ)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_prepare(models) -> None:
    report = {"benchmark": "offload_prepare", "runs": []}
    for model_name in models:
        prepare(model_name)  # the scratch folder's parent exists, the source assembled
        for how in ("streamed", "loaded"):
            run = in_child("--prepare-one", model_name, how)
            report["runs"].append(run)
            print(f"{model_name} {how}: {run['seconds']:.1f} s, peak RSS "
                  f"{run['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    write_result("offload_prepare", report)


def neuron_runs(model_name: str, entry: dict, bandwidth: float) -> None:
    """Neurons mode at its defaults beside exact mode's runs in `entry`."""
    # Neurons mode: its layout, then a first load calibrates its thresholds
    # (kept for the rest).
    prepare(model_name, mode="neurons")
    in_child("--one", model_name, "100%", "neurons", "0")
    entry.update(thresholded_ppl(model_name), ffn_sparsity=FFN_SPARSITY, neuron_runs=[])
    for budget, window in NEURON_RUNS:
        run = in_child("--one", model_name, budget, "neurons", str(window))
        run["limit_ms_per_token"] = run["bytes_read_per_token"] / (bandwidth * 1e9) * 1e3
        run["identical_to_resident"] = run["tokens"] == entry["runs"][0]["tokens"]
        entry["neuron_runs"].append(run)
        print(f"  neurons {budget}, window {window}: {run['decode_ms_per_token']:.0f} "
              f"ms/token, {run['bytes_read_per_token'] / 2**20:.0f} MiB read/token, "
              f"identical {run['identical_to_resident']}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=None)
    parser.add_argument("--prepare", action="store_true",
                        help="measure writing the layout (seconds, peak RSS), streamed from "
                        "the GGUF and from the model loaded whole")
    parser.add_argument("--neurons-only", action="store_true",
                        help="measure neurons mode again, keeping the exact-mode runs of the "
                        "last result file")
    parser.add_argument("--one", nargs="+", metavar="MODEL BUDGET [MODE WINDOW]",
                        help=argparse.SUPPRESS)
    parser.add_argument("--prepare-one", nargs=2, metavar=("MODEL", "HOW"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    if args.prepare_one:
        print(json.dumps(prepare_one(*args.prepare_one)))
        return
    models = (args.models.split(",") if args.models else
              ["smollm2"] if args.quick else ["smollm2", "qwen2.5-coder-0.5b"])
    if args.prepare:
        measure_prepare(models + ([] if args.models else ["gemma3-270m"]))
        return
    name = "offload_quick" if args.quick else "offload"
    report = {"benchmark": "offload", "quick": args.quick, "decode_tokens": DECODE_TOKENS,
              "prompt": PROMPT, "models": []}
    earlier = {}
    if args.neurons_only:
        kept = json.loads((RESULTS / f"{name}.json").read_text())
        earlier = {e["model"]: e for e in kept["models"]}
        report["exact_mode_from"] = kept.get("exact_mode_from", kept["provenance"])
    for model_name in models:
        layout = prepare(model_name)
        if model_name in earlier:
            entry = {k: v for k, v in earlier[model_name].items() if k == "runs" or
                     k in ("model", "layout_bytes", "disk_read_gbs")}
            bandwidth = entry["disk_read_gbs"]
            report["models"].append(entry)
            neuron_runs(model_name, entry, bandwidth)
            write_result(name, report)
            continue
        bandwidth = disk_read_gbs(layout)
        entry = {"model": model_name, "layout_bytes": layout.stat().st_size,
                 "disk_read_gbs": bandwidth, "runs": []}
        print(f"{model_name}: layout {layout.stat().st_size / 2**20:.0f} MiB, disk "
              f"{bandwidth:.2f} GB/s", flush=True)
        for budget in ["resident"] + BUDGETS + ["naive"]:
            run = in_child("--one", model_name, budget)
            if budget != "resident":
                left_out = run["streamed_bytes_per_pass"]
                run["limit_ms_per_token"] = left_out / (bandwidth * 1e9) * 1e3
                run["ratio_to_limit"] = run["decode_ms_per_token"] / run["limit_ms_per_token"]
                run["identical_to_resident"] = run["tokens"] == entry["runs"][0]["tokens"]
            entry["runs"].append(run)
            print(f"  {budget}: {run['decode_ms_per_token']:.0f} ms/token, peak RSS "
                  f"{run['peak_rss_bytes'] / 2**20:.0f} MiB"
                  + (f", {run['bytes_read_per_token'] / 2**20:.0f} MiB read/token, "
                     f"{run['ratio_to_limit']:.2f}x the limit, identical "
                     f"{run['identical_to_resident']}" if budget != "resident" else ""),
                  flush=True)
        neuron_runs(model_name, entry, bandwidth)
        report["models"].append(entry)
        write_result(name, report)


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
