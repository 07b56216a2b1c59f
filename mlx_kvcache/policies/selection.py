"""Choosing tokens from attention scores, shared by the score-based policies."""

import mlx.core as mx


def pool_max(scores: mx.array, kernel: int) -> mx.array:
    """1-D max-pool along the last axis, stride 1, same length (SnapKV's
    clustering: a token near a high-scoring one is kept with it)."""
    if kernel <= 1:
        return scores
    half = kernel // 2
    n = scores.shape[-1]
    pad = [(0, 0)] * (scores.ndim - 1) + [(half, kernel - 1 - half)]
    padded = mx.pad(scores, pad, constant_values=-mx.inf)
    pooled = padded[..., 0:n]
    for shift in range(1, kernel):
        pooled = mx.maximum(pooled, padded[..., shift : shift + n])
    return pooled


def group_max(scores: mx.array, n_kv_heads: int) -> mx.array:
    """[B, Hq, N] -> [B, Hkv, N]: a token matters to a KV head if it matters to
    any query head of its GQA group."""
    B, n_q_heads, N = scores.shape
    return scores.reshape(B, n_kv_heads, n_q_heads // n_kv_heads, N).max(axis=2)


def protect(scores: mx.array, sinks: int, recent: int) -> mx.array:
    """Scores with the first `sinks` and last `recent` tokens made unbeatable."""
    n = scores.shape[-1]
    if sinks <= 0 and recent <= 0:
        return scores
    positions = mx.arange(n)
    guarded = (positions < sinks) | (positions >= n - recent)
    return mx.where(guarded, mx.inf, scores)


def top_k(scores: mx.array, k: int) -> mx.array:
    """Indices of the k highest scores per row, ascending (cache order), uint32."""
    n = scores.shape[-1]
    if k >= n:
        shape = scores.shape[:-1] + (n,)
        return mx.broadcast_to(mx.arange(n, dtype=mx.uint32), shape)
    chosen = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
    return mx.sort(chosen.astype(mx.uint32), axis=-1)


def select(probs: mx.array, n_kv_heads: int, k: int, *, pool_kernel: int,
           sinks: int = 0, recent: int = 0):
    """Attention probabilities of some queries [B, Hq, L, N] -> (indices
    [B, Hkv, k], their scores [B, Hkv, k]): summed over the queries, max-pooled,
    reduced over each GQA group by max, top-k per KV head."""
    per_head = group_max(pool_max(probs.sum(axis=2), pool_kernel), n_kv_heads)
    per_head = protect(per_head, sinks, recent)
    indices = top_k(per_head, k)
    return indices, mx.take_along_axis(per_head, indices.astype(mx.int32), axis=-1)
