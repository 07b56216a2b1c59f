"""Choosing tokens from attention scores, shared by the score-based policies."""

import mlx.core as mx

from mlx_kvcache.attention import group_max, pool_max


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
    return top_scored(per_head, k, sinks=sinks, recent=recent)


def top_scored(per_head: mx.array, k: int, *, sinks: int = 0, recent: int = 0):
    """Scores per KV head [B, Hkv, N] -> (the k best indices, their scores),
    the first `sinks` and last `recent` tokens always among them."""
    per_head = protect(per_head, sinks, recent)
    indices = top_k(per_head, k)
    return indices, mx.take_along_axis(per_head, indices.astype(mx.int32), axis=-1)
