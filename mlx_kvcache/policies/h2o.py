from dataclasses import dataclass
from typing import ClassVar, Optional

import mlx.core as mx

from mlx_kvcache.attention import dense_and_received, received
from mlx_kvcache.quantized_kv import ExactRows

from .budget import budget_field, budget_ratio_field, budget_rule, min_budget_field
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
    the budget happens at every single-token step, the budget resolved for the
    context then (a ratio of it, never below the floor). Each step computes the
    score rows besides the attention output, so H2O is slower than full
    attention (the RefreshKV paper measured 0.70x on Llama-3.1-8B).
    """

    name: ClassVar[str] = "h2o"
    # The prompt is read whole and nothing is cut before the first
    # single-token step, so a prefilled cache is the same at every budget.
    reads_prompts_at_any_budget: ClassVar[bool] = True
    budget: Optional[int] = budget_field()
    budget_ratio: Optional[float] = budget_ratio_field()
    min_budget: Optional[int] = min_budget_field()

    def __post_init__(self):
        self.budget_rule = budget_rule(self.name, self.budget, self.budget_ratio,
                                       self.min_budget)
        self.codec = ExactRows()  # `mixed` keeps its important rows 8-bit
        self.keys = self.values = None
        self.accumulated = None  # [B, Hkv, n] float32
        self.kept_positions = None  # [B, Hkv, n] int32: evictions differ per head
        self.keep_recent = True  # half the capacity always the newest tokens
        self.offset = 0
        self.dtype = None

    def attend(self, queries, keys, values, *, rope, scale, mask):
        queries, keys, values = self.store(queries, keys, values, rope)
        # Kept tokens are in position order until the first eviction; after it
        # only single-token steps come, which need no mask.
        out, received_now = dense_and_received(queries, keys, values, scale=scale, mask=mask)
        self.accumulated += received_now
        if queries.shape[2] == 1:
            self.cut()
        return out

    def store(self, queries, keys, values, rope):
        """Rotate, append; return the queries and every kept key/value row."""
        B, n_kv_heads, L, _ = keys.shape
        self.dtype = values.dtype
        queries = rotate(rope, queries, self.offset)
        keys = rotate(rope, keys, self.offset)
        positions = mx.broadcast_to(
            mx.arange(self.offset, self.offset + L, dtype=mx.int32), (B, n_kv_heads, L))
        zeros = mx.zeros((B, n_kv_heads, L), mx.float32)
        self.keys = self.codec.concat(self.keys, self.codec.encode(keys))
        self.values = self.codec.concat(self.values, self.codec.encode(values))
        if self.kept_positions is None:
            self.kept_positions, self.accumulated = positions, zeros
        else:
            self.kept_positions = mx.concatenate([self.kept_positions, positions], axis=2)
            self.accumulated = mx.concatenate([self.accumulated, zeros], axis=2)
        self.offset += L
        return (queries, self.codec.decode(self.keys, self.dtype),
                self.codec.decode(self.values, self.dtype))

    def accumulate(self, queries, keys, scale):
        self.accumulated += received(queries, keys, scale)

    def cut(self):
        """Evict down to the budget; return the evicted (keys, values) as
        stored, or None."""
        capacity = self.budget_rule.at(self.offset)
        n = self.kept_positions.shape[2]
        excess = n - capacity
        if excess <= 0:
            return None
        recent = capacity - capacity // 2 if self.keep_recent else 0
        # The `recent` newest positions are never candidates.
        candidates = mx.where(self.kept_positions < self.offset - recent, self.accumulated, mx.inf)
        order = mx.argsort(-candidates, axis=-1)
        keep, evicted = mx.sort(order[..., :-excess], axis=-1), order[..., -excess:]
        dropped = (self.codec.take_per_head(self.keys, evicted),
                   self.codec.take_per_head(self.values, evicted))
        self.keys = self.codec.take_per_head(self.keys, keep)
        self.values = self.codec.take_per_head(self.values, keep)
        self.kept_positions = mx.take_along_axis(self.kept_positions, keep, axis=2)
        self.accumulated = mx.take_along_axis(self.accumulated, keep, axis=2)
        return dropped

    def stats(self) -> dict:
        return {"kept_tokens": 0 if self.kept_positions is None else self.kept_positions.shape[2]}

    @property
    def state(self):
        if self.keys is None:
            return {}
        return {**self.codec.to_state("keys", self.keys),
                **self.codec.to_state("values", self.values),
                "kept_positions": self.kept_positions, "accumulated": self.accumulated}

    @state.setter
    def state(self, arrays):
        self.keys = self.codec.from_state("keys", arrays)
        self.values = self.codec.from_state("values", arrays)
        self.kept_positions, self.accumulated = arrays["kept_positions"], arrays["accumulated"]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return (self.codec.nbytes(self.keys) + self.codec.nbytes(self.values)
                + self.kept_positions.nbytes + self.accumulated.nbytes)
