"""Where a quantized decode step's time goes, against the full cache's, for one
layer's attention on the current MLX device, side by side in one run:

- graph: MLX primitives in one decode step of one SmolLM2 layer (the policy's
  `attend`: RoPE, append, attention), and what one small primitive costs to
  build and run (a chain of 1000 adds, divided by 1000);
- parts, at N rows, in SmolLM2-135M's shape (9 query heads, 3 KV heads, head
  dim 64) and Llama-3.1-8B's (32, 8, 128): the scores, the softmax and the
  weighted sum of values, each over float32 rows (the full cache's arithmetic)
  and over packed 8/4-bit rows (our path on this device, group size 64), and
  MLX's fused attention over float32 rows (what the full cache calls).

    python benchmarks/quantized_decode.py [--quick] [--rows 1024 4352]

Writes benchmarks/results/quantized_decode_<backend>.json.
"""

import argparse
import io

import mlx.core as mx
import mlx.nn as nn
from common import device_label, timed, write_result

from mlx_kvcache.policies import POLICIES
from mlx_kvcache.quantized_attention import packed_scores, packed_weighted_sum

SHAPES = {"SmolLM2-135M": (9, 3, 64), "Llama-3.1-8B": (32, 8, 128)}  # query heads, KV heads, dim
N_Q_HEADS, N_KV_HEADS, HEAD_DIM = SHAPES["SmolLM2-135M"]  # the model that runs here
GROUP_SIZE = 64
CACHES = {"full": ("full", {}), "quantized 8-bit": ("quantized", {"kv_bits": 8}),
          "quantized 4-bit": ("quantized", {"kv_bits": 4})}


def primitives(arrays) -> int:
    """Primitives in the unevaluated graph behind `arrays` (their DOT export
    draws each primitive as a rectangle)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *arrays)
    return dot.getvalue().count("shape=rectangle")


def held_arrays(obj) -> list:
    """Every array an object holds, through tuples and nested objects."""
    if isinstance(obj, mx.array):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [a for item in obj for a in held_arrays(item)]
    if hasattr(obj, "__dict__"):
        return [a for value in vars(obj).values() for a in held_arrays(value)]
    return []


def decode_step_primitives(policy: str, args: dict, context: int) -> int:
    cache = POLICIES[policy](**args)
    rope = nn.RoPE(HEAD_DIM, base=100000)

    def qkv(n):
        return [mx.random.normal((1, h, n, HEAD_DIM)) for h in (N_Q_HEADS, N_KV_HEADS, N_KV_HEADS)]

    mx.eval(cache.attend(*qkv(context), rope=rope, scale=0.125, mask="causal"), cache.state)
    step = qkv(1)
    mx.eval(step)
    out = cache.attend(*step, rope=rope, scale=0.125, mask=None)
    return primitives([out] + held_arrays(cache))  # the output and the updated buffers


def primitive_cost_us(repeats: int) -> float:
    x = mx.ones((N_Q_HEADS, HEAD_DIM))
    mx.eval(x)

    def chain():
        y = x
        for _ in range(1000):
            y = y + 1
        return y
    return timed(chain, repeats)  # ms for 1000 = us for one


def parts(shape: str, rows: int, repeats: int) -> dict:
    n_q_heads, n_kv_heads, head_dim = SHAPES[shape]
    q = mx.random.normal((1, n_kv_heads, n_q_heads // n_kv_heads, head_dim))
    keys, values = (mx.random.normal((1, n_kv_heads, rows, head_dim)) for _ in range(2))
    logits = q @ keys.swapaxes(-1, -2)
    probs = mx.softmax(logits, axis=-1, precise=True)
    mx.eval(q, keys, values, logits, probs)
    q_heads = q.reshape(1, n_q_heads, 1, head_dim)
    row = {"shape": shape, "rows": rows,
           "float32": {"scores": timed(lambda: q @ keys.swapaxes(-1, -2), repeats),
                       "softmax": timed(lambda: mx.softmax(logits, axis=-1, precise=True),
                                        repeats),
                       "weighted_sum": timed(lambda: probs @ values, repeats),
                       "fused_sdpa": timed(lambda: mx.fast.scaled_dot_product_attention(
                           q_heads, keys, values, scale=1.0), repeats)}}
    for bits in (8, 4):
        packed_keys = mx.quantize(keys, GROUP_SIZE, bits)
        packed_values = mx.quantize(values, GROUP_SIZE, bits)
        mx.eval(packed_keys, packed_values)
        row[f"{bits}-bit"] = {
            "scores": timed(lambda: packed_scores(q, packed_keys, bits, GROUP_SIZE), repeats),
            "weighted_sum": timed(lambda: packed_weighted_sum(
                probs, packed_values, bits, GROUP_SIZE), repeats)}
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 4352],
                        help="cache rows for the parts (4352: a 4K context's buffer)")
    parser.add_argument("--repeats", type=int, help="timed runs per part (default 200, quick 50)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    args.repeats = args.repeats or (50 if args.quick else 200)
    mx.random.seed(0)
    graph = {label: decode_step_primitives(policy, policy_args, 1000)
             for label, (policy, policy_args) in CACHES.items()}
    result = {"benchmark": "quantized_decode", "shapes": SHAPES, "group_size": GROUP_SIZE,
              "repeats": args.repeats, "primitives_per_decode_step": graph,
              "us_per_small_primitive": primitive_cost_us(args.repeats // 10),
              "parts_ms": [parts(shape, rows, args.repeats)
                           for shape in SHAPES for rows in args.rows]}
    path = write_result(f"quantized_decode_{device_label()}", result)
    print(path)


if __name__ == "__main__":
    main()
