"""Attention over quantized keys and values, without a full-precision copy.

A decode step scores the packed rows directly and takes one softmax over every
segment a cache holds (quantized rows, exact rows): `decode_attention`. How the
packed rows are read depends on the backend. On the CPU, `quantized_matmul`
against transposed rows runs element by element (the scores of one layer, SmolLM2
shape, 4K tokens, 8-bit: 1.9 ms), so the codes are unpacked with integer ops and
multiplied by BLAS with the scales folded in afterwards (0.4 ms; the parts of a
step side by side: benchmarks/quantized_decode.py). Apple GPUs have fast
quantized kernels; MLX's CUDA backend lacks `quantized_matmul` for these
shapes, so there keys take the unpacked path too and values are dequantized
in blocks.

Prefill (many queries) dequantizes one block of tokens at a time and merges
the blocks by online softmax: `blocked_attention`; on the CPU a large float32
chunk instead dequantizes every block once and takes numpy's softmax
(`cpu_attention`), MLX's scalar exp being what a long prefill waits on there.
"""

from functools import lru_cache
from typing import Callable, List, Tuple

import mlx.core as mx

from mlx_kvcache import cpu_attention
from mlx_kvcache.quantized_kv import QuantizedKV

QUERY_ROWS = 256  # prefill queries per pass: bounds the score tensor
# Bounds the float32 rows a decode step unpacks at once (per layer). A pass
# per few thousand rows instead costs more than it saves: each pass slices the
# buffers (a copy) and adds its own primitives (measured on the CPU at 4352
# rows, SmolLM2 shape, 8-bit: 0.81 ms in two passes vs 0.48 in one).
SCORE_BYTES = 64 << 20
UNPACKED_BITS = (2, 4, 8)  # whole codes per byte

Packed = Tuple[mx.array, mx.array, mx.array]  # (packed words, scales, biases)
# Given the grouped queries [B, Hkv, R, D], a segment returns its logits
# (float32, [B, Hkv, R, n]) and how to weigh its values by probabilities.
Segment = Callable[[mx.array], Tuple[mx.array, Callable[[mx.array], mx.array]]]


def _on_apple_gpu() -> bool:
    return mx.metal.is_available() and mx.default_device().type == mx.gpu


def _on_cuda_gpu() -> bool:
    return mx.cuda.is_available() and mx.default_device().type == mx.gpu


def attend_quantized(queries: mx.array, storage: QuantizedKV, scale: float,
                     causal: bool) -> mx.array:
    """Attention over a quantized store: the decode path for one query,
    blocks with an online softmax for a prompt chunk."""
    if queries.shape[2] > 1:
        return blocked_attention(queries, storage.blocks, storage.length, scale, causal)
    return decode_attention(queries, scale, storage.keys[0].shape[1], [buffer_segment(storage)])


def decode_attention(queries: mx.array, scale: float, n_kv_heads: int,
                     segments: List[Segment]) -> mx.array:
    """One query per head over several segments of one sequence, with a single
    softmax over all of them (no online merge needed for one row)."""
    B, n_q_heads, L, D = queries.shape
    q = grouped_queries(queries, scale, n_kv_heads)
    parts = [segment(q) for segment in segments]
    logits = mx.concatenate([part_logits for part_logits, _ in parts], axis=-1)
    probs = mx.softmax(logits, axis=-1, precise=True).astype(q.dtype)
    out, start = None, 0
    for part_logits, weigh in parts:
        n = part_logits.shape[-1]
        weighted = weigh(probs[..., start : start + n])
        out = weighted if out is None else out + weighted
        start += n
    return out.reshape(B, n_q_heads, L, D)


def grouped_queries(queries: mx.array, scale: float, n_kv_heads: int) -> mx.array:
    """Scaled queries [B, Hq, L, D] -> [B, Hkv, Hq/Hkv * L, D]: each KV head's
    query rows together, so one product scores them all."""
    B, n_q_heads, L, D = queries.shape
    return (queries * scale).reshape(B, n_kv_heads, n_q_heads // n_kv_heads * L, D)


def exact_segment(keys: mx.array, values: mx.array) -> Segment:
    def segment(q):
        return (q @ keys.swapaxes(-1, -2)).astype(mx.float32), lambda p: p @ values
    return segment


def buffer_segment(storage: QuantizedKV) -> Segment:
    """A store's whole packed buffers, read in place: slicing them to the held
    rows would copy them on every step (measured: a third of the step at 4K
    tokens). Rows past the held ones are zero; their scores are cut off and
    their probabilities padded with zeros."""
    bits, group_size, n = storage.bits, storage.group_size, storage.length

    def segment(q):
        logits = packed_scores(q, storage.keys, bits, group_size)[..., :n]

        def weigh(p):
            padding = storage.values[0].shape[2] - n
            p = mx.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, padding)])
            return packed_weighted_sum(p, storage.values, bits, group_size)
        return logits, weigh
    return segment


def packed_scores(q: mx.array, keys: Packed, bits: int, group_size: int) -> mx.array:
    """q [B, Hkv, R, D] · (dequantized keys [B, Hkv, n, D])ᵀ -> float32 [B, Hkv, R, n]."""
    if _on_apple_gpu():
        logits = mx.quantized_matmul(q, *keys, transpose=True, group_size=group_size, bits=bits)
        return logits.astype(mx.float32)
    n = keys[0].shape[2]
    B, H, _, D = q.shape
    step = _rows_per_pass(B, H, D)
    parts = []
    for start in range(0, n, step):
        rows = tuple(a[:, :, start : start + step] for a in keys) if step < n else keys
        if bits in UNPACKED_BITS:
            parts.append(_unpacked_scores(q, rows, bits, group_size))
        else:
            k = mx.dequantize(*rows, group_size=group_size, bits=bits).astype(mx.float32)
            parts.append(q.astype(mx.float32) @ k.swapaxes(-1, -2))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def _rows_per_pass(batch: int, heads: int, head_dim: int) -> int:
    """Rows whose float32 copy fits SCORE_BYTES."""
    return max(1, SCORE_BYTES // (batch * heads * head_dim * 4))


def _codes(packed: mx.array, bits: int) -> mx.array:
    """The integer codes as float32 [B, H, n, D], in code order: a byte holds
    8/bits codes, lowest bits first, and each row lists every byte's first
    code, then every byte's second... The codes are not interleaved back into
    channel order (a copy of the whole block); the query is permuted to match
    instead (`_code_order`)."""
    codes = packed.view(mx.uint8)
    per_byte = 8 // bits
    if per_byte == 1:
        return codes.astype(mx.float32)
    B, H, n, n_bytes = codes.shape
    shifts = (mx.arange(per_byte, dtype=mx.uint8) * bits).reshape(per_byte, 1)
    codes = (codes[:, :, :, None] >> shifts) & ((1 << bits) - 1)  # [B, H, n, per_byte, bytes]
    return codes.astype(mx.float32).reshape(B, H, n, per_byte * n_bytes)


def _code_order(x: mx.array, bits: int) -> mx.array:
    """[B, H, R, D] in channel order -> the same in `_codes`' order."""
    per_byte = 8 // bits
    if per_byte == 1:
        return x
    B, H, R, D = x.shape
    return x.reshape(B, H, R, D // per_byte, per_byte).swapaxes(-1, -2).reshape(B, H, R, D)


@lru_cache(maxsize=None)
def _group_mask(head_dim: int, bits: int, group_size: int) -> mx.array:
    """[groups, D] float32: 1 where a position in `_codes`' order holds a
    channel of that group."""
    per_byte = 8 // bits
    position = mx.arange(head_dim)
    byte, code = position % (head_dim // per_byte), position // (head_dim // per_byte)
    channel = byte * per_byte + code
    return (channel // group_size == mx.arange(head_dim // group_size)[:, None]).astype(mx.float32)


def _unpacked_scores(q: mx.array, keys: Packed, bits: int, group_size: int) -> mx.array:
    """Within a group k = code * scale + bias, so q·k = Σ_groups scale * (q·codes)
    + bias * sum(q): BLAS multiplies the codes, the scales come after. With
    several groups a row, each query row goes in once per group with the other
    groups' channels zeroed, so one product reads the codes once, with no
    transposed copy of them (measured on the CPU, 8 KV heads, head dim 128,
    4352 rows, 8-bit: 1.3 ms vs 12 ms with the codes regrouped)."""
    packed, scales, biases = keys
    B, H, R, D = q.shape
    groups = D // group_size
    q = q.astype(mx.float32)
    rows = _code_order(q, bits)
    if groups > 1:
        rows = (rows[:, :, :, None] * _group_mask(D, bits, group_size)).reshape(
            B, H, R * groups, D)
    dots = (rows @ _codes(packed, bits).swapaxes(-1, -2)).reshape(B, H, R, groups, -1)
    q_sums = q.reshape(B, H, R, groups, group_size).sum(-1, keepdims=True)

    def per_group(a):  # scales or biases [B, H, n, groups] -> [B, H, 1, groups, n]
        return a.astype(mx.float32).swapaxes(-1, -2)[:, :, None]
    return (dots * per_group(scales) + q_sums * per_group(biases)).sum(axis=3)


def packed_channel_scores(q: mx.array, key_blocks: Packed, n_blocks: int, bits: int,
                          group_size: int) -> mx.array:
    """Scores against keys quantized per channel (KIVI): key_blocks hold each
    block of `group_size` tokens transposed, [B, Hkv, n_blocks * D, packed G],
    quantized along its tokens. q [B, Hkv, R, D] -> float32 [B, Hkv, R, n_blocks * G]."""
    B, H, R, D = q.shape
    blocks = tuple(a.reshape(B, H, n_blocks, D, -1) for a in key_blocks)
    if _on_cuda_gpu():
        k_t = mx.dequantize(*blocks, group_size=group_size, bits=bits).astype(q.dtype)
        logits = q[:, :, None] @ k_t
    else:
        logits = mx.quantized_matmul(q[:, :, None], *blocks, transpose=False,
                                     group_size=group_size, bits=bits)
    return logits.swapaxes(2, 3).reshape(B, H, R, -1).astype(mx.float32)


def packed_weighted_sum(p: mx.array, values: Packed, bits: int, group_size: int) -> mx.array:
    """p [B, Hkv, R, n] @ dequantized values [B, Hkv, n, D]."""
    if not _on_cuda_gpu():
        return mx.quantized_matmul(p, *values, transpose=False, group_size=group_size, bits=bits)
    return _dequantized_weighted_sum(p, values, bits, group_size)


def _dequantized_weighted_sum(p, values: Packed, bits: int, group_size: int) -> mx.array:
    out = None
    B, H = p.shape[:2]
    step = _rows_per_pass(B, H, values[1].shape[-1] * group_size)
    for start in range(0, values[0].shape[2], step):
        rows = tuple(a[:, :, start : start + step] for a in values)
        v = mx.dequantize(*rows, group_size=group_size, bits=bits).astype(p.dtype)
        part = p[..., start : start + step] @ v
        out = part if out is None else out + part
    return out


def blocked_attention(queries: mx.array, blocks, n_keys: int, scale: float,
                      causal: bool) -> mx.array:
    """Attention over keys/values that arrive in blocks, merged by online softmax.

    queries [B, Hq, L, D]; blocks() yields (start, keys [B, Hkv, n, D], values)
    covering token indices [0, n_keys) afresh on each call; causal: the L
    queries are the last L of the n_keys tokens and see only keys at or before
    themselves. Long prefill chunks go QUERY_ROWS queries at a time, so the
    peak is one block of dequantized rows and one small score tile (on the CPU,
    a large float32 chunk: every row dequantized, then cpu_attention's blocks).
    """
    L = queries.shape[2]
    if L > 1 and cpu_attention.takes(queries, n_keys):
        # MLX's CPU exp is scalar (~40 M/s; numpy's ~1,100 M/s): dequantize
        # the blocks once and let dense attention take the numpy softmax. The
        # rows are float32 [B, Hkv, n_keys, D], 2 x 16 MiB a layer at 32K
        # tokens on Qwen2.5-Coder, freed after the layer.
        parts = list(blocks())
        keys = mx.concatenate([k for _, k, _ in parts], axis=2).astype(mx.float32)
        values = mx.concatenate([v for _, _, v in parts], axis=2).astype(mx.float32)
        return cpu_attention.dense(queries, keys, values, scale=scale,
                                   mask="causal" if causal else None)
    if L > QUERY_ROWS:
        parts = [_blocked_pass(queries[:, :, i : i + QUERY_ROWS], blocks(),
                               n_keys - L + i, scale, causal)
                 for i in range(0, L, QUERY_ROWS)]
        return mx.concatenate(parts, axis=2)
    return _blocked_pass(queries, blocks(), n_keys - L, scale, causal)


def _blocked_pass(queries, blocks, first_position: int, scale: float, causal: bool):
    B, n_q_heads, L, D = queries.shape
    out_dtype = queries.dtype
    q = m = acc = total = None
    for start, keys, values in blocks:
        if q is None:  # the KV heads are known once the first block is
            q = grouped_queries(queries, scale, keys.shape[1]).astype(mx.float32)
            # Each query row's position: rows go head by head of the GQA group.
            q_pos = (first_position + mx.arange(q.shape[2]) % L)[:, None]
        s = q @ keys.astype(mx.float32).swapaxes(-1, -2)
        if causal and L > 1:
            k_pos = start + mx.arange(keys.shape[2])[None]
            s = mx.where(k_pos <= q_pos, s, -mx.inf)
        block_max = s.max(axis=-1, keepdims=True)
        m_new = block_max if m is None else mx.maximum(m, block_max)
        p = mx.exp(s - m_new)
        pv = p @ values.astype(mx.float32)
        if m is None:
            acc, total = pv, p.sum(axis=-1, keepdims=True)
        else:
            correction = mx.exp(m - m_new)
            acc = acc * correction + pv
            total = total * correction + p.sum(axis=-1, keepdims=True)
        m = m_new
    out = acc / total
    return out.reshape(B, n_q_heads, L, D).astype(out_dtype)

