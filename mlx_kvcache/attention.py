"""Attention entry points shared by the model ports and the cache policies.

`sparse` and `refresh_scores` run fused kernels (mlx_kvcache/kernels.py) on a
GPU when the shapes suit them and the variant has passed its probe
(mlx_kvcache/kernel_probe.py), and the pure-MLX references here otherwise.
"""

import os
from typing import Optional, Tuple, Union

import mlx.core as mx

from mlx_kvcache import cpu_attention, kernel_probe, kernels
from mlx_kvcache.quantized_attention import grouped_queries, packed_scores


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

    On the CPU a large float32 product goes to numpy's vectorised softmax
    (`cpu_attention`, within rounding of MLX's); another dtype is split by KV
    heads over CPU streams (`dense_over_cpu_streams`, bit-identical to one op).
    """
    if not cpu_attention.worth_it(queries, keys.shape[2]):
        return mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=mask
        )
    if cpu_attention.supported(queries, keys, values):
        return cpu_attention.dense(queries, keys, values, scale=scale, mask=mask)
    return dense_over_cpu_streams(queries, keys, values, scale=scale, mask=mask)


def dense_over_cpu_streams(queries, keys, values, *, scale, mask=None) -> mx.array:
    """`dense` split by KV heads over one CPU stream per core: ops on different
    CPU streams run on different threads (1.6x on 2 cores, measured), and each
    head's arithmetic is one op's, so the output is bit-identical."""
    streams = _cpu_streams(keys)
    if len(streams) < 2:
        return mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=mask
        )
    n_kv_heads = keys.shape[1]
    groups = queries.shape[1] // n_kv_heads
    bounds = [n_kv_heads * i // len(streams) for i in range(len(streams) + 1)]
    outputs = []
    for stream, lo, hi in zip(streams, bounds, bounds[1:]):
        head_mask = mask
        if isinstance(mask, mx.array) and mask.ndim >= 3 and mask.shape[-3] > 1:
            head_mask = mask[..., lo * groups : hi * groups, :, :]
        outputs.append(mx.fast.scaled_dot_product_attention(
            queries[:, lo * groups : hi * groups], keys[:, lo:hi], values[:, lo:hi],
            scale=scale, mask=head_mask, stream=stream))
    return mx.concatenate(outputs, axis=1)


_cpu_stream_pool: list = []


def _cpu_streams(keys: mx.array) -> list:
    """One CPU stream per core, at most one per KV head."""
    if not _cpu_stream_pool:
        _cpu_stream_pool.extend(mx.new_stream(mx.cpu) for _ in range(os.cpu_count() or 1))
    return _cpu_stream_pool[: min(keys.shape[1], len(_cpu_stream_pool))]


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

    On a GPU a fused kernel reads the retained rows in place (no mask, up to 8
    queries, head dims 64/80/96/128). The reference path: one gather of K rows
    from keys and one from values, then dense attention over them.
    """
    if kernels.sparse_supported(queries, keys, indices, mask) and kernel_probe.trusted(
            kernel_probe.sparse_variant(queries, keys), REFERENCES):
        return kernels.sparse_attention(queries, keys, values, indices, scale)
    return sparse_reference(queries, keys, values, indices, scale, mask)


def sparse_reference(queries, keys, values, indices, scale, mask=None) -> mx.array:
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
    float32 (one row on a refresh step). A large float32 product on the CPU:
    numpy's softmax (`cpu_attention.probabilities`), as in `dense`.
    """
    if cpu_attention.takes(queries, keys.shape[2], keys):
        return cpu_attention.probabilities(queries, keys, scale=scale, mask=mask)
    B, n_q_heads, L, D = queries.shape
    n_kv_heads = keys.shape[1]
    groups = n_q_heads // n_kv_heads
    q = (queries * scale).astype(keys.dtype).reshape(B, n_kv_heads, groups * L, D)
    logits = (q @ keys.swapaxes(-1, -2)).astype(mx.float32)
    logits = logits.reshape(B, n_q_heads, L, -1)
    if mask is not None:
        logits = mx.where(mask, logits, -mx.inf)
    return mx.softmax(logits, axis=-1, precise=True)


# Score rows of one MLX product in `received`: all of a prompt chunk's at once
# ([Hq, L, N] float32) would double the prefill's peak (H2O, measured 262 MiB
# vs full's 125 on SmolLM2 at 1K).
SCORE_ROWS = 256


def received(queries: mx.array, keys: mx.array, scale: float) -> mx.array:
    """The attention each key received from `queries`: softmax rows summed over
    the queries and over each KV head's group of query heads, [B, Hkv, N]
    float32 (H2O's heavy-hitter score). queries [B, Hq, L, D] are the last L of
    the N keys [B, Hkv, N, D], causal when L > 1. A large float32 product on
    the CPU: numpy sums each block of rows as it goes (`cpu_attention.received`)."""
    if cpu_attention.takes(queries, keys.shape[2], keys):
        return cpu_attention.received(queries, keys, scale=scale,
                                      mask="causal" if queries.shape[2] > 1 else None)
    return received_by_rows(queries, keys, scale)


def received_by_rows(queries: mx.array, keys: mx.array, scale: float) -> mx.array:
    """`received` as MLX sums `scores`, SCORE_ROWS query rows at a time."""
    B, n_kv_heads, n, _ = keys.shape
    L = queries.shape[2]
    total = mx.zeros((B, n_kv_heads, n), mx.float32)
    for first in range(0, L, SCORE_ROWS):
        rows = queries[:, :, first : first + SCORE_ROWS]
        causal = None
        if L > 1:
            positions = mx.arange(n - L + first, n - L + first + rows.shape[2])
            causal = mx.arange(n)[None] <= positions[:, None]
        probs = scores(rows, keys, scale, mask=causal).sum(axis=2)
        total += probs.reshape(B, n_kv_heads, probs.shape[1] // n_kv_heads, -1).sum(axis=2)
        if L > SCORE_ROWS:
            # Else the lazy graph computes every chunk's rows before summing
            # any (measured: peak 198 MiB vs full's 125 at 1K).
            mx.eval(total)
    return total


def dense_and_received(queries, keys, values, *, scale: float,
                       mask: Optional[Union[str, mx.array]] = None) -> Tuple[mx.array, mx.array]:
    """`dense` and `received` together: on the CPU a large float32 product
    gets both from one pass over the scores (`cpu_attention`), else `received`
    scores the rows again. mask as in `dense` (the policies pass "causal" for a
    prompt chunk, None for one token)."""
    if cpu_attention.takes(queries, keys.shape[2], keys, values):
        return cpu_attention.dense_and_received(queries, keys, values, scale=scale, mask=mask)
    return dense(queries, keys, values, scale=scale, mask=mask), received(queries, keys, scale)


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


def refresh_scores(queries: mx.array, keys, n_keys: int, scale: float, pool_kernel: int,
                   quantization: Optional[Tuple[int, int]] = None) -> mx.array:
    """RefreshKV's scores for choosing the retained set, [B, Hkv, n_keys]:
    softmax(q·Kᵀ·scale) over the first n_keys keys, summed over the queries,
    max-pooled along the keys, reduced by max over each GQA group.

    keys: the cache buffer [B, Hkv, rows, D] (rows >= n_keys), or its packed
    (words, scales, biases) with quantization = (bits, group_size). One query
    on a GPU: fused kernels (one read of the keys, no [Hq, N] probabilities
    materialised in between).
    """
    n_kv_heads = (keys[0] if quantization is not None else keys).shape[1]
    if kernels.refresh_supported(queries, quantization) and kernel_probe.trusted(
            kernel_probe.refresh_variant(queries, n_kv_heads, quantization), REFERENCES):
        return kernels.refresh_scores(queries, keys, n_keys, scale, pool_kernel, quantization)
    return refresh_scores_reference(queries, keys, n_keys, scale, pool_kernel, quantization)


def refresh_scores_reference(queries: mx.array, keys, n_keys: int, scale: float,
                             pool_kernel: int,
                             quantization: Optional[Tuple[int, int]] = None) -> mx.array:
    if quantization is None:
        n_kv_heads = keys.shape[1]
        probs = scores(queries, keys[:, :, :n_keys], scale)
    else:
        B, n_q_heads, L, _ = queries.shape
        n_kv_heads = keys[0].shape[1]
        # The whole packed buffers, cut after scoring, as a quantized decode
        # step reads them: slicing them first would copy them.
        logits = packed_scores(grouped_queries(queries, scale, n_kv_heads), keys,
                               *quantization)[..., :n_keys]
        probs = mx.softmax(logits.reshape(B, n_q_heads, L, -1), axis=-1, precise=True)
    return group_max(pool_max(probs.sum(axis=2), pool_kernel), n_kv_heads)


# What a kernel variant is probed against (kernel_probe.trusted).
REFERENCES = {"sparse_attention": sparse_reference, "refresh_scores": refresh_scores_reference}
