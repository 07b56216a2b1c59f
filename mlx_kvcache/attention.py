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
