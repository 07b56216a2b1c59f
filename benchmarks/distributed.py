"""The model sharded over N ranks (MLX's ring backend, `mlx.launch`), every
policy: per-rank KV bytes and peak memory, decode ms/token, and what the
collectives cost per token.

Each configuration runs in fresh processes: N = 1 alone, N = 2 as two local
ranks on 127.0.0.1, each with its share of the cores. A long prompt (a stretch of the coreutils manual) is
prefilled, then tokens are decoded greedily. The collectives' cost is timed on
their own, in the same processes after the run: the model's two all-sums per
layer of one token's hidden state, repeated, per token. On two cores the
ranks share the CPU, so sharding cannot be faster here; what a multi-machine
user reads off this is memory per rank and what the collectives cost.

    python benchmarks/distributed.py --quick    # 1K tokens; full, streaming, refreshkv
    python benchmarks/distributed.py            # 4K tokens; every policy

Writes benchmarks/results/distributed.json (distributed_quick.json).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
from common import write_result

from mlx_kvcache import load, make_cache
from mlx_kvcache.distributed import shard, world
from mlx_kvcache.evaluate import prefill, read_text

MODEL = "qwen2.5-coder-0.5b"
TEXT = "/usr/share/info/coreutils.info.gz"
DECODE_TOKENS = 16
COLLECTIVE_REPEATS = 20
POLICIES = {"full": {}, "streaming": {"budget_ratio": 1 / 8}, "snapkv": {"budget_ratio": 1 / 8},
            "h2o": {"budget_ratio": 1 / 8}, "refreshkv": {"budget_ratio": 1 / 8},
            "mixed": {"budget_ratio": 1 / 8}, "quantized": {"kv_bits": 4}, "kivi": {"kv_bits": 4}}
QUICK = ["full", "streaming", "refreshkv"]
LAUNCH = Path(sys.executable).parent / "mlx.launch"


def run_one(policy: str, context: int) -> dict:
    """One configuration on this rank (or alone)."""
    group = world()
    model, tokenizer = load(MODEL)
    if group is not None:
        shard(model, group)
    tokens = tokenizer.encode(read_text(TEXT)[30000:30000 + context * 8])[:context]
    cache = make_cache(model, policy, **POLICIES[policy])
    mx.reset_peak_memory()
    start = time.perf_counter()
    prefill(model, cache, tokens[:-1])
    prefill_s = time.perf_counter() - start
    token = tokens[-1]
    start = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        logits = model(mx.array([[token]]), cache=cache)
        token = int(mx.argmax(logits[0, -1]).item())
    decode_ms = (time.perf_counter() - start) / DECODE_TOKENS * 1e3
    result = {"policy": policy, "ranks": group.size() if group else 1,
              "rank": group.rank() if group else 0, "context": len(tokens),
              "prefill_s": prefill_s, "decode_ms_per_token": decode_ms,
              "kv_bytes": sum(c.nbytes for c in cache), "peak_mlx_bytes": mx.get_peak_memory()}
    if group is not None:
        # The model's own collectives: two all-sums per layer of one token's
        # hidden state (after o_proj and after down_proj).
        hidden = mx.zeros((1, 1, model.args.hidden_size))
        per_token = 2 * len(model.layers)
        mx.eval(mx.distributed.all_sum(hidden, group=group))
        start = time.perf_counter()
        for _ in range(COLLECTIVE_REPEATS):
            for _ in range(per_token):
                mx.eval(mx.distributed.all_sum(hidden, group=group))
        result["collectives_ms_per_token"] = (
            (time.perf_counter() - start) / COLLECTIVE_REPEATS * 1e3)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("POLICY", "CONTEXT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_one(args.one[0], int(args.one[1]))
        if result["rank"] == 0:
            print(json.dumps(result), flush=True)
        return
    context = 1024 if args.quick else 4096
    report = {"benchmark": "distributed", "model": MODEL, "quick": args.quick,
              "context": context, "decode_tokens": DECODE_TOKENS, "runs": []}
    for policy in (QUICK if args.quick else list(POLICIES)):
        for ranks in (1, 2):
            command = [sys.executable, __file__, "--one", policy, str(context)]
            env = dict(os.environ)
            if ranks > 1:
                command = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", *command]
                # Ranks on one machine split its cores: with OpenBLAS's threads
                # on every core in every rank, each all-sum waits for the
                # scheduler (measured: 2.5 s/token at 4K on two ranks, 0.18 alone).
                env["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
            done = subprocess.run(command, capture_output=True, text=True, env=env,
                                  stdin=subprocess.DEVNULL)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{policy} on {ranks} ranks: {done.stderr.strip()[-500:]}")
            run = json.loads(lines[-1])
            report["runs"].append(run)
            print(f"{policy}, {ranks} rank(s): {run['decode_ms_per_token']:.0f} ms/token, KV "
                  f"{run['kv_bytes'] / 2**20:.1f} MiB, peak {run['peak_mlx_bytes'] / 2**20:.0f}"
                  f" MiB per rank" + (f", collectives {run['collectives_ms_per_token']:.1f} "
                                      "ms/token" if ranks > 1 else ""), flush=True)
            write_result("distributed_quick" if args.quick else "distributed", report)


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
