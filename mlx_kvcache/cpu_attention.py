"""Dense float32 attention for MLX's CPU backend, with numpy doing the softmax.

MLX's CPU backend computes `exp` one element at a time on one thread: ~40-50 M/s
here, against numpy's vectorised (AVX-512) ~1,100 M/s on the same core. A long
prefill is mostly exponentials (Qwen2.5-Coder-0.5B: 14 heads x 24 layers x L²/2
of them), so for large products this path moves the scores to numpy, a block of
query rows of one KV head's group at a time, and back: q·Kᵀ and P·V by BLAS,
the softmax by numpy's ufuncs, the blocks spread over one thread per core
(numpy releases the GIL), each calling BLAS single-threaded. Under a causal
mask a block reads only the keys its rows may see, so a prefill from an empty
cache computes half the scores `mx.fast.scaled_dot_product_attention` does.

The arithmetic is attention's own (max-subtracted softmax, normalised after
P·V); it differs from MLX's in rounding only (see tests/test_attention.py for the
stated tolerance).
"""

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import numpy as np

# Query rows of one block: 256 rows x 7 query heads of a KV group x 32K keys x 4
# bytes is ~235 MB of scores at the longest context measured here, one block in
# flight per core.
BLOCK_ROWS = 256
_pool: list = []


def _one_blas_thread() -> None:
    """Run this worker's numpy BLAS calls on its own thread. The workers
    already use every core; BLAS threads of their own on top oversubscribe them
    (measured: 1.5-1.9x slower blocks). numpy's wheels bundle OpenBLAS, whose
    `openblas_set_num_threads_local` (0.3.27+) sets the calling thread's count
    only; a numpy on another BLAS keeps its default."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    for path in {line.split()[-1] for line in maps.splitlines() if "scipy_openblas" in line}:
        set_local = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local", None)
        if set_local is not None:
            set_local(1)


# MLX's CPU backend runs an op on one thread (BLAS aside), and a long prefill's
# time is mostly its softmax: ~40-70 M exponentials/s here, 14 heads x 24 layers
# x L^2/2 of them, ~40 minutes at 32K tokens on Qwen2.5-Coder-0.5B (numpy's
# softmax: ~15, estimated; docs/cpu.md). Below this many scores (decode steps,
# short prompts) a product is too small to pay for leaving MLX's one op.
MIN_SCORES = 1 << 21


def worth_it(queries: mx.array, n_keys: int) -> bool:
    """Whether attention of `queries` over `n_keys` keys, on the CPU, is large
    enough to leave MLX's one op (for numpy here, or CPU streams)."""
    B, n_q_heads, L, _ = queries.shape
    return mx.default_device() == mx.cpu and B * n_q_heads * L * n_keys >= MIN_SCORES


def supported(*arrays: mx.array) -> bool:
    """numpy holds float32 exactly; other dtypes stay on MLX's path."""
    return all(a.dtype == mx.float32 for a in arrays)


def takes(queries: mx.array, n_keys: int, *others: mx.array) -> bool:
    """Whether attention of `queries` over `n_keys` keys goes to numpy here:
    a product `worth_it` whose `queries` and `others` are all `supported`."""
    return worth_it(queries, n_keys) and supported(queries, *others)


def dense(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    mask: Optional[Union[str, mx.array]] = None,
) -> mx.array:
    """Same contract as `mlx_kvcache.attention.dense` (float32 only).

    queries [B, Hq, L, D], keys/values [B, Hkv, N, D]; mask None, "causal" (the L
    queries are the last L of the N keys), or a boolean/additive array
    broadcastable to [B, Hq, L, N].
    """
    return _dense(queries, keys, values, scale, mask, received=None)


def dense_and_received(queries, keys, values, *, scale, mask=None):
    """`dense` and, from the same exponentials, the attention each key
    received: the softmax rows summed over the L queries and over each KV
    head's group of query heads, [B, Hkv, N] float32 (H2O's heavy-hitter
    score). One pass over the scores instead of a second that recomputes them
    (measured: H2O's 32K prefill took 43 minutes where full's took 12)."""
    received = _ReceivedSums(queries, keys)
    out = _dense(queries, keys, values, scale, mask, received)
    return out, received.total()


def received(queries: mx.array, keys: mx.array, *, scale: float,
             mask: Optional[Union[str, mx.array]] = None) -> mx.array:
    """`dense_and_received`'s column sums alone, for scores taken over other
    keys than the output's (mixed precision scores its high-precision tokens
    only): no P·V, and no [Hq, L, N] probabilities handed back to MLX to sum
    (benchmarks/h2o_prefill.py times both routes)."""
    sums = _ReceivedSums(queries, keys)
    _softmax_blocks(queries, keys, scale, mask, sums.add)
    return sums.total()


class _ReceivedSums:
    """Σ over query rows of exp/denominator, per KV head and key, kept as one
    row per block of queries: the blocks run on several threads at once."""

    def __init__(self, queries: mx.array, keys: mx.array):
        B, n_kv_heads, N = keys.shape[0], keys.shape[1], keys.shape[2]
        n_blocks = -(-queries.shape[2] // BLOCK_ROWS)
        self.rows = np.zeros((B, n_kv_heads, n_blocks, N), np.float32)

    def add(self, b, h, start, end, exp_scores, denominators) -> None:
        n_keys = exp_scores.shape[-1]
        # One product: a row of weights times the [rows, keys] exponentials.
        weights = (1 / denominators).reshape(1, -1)
        self.rows[b, h, start // BLOCK_ROWS, :n_keys] = weights @ exp_scores.reshape(-1, n_keys)

    def total(self) -> mx.array:
        return mx.array(self.rows.sum(axis=2))


def _dense(queries, keys, values, scale, mask, received: Optional[_ReceivedSums]) -> mx.array:
    B, n_q_heads, L, D = queries.shape
    v = np.array(values)
    out = np.empty((B, keys.shape[1], n_q_heads // keys.shape[1], L, D), np.float32)

    def attend(b, h, start, end, exp_scores, denominators):
        o = exp_scores @ v[b, h, : exp_scores.shape[-1]]
        o /= denominators
        out[b, h, :, start:end] = o
        if received is not None:
            received.add(b, h, start, end, exp_scores, denominators)

    _softmax_blocks(queries, keys, scale, mask, attend)
    return mx.array(out.reshape(B, n_q_heads, L, D))


def probabilities(queries: mx.array, keys: mx.array, *, scale: float,
                  mask: Optional[mx.array] = None) -> mx.array:
    """softmax(q·Kᵀ·scale) [B, Hq, L, N] float32, as `attention.scores` (the
    attention H2O and mixed precision accumulate over a prompt); mask boolean,
    broadcastable to [L, N], True where a query may look."""
    B, n_q_heads, L, _ = queries.shape
    N = keys.shape[2]
    out = np.zeros((B, keys.shape[1], n_q_heads // keys.shape[1], L, N), np.float32)

    def normalise(b, h, start, end, exp_scores, denominators):
        np.divide(exp_scores, denominators, out=out[b, h, :, start:end, : exp_scores.shape[-1]])

    _softmax_blocks(queries, keys, scale, mask, normalise)
    return mx.array(out.reshape(B, n_q_heads, L, N))


def _softmax_blocks(queries, keys, scale, mask, emit) -> None:
    """For each block of query rows of each KV head's group, the exponentials
    of its max-subtracted scores [groups, rows, n_keys] and their row sums,
    handed to emit(b, h, start, end, exp_scores, denominators). Blocks run on
    the pool's threads; each emit writes its own rows."""
    B, n_q_heads, L, D = queries.shape
    n_kv_heads, N = keys.shape[1], keys.shape[2]
    groups = n_q_heads // n_kv_heads
    q = np.array(queries * scale).reshape(B, n_kv_heads, groups, L, D)
    # Kᵀ contiguous: BLAS multiplies by it ~2x faster than by a transposed view.
    k_t = np.ascontiguousarray(np.array(keys).swapaxes(-1, -2))
    mask_np = None
    if isinstance(mask, mx.array):
        mask_np = np.broadcast_to(np.array(mask), (B, n_q_heads, L, N)).reshape(
            B, n_kv_heads, groups, L, N)
    causal = isinstance(mask, str)
    if causal and mask != "causal":
        raise ValueError(f"unknown mask {mask!r}")
    offset = N - L

    def block(b: int, h: int, start: int) -> None:
        end = min(start + BLOCK_ROWS, L)
        rows = end - start
        # Row i of the block (query offset + start + i) sees keys up to that
        # position: the keys past the block's last row are never needed.
        n_keys = offset + end if causal else N
        s = (q[b, h, :, start:end].reshape(groups * rows, D) @ k_t[b, h, :, :n_keys])
        s = s.reshape(groups, rows, n_keys)
        if causal:
            diagonal = s[:, :, offset + start:]
            diagonal[:, np.triu(np.ones((rows, rows), bool), 1)] = -np.inf
        elif mask_np is not None:
            m = mask_np[b, h, :, start:end]
            if m.dtype == np.bool_:
                np.copyto(s, -np.inf, where=~m)
            else:
                s += m
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        emit(b, h, start, end, s, s.sum(axis=-1, keepdims=True))

    if not _pool:
        _pool.append(ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="attention",
                                        initializer=_one_blas_thread))
    jobs = [_pool[0].submit(block, b, h, start)
            for b in range(B) for h in range(n_kv_heads) for start in range(0, L, BLOCK_ROWS)]
    for job in jobs:
        job.result()
