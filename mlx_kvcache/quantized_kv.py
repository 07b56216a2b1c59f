"""Quantized KV storage: rows quantized per token, and the row codecs.

Keys and values are quantized per token along head_dim with `mx.quantize`
(affine, `bits` 2/3/4/6/8, groups of `group_size` channels): packed uint32
words plus a scale and bias per group, so `nbytes` is what is really held.
Attention over them lives in `quantized_attention`.
"""

from typing import Iterator, Optional, Tuple

import mlx.core as mx

from mlx_kvcache.errors import UserError

BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)
BLOCK_TOKENS = 1024  # rows dequantized at once by blocks()


def check_quantization(policy: str, bits: int, group_size: int):
    if bits not in BITS:
        raise UserError(f"{policy}: --kv-bits must be one of {BITS}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise UserError(f"{policy}: --kv-group-size must be one of {GROUP_SIZES}, got {group_size}")


class QuantizedKV:
    """A growing quantized K/V store (blocks of `step` tokens, as FullCache)."""

    step = 256

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size
        self.codec = QuantizedRows(bits, group_size)
        self.keys = self.values = None  # (packed, scales, biases), capacity rows
        self.length = 0
        self.dtype = None

    def append(self, keys: mx.array, values: mx.array) -> None:
        self.dtype = keys.dtype
        self._write(self.codec.encode(keys), self.codec.encode(values))

    def _write(self, qk, qv) -> None:
        n = qk[0].shape[2]
        if self.keys is None or self.length + n > self.keys[0].shape[2]:
            grow = (n + self.step - 1) // self.step * self.step

            def grown(stored, new):
                blank = tuple(mx.zeros(a.shape[:2] + (grow,) + a.shape[3:], a.dtype) for a in new)
                if stored is None:
                    return blank
                return tuple(mx.concatenate([s[:, :, : self.length], b], axis=2)
                             for s, b in zip(stored, blank))

            self.keys, self.values = grown(self.keys, qk), grown(self.values, qv)
        for stored, new in ((self.keys, qk), (self.values, qv)):
            for s, a in zip(stored, new):
                s[:, :, self.length : self.length + n] = a
        self.length += n

    def trim(self, n: int) -> None:
        """Forget the last n rows (each row is quantized on its own, so the
        rest are untouched; readers cut at `length`)."""
        self.length -= n

    def rows(self, start: int, stop: int) -> Tuple[mx.array, mx.array]:
        """Dequantized keys and values of tokens [start, stop)."""
        return tuple(self.codec.decode(tuple(a[:, :, start:stop] for a in stored), self.dtype)
                     for stored in (self.keys, self.values))

    def blocks(self, block: int = BLOCK_TOKENS) -> Iterator[Tuple[int, mx.array, mx.array]]:
        for start in range(0, self.length, block):
            stop = min(start + block, self.length)
            yield (start, *self.rows(start, stop))

    def gather(self, indices: mx.array) -> Tuple[mx.array, mx.array]:
        """Dequantized rows at `indices` [B, H, K] -> [B, H, K, D] each."""
        keep = indices.astype(mx.int32)
        return tuple(self.codec.decode(self.codec.take_per_head(stored, keep), self.dtype)
                     for stored in (self.keys, self.values))

    @property
    def state(self):
        if self.keys is None:
            return {}
        held = [tuple(a[:, :, : self.length] for a in stored) for stored in (self.keys, self.values)]
        return {**self.codec.to_state("keys", held[0]), **self.codec.to_state("values", held[1])}

    @state.setter
    def state(self, arrays):
        self.keys = self.values = None
        self.length = 0
        # Through _write, so the buffers regain the capacity they grow by.
        self._write(self.codec.from_state("keys", arrays), self.codec.from_state("values", arrays))
        self.dtype = self.keys[1].dtype

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a.nbytes for a in self.keys + self.values)


class ExactRows:
    """Rows kept as they are (the codec for policies without --kv-bits)."""

    def encode(self, x):
        return x

    def decode(self, stored, dtype=None):
        return stored

    def concat(self, a, b):
        return b if a is None else mx.concatenate([a, b], axis=2)

    def take(self, stored, keep):
        return stored[:, :, keep]

    def take_per_head(self, stored, keep):
        return mx.take_along_axis(stored, keep[..., None], axis=2)

    def to_state(self, prefix, stored):
        return {} if stored is None else {prefix: stored}

    def from_state(self, prefix, arrays):
        return arrays.get(prefix)

    def nbytes(self, stored):
        return 0 if stored is None else stored.nbytes


class QuantizedRows:
    """Rows stored quantized per token (packed, scales, biases), so a policy can
    hold its kept tokens at `bits` (e.g. `--policy streaming --kv-bits 4`)."""

    PARTS = ("packed", "scales", "biases")

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size

    def encode(self, x):
        if x.shape[-1] % self.group_size:
            raise UserError(f"head dim {x.shape[-1]} is not a multiple of "
                            f"--kv-group-size {self.group_size}")
        return mx.quantize(x, group_size=self.group_size, bits=self.bits)

    def decode(self, stored, dtype=None):
        x = mx.dequantize(*stored, group_size=self.group_size, bits=self.bits)
        return x if dtype is None else x.astype(dtype)

    def concat(self, a, b):
        return b if a is None else tuple(mx.concatenate([x, y], axis=2) for x, y in zip(a, b))

    def take(self, stored, keep):
        return tuple(x[:, :, keep] for x in stored)

    def take_per_head(self, stored, keep):
        return tuple(mx.take_along_axis(x, keep[..., None], axis=2) for x in stored)

    def to_state(self, prefix, stored):
        if stored is None:
            return {}
        return {f"{prefix}_{part}": x for part, x in zip(self.PARTS, stored)}

    def from_state(self, prefix, arrays):
        if f"{prefix}_packed" not in arrays:
            return None
        return tuple(arrays[f"{prefix}_{part}"] for part in self.PARTS)

    def nbytes(self, stored):
        return 0 if stored is None else sum(x.nbytes for x in stored)


def rows_codec(bits: Optional[int], group_size: int):
    return ExactRows() if bits is None else QuantizedRows(bits, group_size)
