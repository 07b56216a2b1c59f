"""One model over several machines with MLX's own distributed layer:
`mlx.launch -n N -- python -m mlx_kvcache.generate ...` starts one process per
rank, and the model is sharded tensor-parallel as mlx-lm shards it (query,
key and value projections split by heads, output and down projections summed
across ranks). Each rank's cache holds only its own KV heads, and every
policy's choice (window, scores, retained set) is per KV head, so a policy
runs on its rank's heads alone: nothing crosses ranks but the model's own
two all-sums per layer and RefreshKV's query schedule, which averages the
query over every head (policies/refreshkv.py).

A sharded process decides nothing alone that the others must follow: what
rank 0 reads (a chat line, a document, whether a session file exists) is
sent to every rank, and a step that can fail on one rank (writing or reading
its shard of a cache) is agreed on by all before anyone goes on.
"""

import json
import os
from typing import Any, Optional

import mlx.core as mx

from mlx_kvcache.errors import UserError

# The ports with a shard(group); Gemma 3's is not written yet.
SHARDABLE = ("llama", "mistral", "qwen2", "qwen3")


def world() -> Optional[mx.distributed.Group]:
    """The group of this process's ranks, None when it runs alone."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def shard(model, group: mx.distributed.Group) -> None:
    """Shard `model` over `group`, refusing head counts that do not divide."""
    args, n = model.args, group.size()
    if args.model_type not in SHARDABLE:
        raise UserError(f"{args.model_type} models cannot be sharded yet (sharded: "
                        f"{', '.join(SHARDABLE)})")
    counts = {"query heads": args.num_attention_heads, "KV heads": args.num_key_value_heads,
              "FFN neurons": args.intermediate_size}
    bad = [f"{count} {what}" for what, count in counts.items() if count % n]
    if bad:
        raise UserError(f"cannot shard this model over {n} ranks: {', '.join(bad)} do not "
                        f"divide by {n}")
    model.shard(group)
    # The shards are slices of the whole weights: evaluated, the whole ones go.
    mx.eval(model.parameters())


def rank0_int(group: mx.distributed.Group, value: int) -> int:
    """Rank 0's `value` (an int below 2**31) on every rank."""
    return int(mx.distributed.all_sum(mx.array(value if group.rank() == 0 else 0,
                                               dtype=mx.int32), group=group).item())


def shared_seed(group: mx.distributed.Group, seed: Optional[int]) -> int:
    """One sampling seed for every rank (rank 0's), so ranks sample alike."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") >> 1
    return rank0_int(group, seed)


def from_rank0(group: Optional[mx.distributed.Group], value: Any = None) -> Any:
    """Rank 0's `value` (anything JSON can carry) on every rank; the others'
    `value` is ignored. Alone, `value` itself."""
    if group is None:
        return value
    data = json.dumps(value).encode() if group.rank() == 0 else b""
    size = rank0_int(group, len(data))
    sent = (mx.array(list(data), dtype=mx.uint8) if group.rank() == 0
            else mx.zeros((size,), dtype=mx.uint8))
    received = bytes(mx.distributed.all_sum(sent, group=group).tolist())
    return json.loads(received.decode())


def everyone(group: Optional[mx.distributed.Group], ok: bool) -> bool:
    """Whether `ok` holds on every rank; every rank must ask, whatever its
    own `ok`, so that none waits for one that gave up."""
    if group is None:
        return ok
    return int(mx.distributed.all_min(mx.array(int(ok)), group=group).item()) == 1


def same_everywhere(group: Optional[mx.distributed.Group], value: int) -> bool:
    """Whether every rank holds the same int."""
    if group is None:
        return True
    x = mx.array(value, dtype=mx.int64)
    return (mx.distributed.all_max(x, group=group).item()
            == mx.distributed.all_min(x, group=group).item())


def speaks(group: Optional[mx.distributed.Group]) -> bool:
    """Whether this process prints the run's output: rank 0 speaks for all.
    The others' standard output goes to /dev/null; their errors still print
    (a rank can fail alone: a file missing on its host)."""
    if group is None or group.rank() == 0:
        return True
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
    return False
