"""attention.sparse and attention.scores against dense references."""

import os

import mlx.core as mx
import numpy as np
import pytest

from mlx_kvcache import attention, cpu_attention

# float32 attention vs a reference that computes the same sums in another order.
FP32_TOL = 1e-5


def random_qkv(B=2, n_q_heads=8, n_kv_heads=2, L=1, N=96, D=32, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((B, n_q_heads, L, D))
    k = mx.random.normal((B, n_kv_heads, N, D))
    v = mx.random.normal((B, n_kv_heads, N, D))
    return q, k, v


def random_indices(B, n_kv_heads, N, K, seed=1):
    rng = np.random.default_rng(seed)
    rows = [[np.sort(rng.choice(N, K, replace=False)) for _ in range(n_kv_heads)]
            for _ in range(B)]
    return mx.array(np.array(rows), dtype=mx.uint32)


@pytest.mark.parametrize("n_q_heads, n_kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("K", [1, 17, 96])
def test_sparse_equals_dense_with_index_mask(n_q_heads, n_kv_heads, K):
    B, N = 2, 96
    q, k, v = random_qkv(B, n_q_heads, n_kv_heads, N=N)
    indices = random_indices(B, n_kv_heads, N, K)
    scale = 32 ** -0.5
    out = attention.sparse(q, k, v, indices, scale)
    # Reference: every key, with the others masked out for each KV head's group.
    allowed = np.zeros((B, n_kv_heads, N), bool)
    np.put_along_axis(allowed, np.array(indices).astype(np.int64), True, axis=-1)
    mask = mx.array(np.repeat(allowed, n_q_heads // n_kv_heads, axis=1))[:, :, None, :]
    expected = attention.dense(q, k, v, scale=scale, mask=mask)
    assert out.shape == (B, n_q_heads, 1, 32)
    assert mx.allclose(out, expected, atol=FP32_TOL)


def test_sparse_over_every_index_in_order_is_dense_exactly():
    q, k, v = random_qkv()
    indices = mx.broadcast_to(mx.arange(96, dtype=mx.uint32), (2, 2, 96))
    assert mx.array_equal(attention.sparse(q, k, v, indices, 0.2),
                          attention.dense(q, k, v, scale=0.2))


def test_scores_are_softmax_rows_of_the_real_queries():
    q, k, v = random_qkv(L=3)
    probs = attention.scores(q, k, 0.2)
    assert probs.dtype == mx.float32 and probs.shape == (2, 8, 3, 96)
    expected = mx.softmax(0.2 * q @ mx.repeat(k, 4, axis=1).swapaxes(-1, -2), axis=-1)
    assert mx.allclose(probs, expected, atol=FP32_TOL)
    mask = mx.arange(96)[None] <= mx.array([[10], [20], [30]])
    masked = attention.scores(q, k, 0.2, mask=mask)
    assert mx.all(masked[:, :, 0, 11:] == 0).item()
    assert mx.allclose(masked.sum(-1), mx.ones((2, 8, 3)), atol=FP32_TOL)


@pytest.mark.parametrize("n_q_heads, n_kv_heads", [(14, 2), (9, 3), (8, 8)])
@pytest.mark.parametrize("mask", [None, "causal", "per-head array"])
def test_dense_split_over_cpu_streams_is_bit_identical(n_q_heads, n_kv_heads, mask):
    q, k, v = random_qkv(B=1, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads, L=64, N=512)
    if mask == "per-head array":
        mask = mx.random.uniform(shape=(1, n_q_heads, 64, 512)) > 0.3
    assert len(attention._cpu_streams(k)) == min(n_kv_heads, os.cpu_count())
    whole = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)
    split = attention.dense_over_cpu_streams(q, k, v, scale=0.2, mask=mask)
    assert mx.array_equal(whole, split)


def cpu_attention_masks(n_q_heads, L, N):
    """Each kind of mask `dense` takes, as the policies and ports pass them."""
    mx.random.seed(3)
    window = (mx.arange(N)[None] <= mx.arange(N - L, N)[:, None]) & (
        mx.arange(N)[None] > mx.arange(N - L, N)[:, None] - 100)
    return {
        "none": None,
        "causal": "causal",
        "per-head boolean": mx.random.uniform(shape=(1, n_q_heads, L, N)) > 0.3,
        "sliding window": window,
        "additive": mx.where(window, 0.0, -1e9),
    }


@pytest.mark.parametrize("n_q_heads, n_kv_heads", [(14, 2), (9, 3), (4, 4)])
@pytest.mark.parametrize("L, N", [(300, 300), (700, 900)])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "per-head boolean",
                                       "sliding window", "additive"])
def test_cpu_attention_matches_mlx_within_fp32_tolerance(n_q_heads, n_kv_heads, L, N, mask_kind):
    # L past one block of rows and not a multiple of it; N > L puts the causal
    # diagonal off the corner (queries continuing a cache).
    q, k, v = random_qkv(B=2, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads, L=L, N=N, D=64)
    mask = cpu_attention_masks(n_q_heads, L, N)[mask_kind]
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    got = cpu_attention.dense(q, k, v, scale=0.125, mask=mask)
    assert got.shape == expected.shape and got.dtype == mx.float32
    assert mx.allclose(got, expected, atol=FP32_TOL, rtol=FP32_TOL).item()


def test_dense_routes_large_cpu_products_by_dtype(monkeypatch):
    q, k, v = random_qkv(B=1, n_q_heads=8, n_kv_heads=2, L=64, N=512)
    routed = []
    monkeypatch.setattr(attention.cpu_attention, "dense",
                        lambda *a, **kw: routed.append("numpy") or q)
    monkeypatch.setattr(attention, "dense_over_cpu_streams",
                        lambda *a, **kw: routed.append("streams") or q)
    attention.dense(q, k, v, scale=0.2)
    monkeypatch.setattr(cpu_attention, "MIN_SCORES", 0)
    attention.dense(q, k, v, scale=0.2)
    attention.dense(q.astype(mx.float16), k.astype(mx.float16), v.astype(mx.float16), scale=0.2)
    assert routed == ["numpy", "streams"]


@pytest.mark.parametrize("L, N", [(64, 300), (300, 700)])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_probabilities_match_mlx_scores_within_fp32_tolerance(monkeypatch, L, N, masked):
    # H2O's and mixed precision's prompt scoring: causal rows over all keys so far.
    q, k, _ = random_qkv(B=1, n_q_heads=14, n_kv_heads=2, L=L, N=N, D=64)
    mask = (mx.arange(N)[None] <= mx.arange(N - L, N)[:, None]) if masked else None
    got = cpu_attention.probabilities(q, k, scale=0.125, mask=mask)
    monkeypatch.setattr(cpu_attention, "MIN_SCORES", 1 << 62)
    expected = attention.scores(q, k, 0.125, mask=mask)
    assert got.shape == expected.shape == (1, 14, L, N) and got.dtype == mx.float32
    assert mx.allclose(got, expected, atol=FP32_TOL, rtol=FP32_TOL).item()
    if masked:
        assert mx.all(mx.where(mask, 0.0, got) == 0).item()


@pytest.mark.parametrize("L, N", [(300, 300), (700, 900)])
@pytest.mark.parametrize("mask_kind", ["causal", "none", "per-head boolean"])
def test_cpu_dense_and_received_is_dense_and_the_summed_probabilities(monkeypatch, L, N,
                                                                     mask_kind):
    # H2O's prompt chunks: one pass gives the output, bit for bit `dense`'s, and
    # the attention each key received, MLX's softmax rows summed.
    q, k, v = random_qkv(B=2, n_q_heads=14, n_kv_heads=2, L=L, N=N, D=64)
    mask = cpu_attention_masks(14, L, N)[mask_kind]
    out, got = cpu_attention.dense_and_received(q, k, v, scale=0.125, mask=mask)
    assert mx.array_equal(out, cpu_attention.dense(q, k, v, scale=0.125, mask=mask))
    causal = mx.arange(N)[None] <= mx.arange(N - L, N)[:, None]
    monkeypatch.setattr(cpu_attention, "MIN_SCORES", 1 << 62)
    probs = attention.scores(q, k, 0.125, mask=causal if mask_kind == "causal" else mask)
    expected = probs.sum(axis=2).reshape(2, 2, 7, N).sum(axis=2)
    assert got.shape == (2, 2, N) and got.dtype == mx.float32
    assert mx.allclose(got, expected, atol=FP32_TOL, rtol=FP32_TOL).item()
    if mask_kind == "causal":  # the MLX path H2O takes elsewhere, SCORE_ROWS at a time
        assert mx.allclose(attention.received(q, k, 0.125), expected,
                           atol=FP32_TOL, rtol=FP32_TOL).item()


@pytest.mark.parametrize("L, N", [(300, 300), (700, 900)])
@pytest.mark.parametrize("mask_kind", ["causal", "none"])
def test_cpu_received_is_dense_and_receiveds_sums(L, N, mask_kind):
    # Mixed precision scores other keys than it attends to: the column sums
    # alone, from the same blocks, so bit for bit the one pass's.
    q, k, v = random_qkv(B=2, n_q_heads=14, n_kv_heads=2, L=L, N=N, D=64)
    mask = cpu_attention_masks(14, L, N)[mask_kind]
    _, expected = cpu_attention.dense_and_received(q, k, v, scale=0.125, mask=mask)
    assert mx.array_equal(cpu_attention.received(q, k, scale=0.125, mask=mask), expected)


def test_received_routes_large_float32_products_to_numpys_sums(monkeypatch):
    q, k, _ = random_qkv(B=1, n_q_heads=8, n_kv_heads=2, L=64, N=512)
    monkeypatch.setattr(cpu_attention, "MIN_SCORES", 0)
    assert mx.array_equal(attention.received(q, k, 0.2),
                          cpu_attention.received(q, k, scale=0.2, mask="causal"))
    # One query (a decode step) has no causal mask.
    assert mx.array_equal(attention.received(q[:, :, -1:], k, 0.2),
                          cpu_attention.received(q[:, :, -1:], k, scale=0.2))
    half = [x.astype(mx.float16) for x in (q, k)]
    assert mx.array_equal(attention.received(*half, 0.2),
                          attention.received_by_rows(*half, 0.2))


def test_dense_and_received_routes_float32_to_one_pass(monkeypatch):
    q, k, v = random_qkv(B=1, n_q_heads=8, n_kv_heads=2, L=64, N=512)
    monkeypatch.setattr(cpu_attention, "MIN_SCORES", 0)
    one_pass = []
    fused = cpu_attention.dense_and_received
    monkeypatch.setattr(cpu_attention, "dense_and_received",
                        lambda *a, **kw: one_pass.append(1) or fused(*a, **kw))
    attention.dense_and_received(q, k, v, scale=0.2, mask="causal")
    half = [x.astype(mx.float16) for x in (q, k, v)]
    out, got = attention.dense_and_received(*half, scale=0.2, mask="causal")
    assert one_pass == [1]
    assert mx.array_equal(out, attention.dense(*half, scale=0.2, mask="causal"))
    assert mx.array_equal(got, attention.received(half[0], half[1], 0.2))
