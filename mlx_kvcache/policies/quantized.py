from dataclasses import dataclass, field
from typing import ClassVar

from mlx_kvcache.attention import dense
from mlx_kvcache.errors import UserError
from mlx_kvcache.quantized_attention import attend_quantized
from mlx_kvcache.quantized_kv import QuantizedKV, check_quantization

from .full import FullCache
from .protocol import rotate
from .registry import register


@register
@dataclass(eq=False)
class QuantizedCache:
    """Uniform KV quantization (as mlx-lm's QuantizedKVCache): every token's keys
    and values quantized along head_dim to `kv_bits`, in groups of
    `kv_group_size` channels. Until the cache holds `quantized_kv_start` tokens
    it stays in full precision (mlx-lm's --quantized-kv-start); then all of it
    is quantized.

    Attention dequantizes a block of tokens at a time (online softmax), so it
    never holds a full-precision copy of the cache.
    """

    name: ClassVar[str] = "quantized"
    kv_bits: int = field(default=8, metadata={"help": "bits per key/value element (2,3,4,6,8)"})
    kv_group_size: int = field(default=64, metadata={
        "help": "channels sharing one scale and bias (32, 64, 128)"})
    quantized_kv_start: int = field(default=0, metadata={
        "help": "quantized: keep full precision until the cache holds this many tokens"})

    def __post_init__(self):
        check_quantization(self.name, self.kv_bits, self.kv_group_size)
        if self.quantized_kv_start < 0:
            raise UserError("quantized: --quantized-kv-start must be >= 0")
        self.exact = FullCache()  # until quantized_kv_start is passed
        self.packed = QuantizedKV(self.kv_bits, self.kv_group_size)
        self.offset = 0

    def attend(self, queries, keys, values, *, rope, scale, mask):
        queries = rotate(rope, queries, self.offset)
        keys = rotate(rope, keys, self.offset)
        self.offset += keys.shape[2]
        if self.packed.length == 0 and self.offset <= self.quantized_kv_start:
            keys, values = self.exact.append(keys, values)
            return dense(queries, keys, values, scale=scale, mask=mask)
        if self.exact.offset:
            held = self.exact.state
            self.packed.append(held["keys"], held["values"])
            self.exact = FullCache()
        self.packed.append(keys, values)
        return attend_quantized(queries, self.packed, scale, causal=mask is not None)

    def stats(self) -> dict:
        return {"kept_tokens": self.offset, "quantized_tokens": self.packed.length}

    @property
    def state(self):
        return {**self.exact.state, **self.packed.state}

    @state.setter
    def state(self, arrays):
        if "keys" in arrays:
            self.exact.state = arrays
        if "keys_packed" in arrays:
            self.packed.state = arrays

    @property
    def nbytes(self) -> int:
        return self.exact.nbytes + self.packed.nbytes
