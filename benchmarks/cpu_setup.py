"""Linux CPU notes, measured: what the OpenBLAS preload and dequantized weights
do to SmolLM2's prefill and decode speed on the CPU backend.

Each setting runs `python -m mlx_kvcache.generate` in its own process (the BLAS
library is chosen when the process starts), interleaved and repeated; the
median is reported. Writes benchmarks/results/cpu_setup.{json,md}.

    python benchmarks/cpu_setup.py [--repeats 2] [--prompt-chars 2400]
"""

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
TEXT = "/usr/share/info/coreutils.info.gz"
RESULTS = Path(__file__).parent / "results"

SETTINGS = [
    ("reference BLAS, quantized weights", False, True),
    ("reference BLAS, dequantized float32", False, False),
    ("OpenBLAS, quantized weights", True, True),
    ("OpenBLAS, dequantized float32 (default)", True, False),
]


def run_once(prompt_file, openblas, keep_quantized, max_tokens):
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if openblas:
        env["LD_PRELOAD"] = OPENBLAS
    with tempfile.TemporaryDirectory() as tmp:
        stats_file = Path(tmp) / "stats.json"
        cmd = [sys.executable, "-m", "mlx_kvcache.generate", "--prompt-file", prompt_file,
               "--ignore-chat-template", "--max-tokens", str(max_tokens),
               "--stats-json", str(stats_file)]
        if keep_quantized:
            cmd.append("--keep-quantized")
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        return json.loads(stats_file.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompt-chars", type=int, default=2400)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if not os.path.exists(OPENBLAS):
        sys.exit(f"error: {OPENBLAS} missing: apt-get install libopenblas0-pthread")

    with gzip.open(TEXT, "rt") as f:
        text = f.read()[20000 : 20000 + args.prompt_chars]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
        prompt_file = f.name

    runs = {name: [] for name, _, _ in SETTINGS}
    for _ in range(args.repeats):
        for name, openblas, quantized in SETTINGS:
            runs[name].append(run_once(prompt_file, openblas, quantized, args.max_tokens))
            print(name, runs[name][-1]["prefill_tok_per_s"], runs[name][-1]["decode_tok_per_s"],
                  file=sys.stderr)
    os.unlink(prompt_file)

    rows = []
    baseline = None
    for name, openblas, quantized in SETTINGS:
        prefill = statistics.median(r["prefill_tok_per_s"] for r in runs[name])
        decode = statistics.median(r["decode_tok_per_s"] for r in runs[name])
        rows.append({"setting": name, "openblas": openblas, "quantized_weights": quantized,
                     "prefill_tok_per_s": prefill, "decode_tok_per_s": decode,
                     "prompt_tokens": runs[name][0]["prompt_tokens"],
                     "runs": runs[name]})
        baseline = baseline or rows[0]
    result = {
        "benchmark": "cpu_setup", "model": runs[SETTINGS[0][0]][0]["model"],
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "mlx": mx.__version__, "device": str(mx.default_device()),
        "repeats": args.repeats, "text": TEXT, "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_setup.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"SmolLM2-135M (GGUF Q4_1), {rows[0]['prompt_tokens']}-token prompt from "
        f"coreutils.info, {args.max_tokens} tokens generated; {result['machine']}, "
        f"MLX {mx.__version__}; median of {args.repeats}.",
        "",
        "| setting | prefill tok/s | decode tok/s | prefill vs slowest | decode vs slowest |",
        "|---|---:|---:|---:|---:|",
    ]
    slow_p = min(r["prefill_tok_per_s"] for r in rows)
    slow_d = min(r["decode_tok_per_s"] for r in rows)
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['prefill_tok_per_s']:.1f} | {r['decode_tok_per_s']:.1f} "
            f"| {r['prefill_tok_per_s'] / slow_p:.1f}x | {r['decode_tok_per_s'] / slow_d:.1f}x |"
        )
    (RESULTS / "cpu_setup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
