"""Attention entry points shared by the model ports and the cache policies."""

from typing import Optional, Union

import mlx.core as mx


def dense(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    mask: Optional[Union[str, mx.array]] = None,
) -> mx.array:
    """Attention of every query over every key.

    queries [B, Hq, L, D], keys/values [B, Hkv, N, D] (GQA: Hq a multiple of Hkv).
    mask: None, "causal" (the L queries are the last L of the N keys), or an
    additive/boolean array broadcastable to [B, Hq, L, N].
    """
    return mx.fast.scaled_dot_product_attention(
        queries, keys, values, scale=scale, mask=mask
    )


def gather_rows(x: mx.array, indices: mx.array) -> mx.array:
    """x [B, H, N, D] (contiguous), indices [B, H, K] -> rows [B, H, K, D].

    One `take` of whole rows from x viewed as [B*H*N, D]: measured on the CPU
    ~6x faster than take_along_axis, which gathers element by element. x must
    be contiguous (pass a cache's whole buffer, not a slice of it), else the
    reshape copies it.
    """
    B, H, N, D = x.shape
    K = indices.shape[-1]
    row_base = (mx.arange(B * H, dtype=mx.uint32) * N).reshape(B, H, 1)
    rows = (indices.astype(mx.uint32) + row_base).reshape(-1)
    return mx.take(x.reshape(B * H * N, D), rows, axis=0).reshape(B, H, K, D)


def sparse(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    indices: mx.array,
    scale: float,
    mask: Optional[mx.array] = None,
) -> mx.array:
    """Attention over retained token indices: each KV head attends only to its
    own K rows of the full cache.

    queries [B, Hq, L, D]; keys/values [B, Hkv, N, D] (the whole cache buffer,
    contiguous; rows past the valid ones are never indexed); indices [B, Hkv, K] int, per KV head, shared by the Hq/Hkv query
    heads of its GQA group; mask None or broadcastable to [B, Hq, L, K].

    This is the reference path: one gather of K rows from keys and one from
    values, then dense attention over them. Fused kernels that read the rows in
    place plug in behind this call.
    """
    return mx.fast.scaled_dot_product_attention(
        queries, gather_rows(keys, indices), gather_rows(values, indices),
        scale=scale, mask=mask,
    )


def scores(
    queries: mx.array, keys: mx.array, scale: float, mask: Optional[mx.array] = None
) -> mx.array:
    """softmax(q·Kᵀ·scale) in float32 for a few queries over all N keys.

    queries [B, Hq, L, D], keys [B, Hkv, N, D] -> [B, Hq, L, N]; mask: boolean,
    broadcastable to [L, N], True where a query may look. The product runs in
    the keys' dtype (no float32 copy of the cache); only the L score rows are
    float32 (one row on a refresh step).
    """
    B, n_q_heads, L, D = queries.shape
    n_kv_heads = keys.shape[1]
    groups = n_q_heads // n_kv_heads
    q = (queries * scale).astype(keys.dtype).reshape(B, n_kv_heads, groups * L, D)
    logits = (q @ keys.swapaxes(-1, -2)).astype(mx.float32)
    logits = logits.reshape(B, n_q_heads, L, -1)
    if mask is not None:
        logits = mx.where(mask, logits, -mx.inf)
    return mx.softmax(logits, axis=-1, precise=True)
