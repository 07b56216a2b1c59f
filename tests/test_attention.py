"""attention.sparse and attention.scores against dense references."""

import os

import mlx.core as mx
import numpy as np
import pytest

from mlx_kvcache import attention

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
def test_dense_split_over_cpu_streams_is_bit_identical(monkeypatch, n_q_heads, n_kv_heads, mask):
    q, k, v = random_qkv(B=1, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads, L=64, N=512)
    if mask == "per-head array":
        mask = mx.random.uniform(shape=(1, n_q_heads, 64, 512)) > 0.3
    monkeypatch.setattr(attention, "CPU_SPLIT_MIN_SCORES", 1 << 62)
    assert attention._cpu_streams(q, k) == []
    whole = attention.dense(q, k, v, scale=0.2, mask=mask)
    monkeypatch.setattr(attention, "CPU_SPLIT_MIN_SCORES", 0)
    assert len(attention._cpu_streams(q, k)) == min(n_kv_heads, os.cpu_count())
    split = attention.dense(q, k, v, scale=0.2, mask=mask)
    assert mx.array_equal(whole, split)
