from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx

from mlx_kvcache.attention import dense

from .protocol import rotate
from .registry import register


@register
@dataclass(eq=False)
class FullCache:
    """The plain growing cache: every token kept, dense attention over all of them.

    The baseline: it must give mlx-lm's `KVCache` logits token for token, and any
    other policy whose budget covers the sequence must give its logits. Other
    policies use it as storage for the whole sequence (composition).
    """

    name: ClassVar[str] = "full"
    # Grow the buffers in blocks, as mlx-lm's KVCache does, so appending one
    # token per step does not copy the whole cache.
    step: ClassVar[int] = 256

    def __post_init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def append(self, keys: mx.array, values: mx.array):
        """Store [B, Hkv, L, D] keys/values; return all keys/values held."""
        prev = self.offset
        if self.keys is None or prev + keys.shape[2] > self.keys.shape[2]:
            B, n_kv_heads, L, k_head_dim = keys.shape
            n_steps = (self.step + L - 1) // self.step
            new_k = mx.zeros((B, n_kv_heads, n_steps * self.step, k_head_dim), keys.dtype)
            new_v = mx.zeros(
                (B, n_kv_heads, n_steps * self.step, values.shape[3]), values.dtype
            )
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                if prev % self.step != 0:
                    self.keys = self.keys[..., :prev, :]
                    self.values = self.values[..., :prev, :]
                self.keys = mx.concatenate([self.keys, new_k], axis=2)
                self.values = mx.concatenate([self.values, new_v], axis=2)
        self.offset += keys.shape[2]
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def attend(self, queries, keys, values, *, rope, scale, mask):
        queries = rotate(rope, queries, self.offset)
        keys = rotate(rope, keys, self.offset)
        keys, values = self.append(keys, values)
        return dense(queries, keys, values, scale=scale, mask=mask)

    def stats(self) -> dict:
        return {"kept_tokens": self.offset}

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> None:
        # The rows stay in the buffer, past the offset, until overwritten.
        self.offset -= n

    @property
    def state(self):
        if self.keys is None:
            return {}
        return {
            "keys": self.keys[..., : self.offset, :],
            "values": self.values[..., : self.offset, :],
        }

    @state.setter
    def state(self, arrays):
        self.keys = self.values = None
        self.offset = 0
        self.append(arrays["keys"], arrays["values"])

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes
