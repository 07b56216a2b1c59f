from dataclasses import dataclass, field
from typing import ClassVar, Optional

import mlx.core as mx

from mlx_kvcache.attention import dense, scores

from .budget import check_budget, resolve_budget
from .protocol import rotate
from .registry import register


@register
@dataclass(eq=False)
class H2OCache:
    """Heavy-Hitter Oracle (NeurIPS 2023): per layer and KV head, an accumulated
    attention score per kept token (summed over every query, prompt included,
    and over the query heads of the GQA group); keep the `budget/2` heaviest
    plus the `budget/2` most recent, evicting one token per step once full.

    The prompt is prefilled with full attention (scores accumulate); the cut to
    the budget happens at the first single-token step. Each step computes the
    score rows besides the attention output, so H2O is slower than full
    attention (the RefreshKV paper measured 0.70x on Llama-3.1-8B).
    """

    name: ClassVar[str] = "h2o"
    budget: Optional[int] = field(default=None, metadata={"parse": int})
    budget_ratio: Optional[float] = field(default=None, metadata={"parse": float})

    def __post_init__(self):
        check_budget(self.name, self.budget, self.budget_ratio)
        self.keys = self.values = None
        self.accumulated = None  # [B, Hkv, n] float32
        self.kept_positions = None  # [B, Hkv, n] int32: evictions differ per head
        self.capacity = None  # tokens kept, fixed at the first cut
        self.offset = 0

    def attend(self, queries, keys, values, *, rope, scale, mask):
        B, n_kv_heads, L, _ = keys.shape
        queries = rotate(rope, queries, self.offset)
        keys = rotate(rope, keys, self.offset)
        positions = mx.broadcast_to(
            mx.arange(self.offset, self.offset + L, dtype=mx.int32), (B, n_kv_heads, L))
        if self.keys is None:
            self.keys, self.values, self.kept_positions = keys, values, positions
            self.accumulated = mx.zeros((B, n_kv_heads, L), mx.float32)
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
            self.kept_positions = mx.concatenate([self.kept_positions, positions], axis=2)
            self.accumulated = mx.concatenate(
                [self.accumulated, mx.zeros((B, n_kv_heads, L), mx.float32)], axis=2)
        self.offset += L

        # Kept tokens are in position order until the first eviction; after it
        # only single-token steps come, which need no mask.
        out = dense(queries, self.keys, self.values, scale=scale, mask=mask)
        causal = None
        if L > 1:
            n = self.keys.shape[2]
            causal = mx.arange(n)[None] <= mx.arange(n - L, n)[:, None]
        probs = scores(queries, self.keys, scale, mask=causal).sum(axis=2)
        group = probs.shape[1] // n_kv_heads
        self.accumulated += probs.reshape(B, n_kv_heads, group, -1).sum(axis=2)

        if L == 1:
            if self.capacity is None:
                self.capacity = resolve_budget(self.budget, self.budget_ratio, self.offset)
            self._evict()
        return out

    def _evict(self):
        n = self.keys.shape[2]
        excess = n - self.capacity
        if excess <= 0:
            return
        recent = self.capacity - self.capacity // 2
        # The `recent` newest positions are never candidates.
        threshold = self.offset - recent
        candidates = mx.where(self.kept_positions < threshold, self.accumulated, mx.inf)
        order = mx.argsort(-candidates, axis=-1)[..., : n - excess]
        keep = mx.sort(order, axis=-1)
        self.keys = mx.take_along_axis(self.keys, keep[..., None], axis=2)
        self.values = mx.take_along_axis(self.values, keep[..., None], axis=2)
        self.kept_positions = mx.take_along_axis(self.kept_positions, keep, axis=2)
        self.accumulated = mx.take_along_axis(self.accumulated, keep, axis=2)

    def stats(self) -> dict:
        return {"kept_tokens": 0 if self.keys is None else self.keys.shape[2]}

    @property
    def state(self):
        if self.keys is None:
            return {}
        return {"keys": self.keys, "values": self.values,
                "kept_positions": self.kept_positions, "accumulated": self.accumulated}

    @state.setter
    def state(self, arrays):
        self.keys, self.values = arrays["keys"], arrays["values"]
        self.kept_positions, self.accumulated = arrays["kept_positions"], arrays["accumulated"]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state.values())
