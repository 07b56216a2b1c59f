"""Quantized and mixed-precision KV: round-trip error bounds, blocked attention,
agreement with `full` where nothing (or 8-bit only) is lossy, real bytes."""

from itertools import chain

import mlx.core as mx
import pytest

from mlx_kvcache import UserError, cpu_attention, make_cache
from mlx_kvcache.attention import dense
from mlx_kvcache import quantized_attention
from mlx_kvcache.quantized_attention import attend_quantized, blocked_attention
from mlx_kvcache.quantized_kv import QuantizedKV
from tests.helpers import tiny_model
from tests.test_policies import run_logits

PROMPT = [(7 * i + 3) % 256 for i in range(200)]
# 8-bit KV on a random-weight model moves logits by ~1e-2 (measured 0.012 here);
# a bound 4x that catches a wrong scale, a wrong group or a dropped token.
EIGHT_BIT_LOGIT_TOL = 0.05


def affine_step(x, group_size, bits):
    """Largest quantization step of each group: (max - min) / (2^bits - 1)."""
    g = x.reshape(*x.shape[:-1], -1, group_size)
    return (g.max(-1) - g.min(-1)) / (2**bits - 1)


@pytest.mark.parametrize("causal", [True, False])
def test_a_large_cpu_prompt_chunk_takes_dense_attention_over_the_dequantized_blocks(
        monkeypatch, causal):
    # A prompt chunk on the CPU over many keys: the blocks dequantized once and
    # handed to numpy's softmax (cpu_attention) instead of MLX's online one.
    # Queries continue a cache (200 of 500 keys); the last block is the newest
    # (mixed precision's important rows, KIVI's recent ones).
    mx.random.seed(1)
    q = mx.random.normal((1, 8, 200, 32))
    k, v = mx.random.normal((1, 2, 500, 32)), mx.random.normal((1, 2, 500, 32))
    blocks = [(s, k[:, :, s : s + 128], v[:, :, s : s + 128]) for s in range(0, 500, 128)]
    online = blocked_attention(q, lambda: blocks, 500, 0.2, causal=causal)
    expected = dense(q, k, v, scale=0.2, mask="causal" if causal else None)
    routed = []
    dense_numpy = cpu_attention.dense
    monkeypatch.setattr(cpu_attention, "dense",
                        lambda *a, **kw: routed.append(kw["mask"]) or dense_numpy(*a, **kw))
    monkeypatch.setattr(cpu_attention, "MIN_SCORES", 0)
    got = blocked_attention(q, lambda: blocks, 500, 0.2, causal=causal)
    assert routed == ["causal" if causal else None]
    assert mx.allclose(got, online, atol=1e-5) and mx.allclose(got, expected, atol=1e-5)
    # One query (a decode step) and other dtypes keep MLX's path.
    blocked_attention(q[:, :, -1:], lambda: blocks, 500, 0.2, causal=False)
    blocked_attention(q.astype(mx.float16), lambda: blocks, 500, 0.2, causal=causal)
    assert len(routed) == 1


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64])
def test_round_trip_error_is_within_one_step(bits, group_size):
    mx.random.seed(bits)
    keys = mx.random.normal((1, 2, 300, 64))
    store = QuantizedKV(bits, group_size)
    store.append(keys[:, :, :100], keys[:, :, :100] * 2)
    store.append(keys[:, :, 100:], keys[:, :, 100:] * 2)
    got_keys, got_values = store.rows(0, 300)
    for got, want in ((got_keys, keys), (got_values, keys * 2)):
        err = mx.abs(got - want).reshape(1, 2, 300, -1, group_size).max(-1)
        # MLX's affine grid is not centred on the group's min and max: the
        # error reaches nearly one step (measured up to 0.99), never more.
        assert mx.all(err <= affine_step(want, group_size, bits) * 1.0001).item()

    def packed_bytes(tokens):  # uint32 words + float32 scale and bias per group
        return 2 * 2 * tokens * (64 * bits // 32 * 4 + 2 * (64 // group_size) * 4)

    # Real bytes: the packed buffers, grown 256 tokens at a time.
    assert packed_bytes(300) <= store.nbytes <= packed_bytes(300 + 256)


def test_blocked_attention_equals_dense():
    mx.random.seed(0)
    q = mx.random.normal((1, 8, 300, 32))  # more than QUERY_ROWS: split in passes
    k, v = mx.random.normal((1, 2, 300, 32)), mx.random.normal((1, 2, 300, 32))
    blocks = [(s, k[:, :, s : s + 64], v[:, :, s : s + 64]) for s in range(0, 300, 64)]
    assert mx.allclose(blocked_attention(q, lambda: blocks, 300, 0.2, causal=True),
                       dense(q, k, v, scale=0.2, mask="causal"), atol=1e-5)
    assert mx.allclose(blocked_attention(q[:, :, -1:], lambda: blocks, 300, 0.2, causal=False),
                       dense(q[:, :, -1:], k, v, scale=0.2), atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group_size, head_dim", [(32, 64), (64, 64), (32, 128)])
def test_decode_step_equals_dense_attention_over_the_dequantized_rows(
        bits, group_size, head_dim, monkeypatch):
    # Unpacked codes (2/4/8 bits, one or several groups per row) or dequantized
    # rows (3/6), in several score blocks, must give exactly what attention
    # over the rows the store decodes to gives.
    # 2 heads x 64 dims x float32 = 512 bytes a row: 256 rows a pass (128 at dim 128)
    monkeypatch.setattr(quantized_attention, "SCORE_BYTES", 1 << 17)
    mx.random.seed(bits)
    store = QuantizedKV(bits, group_size)
    k, v = mx.random.normal((1, 2, 700, head_dim)), mx.random.normal((1, 2, 700, head_dim))
    store.append(k, v)
    q = mx.random.normal((1, 8, 1, head_dim))
    want = dense(q, *store.rows(0, 700), scale=0.2)
    assert mx.allclose(attend_quantized(q, store, 0.2, causal=False), want, atol=1e-4)
    blocked = blocked_attention(q, store.blocks, 700, 0.2, causal=False)
    assert mx.allclose(blocked, want, atol=1e-4)


def test_cuda_branches_agree_with_the_cpu_paths(monkeypatch):
    # MLX's CUDA backend has no quantized_matmul for these shapes; its branches
    # (dequantize + matmul) run here with the backend check faked.
    mx.random.seed(3)
    store = QuantizedKV(4, 32)
    store.append(mx.random.normal((1, 2, 600, 64)), mx.random.normal((1, 2, 600, 64)))
    q = mx.random.normal((1, 8, 1, 64))
    kt = mx.random.normal((1, 2, 600 // 32, 32, 64)).swapaxes(-1, -2).reshape(1, 2, -1, 32)
    key_blocks = mx.quantize(kt, group_size=32, bits=4)
    grouped = q.reshape(1, 2, 4, 64)
    cpu = (attend_quantized(q, store, 0.2, causal=False),
           quantized_attention.packed_channel_scores(grouped, key_blocks, 600 // 32, 4, 32))
    monkeypatch.setattr(quantized_attention, "_on_cuda_gpu", lambda: True)
    monkeypatch.setattr(quantized_attention, "SCORE_BYTES", 1 << 17)  # values in 3 passes
    cuda = (attend_quantized(q, store, 0.2, causal=False),
            quantized_attention.packed_channel_scores(grouped, key_blocks, 600 // 32, 4, 32))
    for got, want in zip(cuda, cpu):
        assert mx.allclose(got, want, atol=1e-4)


def test_kivi_decode_step_equals_its_blocked_attention():
    mx.random.seed(4)
    cache = make_cache(tiny_model("llama3"), "kivi", kv_bits=4, residual=32)[0]
    q, k, v = (mx.random.normal((1, 4, 200, 32)) for _ in range(3))
    no_rope = lambda x, offset=0: x  # noqa: E731
    cache.attend(q, k[:, :2], v[:, :2], rope=no_rope, scale=0.2, mask="causal")
    step = [mx.random.normal((1, n, 1, 32)) for n in (4, 2, 2)]
    got = cache.attend(*step, rope=no_rope, scale=0.2, mask=None)
    recent = [(cache.quantized_tokens, cache.recent_keys, cache.recent_values)]
    want = blocked_attention(step[0], lambda: chain(cache._quantized_blocks(), recent),
                             cache.offset, 0.2, causal=False)
    assert cache.quantized_tokens > 0
    assert mx.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("policy, args", [
    ("kivi", {"kv_bits": 4, "residual": 4096}),
    ("mixed", {"budget": 4096, "kv_group_size": 32}),
    ("mixed", {"budget": 4096, "kv_group_size": 32, "importance": "refreshkv"}),
    ("quantized", {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 4096}),
], ids=str)
def test_nothing_lossy_reproduces_full_exactly(policy, args):
    model = tiny_model("llama3")
    expected, _ = run_logits(model, "full", PROMPT, 16)
    got, _ = run_logits(model, policy, PROMPT, 16, **args)
    assert mx.array_equal(got, expected)


@pytest.mark.parametrize("policy, args", [
    ("quantized", {"kv_bits": 8, "kv_group_size": 32}),
    ("kivi", {"kv_bits": 8, "residual": 32}),
    ("streaming", {"budget": 4096, "kv_bits": 8, "kv_group_size": 32}),
    ("refreshkv", {"budget": 4096, "full_cache_bits": 8, "kv_group_size": 32}),
    ("refreshkv", {"budget": 4096, "full_cache_bits": 8, "kv_group_size": 32,
                   "refresh_mode": "score", "refresh": "stride", "refresh_every": 3}),
    ("mixed", {"budget": 48, "kv_group_size": 32, "high_bits": 8, "kv_bits": 4}),
], ids=str)
def test_eight_bit_stays_close_to_full(policy, args):
    model = tiny_model("llama3")
    expected, _ = run_logits(model, "full", PROMPT, 16)
    got, cache = run_logits(model, policy, PROMPT, 16, **args)
    if policy == "mixed":  # 4-bit demotions start once 48 tokens are held
        got, expected = got[:, :48], expected[:, :48]
    assert mx.abs(got - expected).max().item() < EIGHT_BIT_LOGIT_TOL


def test_mixed_demotes_during_a_chunked_prompt():
    # Each prompt chunk leaves `budget` tokens at high precision, so no layer
    # holds the whole prompt exact (that would lift the prefill's peak).
    model = tiny_model("llama3")
    cache = make_cache(model, "mixed", budget=48, kv_group_size=32)
    for i in range(0, 192, 64):
        model(mx.array(PROMPT[i : i + 64])[None], cache=cache)
    assert cache[0].stats() == {"kept_tokens": 192, "high_precision_tokens": 48,
                                "demoted_tokens": 144}


def refresh_choice(queries, keys, scale, k):
    """RefreshKV's choice written out: the last query's softmax over the keys,
    max over each GQA group, the k best rows per KV head, ascending."""
    n_kv_heads = keys.shape[1]
    grouped = mx.repeat(keys, queries.shape[1] // n_kv_heads, axis=1)
    probs = mx.softmax((queries[:, :, -1:] * scale) @ grouped.swapaxes(-1, -2), axis=-1)
    per_head = probs[:, :, 0].reshape(1, n_kv_heads, -1, keys.shape[2]).max(axis=2)
    return mx.sort(mx.argsort(-per_head, axis=-1)[..., :k], axis=-1)


def test_mixed_keeps_refreshkv_selection_at_high_precision():
    mx.random.seed(5)
    cache = make_cache(tiny_model("llama3"), "mixed", budget=16, kv_group_size=32,
                       importance="refreshkv", refresh_every=3)[0]
    no_rope = lambda x, offset=0: x  # noqa: E731
    q, k, v = (mx.random.normal((1, n, 64, 32)) for n in (4, 2, 2))
    cache.attend(q, k, v, rope=no_rope, scale=0.2, mask="causal")
    # The prompt's last query picks the 16 kept at high precision.
    assert mx.array_equal(cache.important.kept_positions, refresh_choice(q, k, 0.2, 16))
    for step in range(3):
        held_keys, held_positions = cache.important.keys, cache.important.kept_positions
        q, k, v = (mx.random.normal((1, n, 1, 32)) for n in (4, 2, 2))
        cache.attend(q, k, v, rope=no_rope, scale=0.2, mask=None)
        assert cache.stats() == {"kept_tokens": 65 + step, "high_precision_tokens": 16,
                                 "demoted_tokens": 49 + step}
        kept = cache.important.kept_positions
        if step < 2:  # between refreshes each new token joins the set
            assert (kept == 64 + step).any(axis=-1).all()
    # The third step refreshes: its query chooses among the 17 rows it scored.
    rows = mx.concatenate([held_keys, k], axis=2)
    positions = mx.concatenate([held_positions, mx.full((1, 2, 1), 66, mx.int32)], axis=2)
    chosen = refresh_choice(q, rows, 0.2, 16)
    assert mx.array_equal(kept, mx.take_along_axis(positions, chosen, axis=-1))


def test_quantized_modes_hold_fewer_real_bytes():
    model = tiny_model("llama3")
    _, full = run_logits(model, "full", PROMPT, 60)
    held = {"full": full[0].nbytes}
    for label, policy, args in [
        ("q8", "quantized", {"kv_bits": 8, "kv_group_size": 32}),
        ("q4", "quantized", {"kv_bits": 4, "kv_group_size": 32}),
        ("kivi2", "kivi", {"kv_bits": 2, "residual": 32}),
        ("mixed", "mixed", {"budget": 32, "kv_group_size": 32, "kv_bits": 2}),
        ("refresh4", "refreshkv", {"budget": 32, "full_cache_bits": 4, "kv_group_size": 32}),
    ]:
        _, cache = run_logits(model, policy, PROMPT, 60, **args)
        held[label] = cache[0].nbytes
    # 259 tokens in full's 512-row buffer of float32 vs packed words + scales.
    assert held["q4"] < held["q8"] < held["full"] / 2
    assert held["kivi2"] < held["full"] / 2 and held["mixed"] < held["full"] / 2
    assert held["refresh4"] < held["full"] / 2


@pytest.mark.parametrize("policy, args, message", [
    ("quantized", {"kv_bits": 5}, "--kv-bits"),
    ("quantized", {"kv_group_size": 48}, "--kv-group-size"),
    ("kivi", {"residual": -1}, "--residual"),
    ("mixed", {"budget": 8, "high_bits": 12}, "--high-bits"),
    ("mixed", {"budget": 8, "kv_bits": 8}, "--kv-bits"),
    ("refreshkv", {"full_cache_bits": 2}, "--full-cache-bits"),
    ("streaming", {"budget": 8, "kv_bits": 7}, "--kv-bits"),
])
def test_unsupported_quantization_is_one_clear_error(policy, args, message):
    with pytest.raises(UserError, match=message):
        make_cache(tiny_model("llama3"), policy, **args)


def test_group_size_must_divide_the_head_dim():
    model = tiny_model("llama3")  # head dim 32
    with pytest.raises(UserError, match="not a multiple of --kv-group-size 64"):
        run_logits(model, "quantized", PROMPT, 1, kv_bits=4, kv_group_size=64)
