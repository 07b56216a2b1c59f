"""Decode ms/token, prefill tokens/s, bytes held and peak memory against
context length, for every policy and mlx-lm's own caches, in one process,
interleaved and repeated so noise shows. SmolLM2 (or --model) on real text
(coreutils manual).

    python benchmarks/speed.py [--quick] [--contexts 1024 4096] [--caches full quantized]
    python benchmarks/speed.py --model qwen2.5-coder-0.5b --contexts 1024 2048 4096 8192

Full, SnapKV and RefreshKV over a float cache read a prompt with full
attention and hold what full holds, so at each context they (and mlx-lm's
KVCache) continue one shared full prefill (evaluate.continue_from_full, tested
bit-exact) instead of each reading the prompt again; their prefill column is
that shared prefill's. Every other cache reads the prompt itself.

Writes benchmarks/results/speed_<backend>.json. Each row also carries the
roofline: bytes a decode step must move (weights + attended KV) over the best
memory bandwidth the probes measured (common.memory_bandwidth_gbs), as a
fraction of the measured step time.
"""

import argparse
import gzip
import statistics
import time

import mlx.core as mx
from common import (MLX_LM_CACHES, OUR_POLICIES, device_label, memory_bandwidth_gbs,
                    with_budget, write_result)

from long_context import MlxLmKVCache

from mlx_kvcache import load, make_cache
from mlx_kvcache.evaluate import FORK_TAIL, PolicySpec, continue_from_full
from mlx_kvcache.loading import parameter_bytes
from mlx_kvcache.policies.registry import reads_prompts_in_full
from tests.helpers import mlx_lm_twin

TEXT = "/usr/share/info/coreutils.info.gz"


def prefill(model, cache, prompt):
    for i in range(0, len(prompt) - 1, 2048):
        model(mx.array(prompt[i : min(i + 2048, len(prompt) - 1)])[None], cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(mx.array(prompt[-1:])[None], cache=cache)
    token = logits[0, -1].argmax()
    mx.eval(token)
    return token


def prefill_shared(model, prompt):
    """A full cache that has read all of `prompt` but its last FORK_TAIL + 1
    tokens, and the seconds it took."""
    cache = make_cache(model, "full")
    start = time.perf_counter()
    for i in range(0, len(prompt) - 1 - FORK_TAIL, 2048):
        model(mx.array(prompt[i : min(i + 2048, len(prompt) - 1 - FORK_TAIL)])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache, time.perf_counter() - start


def fork(model, policy, policy_args, shared, prompt):
    """`policy`'s cache after `prompt`, continuing the shared full prefill, and
    the first generated token."""
    if model.__module__.startswith("mlx_lm"):  # mlx-lm's KVCache, from the same keys
        cache = MlxLmKVCache(model).start_from(shared, prompt)
    else:
        cache = continue_from_full(model, PolicySpec(policy, policy_args), shared, prompt)
    token = model(mx.array(prompt[-1:])[None], cache=cache)[0, -1].argmax()
    mx.eval(token)
    return cache, token


def decode(model, cache, token, steps):
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token.reshape(1, 1), cache=cache)[0, -1].argmax()
        mx.eval(token)
    return token, (time.perf_counter() - start) / steps * 1e3


def attended_bytes(label, cache, context, budget, row_bytes):
    """KV bytes a decode step reads: every row held for caches that attend to
    all they hold; `budget` full-precision rows for streaming, snapkv, h2o and
    refreshkv's partial steps (its refresh steps read all keys)."""
    if label.startswith(("streaming", "snapkv", "h2o", "refreshkv")):
        return budget * row_bytes
    if label in ("full", "mlx-lm KVCache"):
        return context * row_bytes
    return sum(c.nbytes for c in cache)  # quantized: what is held is what is read


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--contexts", type=int, nargs="+", help="context lengths to measure")
    parser.add_argument("--caches", nargs="+", help="only the caches whose label starts "
                        "with one of these (e.g. full quantized 'mlx-lm Quantized')")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 3 quick, 5)")
    parser.add_argument("--name", help="result file name (default speed_<backend>)")
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    contexts = args.contexts or ([1024] if args.quick else [1024, 2048, 4096, 8000])
    repeats, steps = (3, 8) if args.quick else (5, 16)
    repeats = args.repeats or repeats
    wanted = lambda label: not args.caches or label.startswith(tuple(args.caches))  # noqa: E731

    model, tokenizer = load(args.model)
    twin = mlx_lm_twin(model)
    with gzip.open(TEXT, "rt") as f:
        tokens = tokenizer.encode(f.read()[: 60 * max(contexts)], add_special_tokens=False)
    bandwidth, bandwidth_probes = memory_bandwidth_gbs()
    weight_bytes = parameter_bytes(model)
    a = model.args
    row_bytes = a.num_hidden_layers * a.num_key_value_heads * (a.hidden_size // a.num_attention_heads) * 2 * 4
    rows = []
    for context in contexts:
        prompt = tokens[:context]
        budget = context // 8
        runs, forked = {}, set()
        for label, (policy, policy_args) in OUR_POLICIES.items():
            if not wanted(label):
                continue
            policy_args = with_budget(policy, policy_args, budget)
            runs[label] = (model, lambda p=policy, pa=policy_args: make_cache(model, p, **pa))
            if reads_prompts_in_full(policy, policy_args):
                forked.add(label)
                runs[label] = (model, (policy, policy_args))
        for label, factory in MLX_LM_CACHES.items():
            if not wanted(label):
                continue
            runs[label] = (twin, lambda f=factory: [f(budget) for _ in twin.layers])
            if label == "mlx-lm KVCache":
                forked.add(label)
        shared, shared_s = prefill_shared(model, prompt) if forked else (None, None)
        state = {}
        for label, (m, build) in runs.items():
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            start = time.perf_counter()
            if label in forked:
                policy, policy_args = build if isinstance(build, tuple) else ("full", {})
                cache, token = fork(m, policy, policy_args, shared, prompt)
                prefill_s = shared_s + time.perf_counter() - start
            else:
                cache = build()
                token = prefill(m, cache, prompt)
                prefill_s = time.perf_counter() - start
            token, _ = decode(m, cache, token, steps)  # warm-up round
            state[label] = {"cache": cache, "token": token, "ms": [], "prefill_s": prefill_s,
                            "peak_delta": mx.get_peak_memory() - base}
            print(f"{context} {label}: prefill {context / prefill_s:.0f} tok/s", flush=True)
        for _ in range(repeats):
            for label, (m, _) in runs.items():
                s = state[label]
                s["token"], ms = decode(m, s["cache"], s["token"], steps)
                s["ms"].append(ms)
        for label, s in state.items():
            ms = statistics.median(s["ms"])
            moved = weight_bytes + attended_bytes(label, s["cache"], context, budget, row_bytes)
            kv_bytes = sum(c.nbytes for c in s["cache"])
            budgeted = label.startswith(("streaming", "snapkv", "h2o", "refreshkv", "mixed",
                                         "mlx-lm Rotating"))
            row = {"context": context, "cache": label, "budget": budget if budgeted else None,
                   "forked": label in forked,
                   "decode_ms_per_token": ms, "decode_ms_all": s["ms"],
                   "prefill_tok_per_s": context / s["prefill_s"], "kv_bytes": kv_bytes,
                   "peak_memory_delta_bytes": s["peak_delta"],
                   "bytes_moved_per_step": moved,
                   "roofline_fraction": (moved / (bandwidth * 1e9)) / (ms / 1e3)}
            rows.append(row)
            print(f"{context} {label}: {ms:.1f} ms/token (range {min(s['ms']):.1f}-"
                  f"{max(s['ms']):.1f}), kv {kv_bytes / 2**20:.1f} MiB", flush=True)
        del state, shared
        mx.clear_cache()
    write_result(args.name or f"speed_{device_label()}", {
        "benchmark": "speed", "model": model.source, "text": TEXT, "quick": args.quick,
        "repeats": repeats, "steps_per_repeat": steps, "budget": "context/8",
        "bandwidth_gb_per_s": bandwidth, "bandwidth_probes_gb_per_s": bandwidth_probes,
        "weight_bytes": weight_bytes, "rows": rows})


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
