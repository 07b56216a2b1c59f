"""What tests/test_distributed.py compares: greedy tokens under full and a
small-budget RefreshKV, the prompt's last logits, and RefreshKV's retained
indices per layer and KV head. Run alone it is the reference; under mlx.launch
each rank shards the model and reports its own heads (DIR/rankN.json).

    mlx.launch -n 2 --backend ring python -m tests.sharded_run DIR"""

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from mlx_kvcache import load, make_cache
from mlx_kvcache.distributed import shard, world
from mlx_kvcache.generate import generate_step

MODEL = "qwen2.5-coder-0.5b"
PROMPT = "Write a Python function that returns the square of x."
SETTINGS = [("full", {}), ("refreshkv", {"budget": 16})]


def run(model, tokenizer, n_tokens: int = 10) -> dict:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                        add_generation_prompt=True)
    report = {"last_logits": model(mx.array(ids)[None])[0, -1].tolist()}
    for policy, args in SETTINGS:
        cache = make_cache(model, policy, **args)
        steps = generate_step(ids, model, cache, make_sampler(0.0))
        report[policy] = {"tokens": [next(steps) for _ in range(n_tokens)],
                          "kv_bytes": sum(c.nbytes for c in cache)}
        if policy == "refreshkv":
            report[policy]["retained"] = [sorted_per_head(c.retained) for c in cache]
    return report


# Every registered policy, at a budget smaller than the prompt where it has one.
COUNTED = {"full": {}, "streaming": {"budget": 16}, "snapkv": {"budget": 16, "window": 8},
           "h2o": {"budget": 16}, "refreshkv": {"budget": 16}, "mixed": {"budget": 16},
           "quantized": {}, "kivi": {}}


def collectives_per_step(model, ids, policy, args, steps: int = 2) -> dict:
    """The all-sums one decode step sends (calls and bytes), counted where the
    model and the policies call them, after the prompt."""
    cache = make_cache(model, policy, **args)
    tokens = generate_step(ids, model, cache, make_sampler(0.0))
    next(tokens)
    sent, all_sum = [], mx.distributed.all_sum

    def counted(x, **kwargs):
        sent.append(x.nbytes)
        return all_sum(x, **kwargs)

    mx.distributed.all_sum = counted
    try:
        for _ in range(steps):  # each builds one more step
            next(tokens)
    finally:
        mx.distributed.all_sum = all_sum
    return {"calls": len(sent) / steps, "bytes": sum(sent) / steps}


def sorted_per_head(retained: mx.array) -> list:
    return mx.sort(retained[0], axis=-1).tolist()  # [KV heads, budget]


if __name__ == "__main__":
    # Each rank writes its own file: the launcher interleaves the ranks' long lines.
    group = world()
    model, tokenizer = load(MODEL)
    if group is not None:
        shard(model, group)
    rank = group.rank() if group else 0
    report = {"rank": rank, **run(model, tokenizer)}
    if group is not None:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                            add_generation_prompt=True)
        report["collectives"] = {policy: collectives_per_step(model, ids, policy, args)
                                 for policy, args in COUNTED.items()}
    out = Path(sys.argv[1]) / f"rank{rank}.json"
    out.write_text(json.dumps(report))
