"""StreamingLLM past the trained context: feed a long real text to SmolLM2
(8K context) one token at a time under `streaming`, and report perplexity per
block of tokens. With positions="cache" (keys rotated by their slot) RoPE
positions never exceed the budget, so the model should keep going at 2x its
context; with positions="original" they pass 8K.

    python benchmarks/streaming_past_context.py --positions cache [--tokens 16640]

Writes benchmarks/results/streaming_past_context_<positions>.json.
"""

import argparse
import gzip
import json
import math
import time

import mlx.core as mx
from common import write_result

from mlx_kvcache import load, make_cache

TEXT = "/usr/share/info/coreutils.info.gz"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", choices=["cache", "original"], default="cache")
    parser.add_argument("--tokens", type=int, default=2 * 8192 + 256)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--block", type=int, default=1024)
    args = parser.parse_args()

    model, tokenizer = load("smollm2")
    with gzip.open(TEXT, "rt") as f:
        tokens = tokenizer.encode(f.read())[: args.tokens + 1]
    cache = make_cache(model, "streaming", budget=args.budget, sinks=4, positions=args.positions)
    nll = []
    start = time.perf_counter()
    for i in range(args.tokens):
        logits = model(mx.array([[tokens[i]]]), cache=cache)[0, -1].astype(mx.float32)
        nll.append(mx.logsumexp(logits) - logits[tokens[i + 1]])
        if (i + 1) % 256 == 0:
            mx.eval(nll)
            nll = [x.item() if isinstance(x, mx.array) else x for x in nll]
            print(f"{i + 1} tokens, {time.perf_counter() - start:.0f} s, "
                  f"ppl(last 256) {math.exp(sum(nll[-256:]) / 256):.2f}", flush=True)
    mx.eval(nll)
    nll = [x.item() if isinstance(x, mx.array) else x for x in nll]
    blocks = [{"from": b, "to": min(b + args.block, len(nll)),
               "ppl": math.exp(sum(nll[b : b + args.block]) / len(nll[b : b + args.block]))}
              for b in range(0, len(nll), args.block)]
    result = {
        "benchmark": "streaming_past_context", "model": model.source,
        "context_length": model.context_length, "text": TEXT, "tokens": args.tokens,
        "policy": {"name": "streaming", "budget": args.budget, "sinks": 4,
                   "positions": args.positions},
        "ppl_last_256": math.exp(sum(nll[-256:]) / 256), "blocks": blocks,
        "seconds": time.perf_counter() - start, "device": str(mx.default_device()),
        "mlx": mx.__version__,
    }
    write_result(f"streaming_past_context_{args.positions}", result)
    print(json.dumps({k: result[k] for k in ("policy", "ppl_last_256", "seconds")}))


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
