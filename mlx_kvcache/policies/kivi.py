from dataclasses import dataclass, field
from itertools import chain
from typing import ClassVar

import mlx.core as mx

from mlx_kvcache.attention import dense
from mlx_kvcache.errors import UserError
from mlx_kvcache.quantized_attention import (blocked_attention, decode_attention, exact_segment,
                                             packed_channel_scores, packed_weighted_sum)
from mlx_kvcache.quantized_kv import QuantizedRows, check_quantization

from .protocol import rotate
from .registry import register

BLOCKS_PER_READ = 32  # key blocks dequantized together during attention


@register
@dataclass(eq=False)
class KIVICache:
    """KIVI (arXiv 2402.02750): keys quantized per CHANNEL over blocks of
    `kv_group_size` tokens (outlier channels get their own scale), values per
    token; the newest `residual` tokens stay in full precision and are
    quantized `kv_group_size` at a time as they age.

    MLX quantizes along the last axis, so a key block is stored transposed,
    [B, Hkv, D, G], quantized along its G tokens.
    """

    name: ClassVar[str] = "kivi"
    kv_bits: int = 4
    kv_group_size: int = field(default=32)
    residual: int = field(default=128, metadata={
        "help": "kivi: newest tokens kept in full precision"})

    def __post_init__(self):
        check_quantization(self.name, self.kv_bits, self.kv_group_size)
        if self.residual < 0:
            raise UserError("kivi: --residual must be >= 0")
        self.recent_keys = self.recent_values = None  # the residual, exact (< R + G rows)
        self.key_blocks = None  # (packed, scales, biases) of [B, Hkv, blocks * D, G]
        self.value_codec = QuantizedRows(self.kv_bits, self.kv_group_size)
        self.quantized_values = None  # per token, [B, Hkv, tokens, ...]
        self.quantized_tokens = 0
        self.offset = 0

    def attend(self, queries, keys, values, *, rope, scale, mask):
        queries = rotate(rope, queries, self.offset)
        keys = rotate(rope, keys, self.offset)
        self.offset += keys.shape[2]
        recent_keys = keys if self.recent_keys is None else mx.concatenate(
            [self.recent_keys, keys], axis=2)
        recent_values = values if self.recent_values is None else mx.concatenate(
            [self.recent_values, values], axis=2)
        self.recent_keys, self.recent_values = recent_keys, recent_values
        if self.quantized_tokens == 0:
            out = dense(queries, recent_keys, recent_values, scale=scale, mask=mask)
        elif queries.shape[2] == 1:
            out = decode_attention(queries, scale, keys.shape[1], [
                self._quantized_segment, exact_segment(recent_keys, recent_values)])
        else:
            recent = [(self.quantized_tokens, recent_keys, recent_values)]
            out = blocked_attention(queries, lambda: chain(self._quantized_blocks(), recent),
                                    self.offset, scale, causal=mask is not None)
        self._age(recent_keys, recent_values)
        if queries.shape[2] > 1:
            # Quantize this layer's prompt now: left to the end of the lazy
            # forward pass, every layer's exact rows would be alive at once and
            # the prefill would peak as high as the full cache's.
            mx.eval(self.state)
        return out

    def _age(self, keys, values):
        """Quantize the oldest whole groups beyond the residual window."""
        G = self.kv_group_size
        n = keys.shape[2]
        groups = max(0, n - self.residual) // G
        if groups == 0:
            return
        old = groups * G
        B, H, _, D = keys.shape
        # [B, H, old, D] -> [B, H, groups * D, G]: each row one channel of one block.
        transposed = keys[:, :, :old].reshape(B, H, groups, G, D).swapaxes(-1, -2)
        packed = mx.quantize(transposed.reshape(B, H, groups * D, G), group_size=G,
                             bits=self.kv_bits)
        self.key_blocks = packed if self.key_blocks is None else tuple(
            mx.concatenate([a, b], axis=2) for a, b in zip(self.key_blocks, packed))
        self.quantized_values = self.value_codec.concat(
            self.quantized_values, self.value_codec.encode(values[:, :, :old]))
        self.quantized_tokens += old
        # Copies, not slices: a slice would keep the whole chunk's exact rows
        # alive (measured: 52 MiB held after a 1K prompt for 13 MiB of cache).
        newest = mx.arange(old, n)
        self.recent_keys = mx.take(keys, newest, axis=2)
        self.recent_values = mx.take(values, newest, axis=2)

    def _quantized_segment(self, q):
        G, bits = self.kv_group_size, self.kv_bits
        logits = packed_channel_scores(q, self.key_blocks, self.quantized_tokens // G, bits, G)
        return logits, lambda p: packed_weighted_sum(p, self.quantized_values, bits, G)

    def _quantized_blocks(self):
        G = self.kv_group_size
        D = self.key_blocks[0].shape[2] // (self.quantized_tokens // G)
        rows_per_read = BLOCKS_PER_READ * D
        for start in range(0, self.key_blocks[0].shape[2], rows_per_read):
            part = [a[:, :, start : start + rows_per_read] for a in self.key_blocks]
            blocks = mx.dequantize(*part, group_size=G, bits=self.kv_bits)
            B, H, rows, _ = blocks.shape
            keys = blocks.reshape(B, H, rows // D, D, G).swapaxes(-1, -2).reshape(B, H, -1, D)
            first = start // D * G
            rows = tuple(a[:, :, first : first + keys.shape[2]] for a in self.quantized_values)
            dtype = self.recent_values.dtype
            yield first, keys.astype(dtype), self.value_codec.decode(rows, dtype)

    def stats(self) -> dict:
        return {"kept_tokens": self.offset, "quantized_tokens": self.quantized_tokens}

    @property
    def state(self):
        arrays = {}
        if self.recent_keys is not None:
            arrays.update(recent_keys=self.recent_keys, recent_values=self.recent_values)
        if self.key_blocks is not None:
            arrays.update(self.value_codec.to_state("key_blocks", self.key_blocks))
            arrays.update(self.value_codec.to_state("values", self.quantized_values))
        return arrays

    @state.setter
    def state(self, arrays):
        self.recent_keys = arrays.get("recent_keys")
        self.recent_values = arrays.get("recent_values")
        self.key_blocks = self.value_codec.from_state("key_blocks", arrays)
        self.quantized_values = self.value_codec.from_state("values", arrays)

    @property
    def nbytes(self) -> int:
        blocks = 0 if self.key_blocks is None else sum(a.nbytes for a in self.key_blocks)
        recent = 0 if self.recent_keys is None else (
            self.recent_keys.nbytes + self.recent_values.nbytes)
        return recent + blocks + self.value_codec.nbytes(self.quantized_values)
