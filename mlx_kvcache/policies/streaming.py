from dataclasses import dataclass, field
from typing import ClassVar, Optional

import mlx.core as mx

from mlx_kvcache.attention import dense
from mlx_kvcache.errors import UserError
from mlx_kvcache.quantized_kv import check_quantization, rows_codec

from .budget import budget_field, budget_ratio_field, budget_rule, min_budget_field
from .protocol import rotate
from .registry import register


@register
@dataclass(eq=False)
class StreamingCache:
    """StreamingLLM (arXiv 2309.17453): the first `sinks` tokens plus the most
    recent `budget - sinks`; every query, in prefill too, attends to the sinks
    and its own recent window, so prefill in chunks equals prefill in one piece.
    A ratio budget is resolved per position (the window of the query at
    position p is the budget of a (p+1)-token context): it grows by at most one
    token per token, so a token once evicted is never wanted again.

    positions="original": keys keep their RoPE positions (mlx-lm's
    RotatingKVCache). positions="cache": keys are stored before RoPE and rotated
    by their slot in the cache at every step (the paper's choice), so positions
    never exceed the budget and generation can run past the trained context.
    With `kv_bits` the kept tokens are stored quantized (eviction and
    quantization compose).
    """

    name: ClassVar[str] = "streaming"
    budget: Optional[int] = budget_field()
    budget_ratio: Optional[float] = budget_ratio_field()
    min_budget: Optional[int] = min_budget_field()
    sinks: int = field(default=4, metadata={
        "help": "first tokens always kept (streaming) or selected (refreshkv); 4"})
    positions: str = field(default="original", metadata={
        "choices": ["original", "cache"],
        "help": "streaming: RoPE by original position, or by slot in the cache"})
    kv_bits: Optional[int] = field(default=None, metadata={"parse": int})
    kv_group_size: int = 64

    def __post_init__(self):
        self.budget_rule = budget_rule(self.name, self.budget, self.budget_ratio,
                                       self.min_budget)
        if not 0 <= self.sinks < self.budget_rule.least:
            flag = "--budget" if self.budget is not None else "--min-budget"
            raise UserError(f"streaming: --sinks must be in [0, {flag}), got {self.sinks}")
        if self.positions not in ("original", "cache"):
            raise UserError(f"streaming: --positions is original or cache, not {self.positions!r}")
        if self.kv_bits is not None:
            check_quantization(self.name, self.kv_bits, self.kv_group_size)
        self.codec = rows_codec(self.kv_bits, self.kv_group_size)
        self.keys = self.values = None  # stored by the codec (maybe quantized)
        self.kept_positions = mx.zeros((0,), mx.int32)
        self.offset = 0

    def attend(self, queries, keys, values, *, rope, scale, mask):
        if mask is not None and not isinstance(mask, str):
            raise ValueError("streaming computes its own mask; got an explicit mask array")
        L = queries.shape[2]
        start = self.offset
        by_slot = self.positions == "cache"
        if by_slot and rope is None:
            raise UserError("streaming --positions cache needs unrotated keys; "
                            "this model rotates them itself (use positions=original)")
        if not by_slot:
            queries, keys = rotate(rope, queries, start), rotate(rope, keys, start)
        new_positions = mx.arange(start, start + L, dtype=mx.int32)
        dtype = values.dtype
        keys = self.codec.concat(self.keys, self.codec.encode(keys))
        values = self.codec.concat(self.values, self.codec.encode(values))
        positions = mx.concatenate([self.kept_positions, new_positions])
        if L == 1:
            # One query: evict first, then it sees exactly sinks + window, no mask.
            keys, values, positions = self._evict(keys, values, positions, start + 1)
            step_mask = None
        else:
            # A query at position p sees key positions k <= p with k < sinks
            # or k > p - window(p): the same keys as if prefilled in one piece.
            windows = mx.array([self._window(p + 1) for p in range(start, start + L)])
            k_pos, q_pos = positions[None, :], new_positions[:, None]
            step_mask = (k_pos <= q_pos) & (
                (k_pos < self.sinks) | (k_pos > q_pos - windows[:, None])
            )
        attended_keys = self.codec.decode(keys, dtype)
        if by_slot:
            queries = rotate(rope, queries, positions.shape[0] - L)
            attended_keys = rotate(rope, attended_keys, 0)
        out = dense(queries, attended_keys, self.codec.decode(values, dtype), scale=scale,
                    mask=step_mask)
        if L > 1:
            keys, values, positions = self._evict(keys, values, positions, start + L)
        self.keys, self.values, self.kept_positions = keys, values, positions
        self.offset += L
        return out

    def _window(self, context: int) -> int:
        """Recent tokens kept beside the sinks when the context holds `context`."""
        return self.budget_rule.at(context) - self.sinks

    def _evict(self, keys, values, positions, context: int):
        n = positions.shape[0]
        if n <= self.budget_rule.at(context):
            return keys, values, positions
        keep = mx.concatenate([mx.arange(self.sinks), mx.arange(n - self._window(context), n)])
        return self.codec.take(keys, keep), self.codec.take(values, keep), positions[keep]

    def stats(self) -> dict:
        return {"kept_tokens": self.kept_positions.shape[0]}

    @property
    def state(self):
        if self.keys is None:
            return {}
        return {**self.codec.to_state("keys", self.keys),
                **self.codec.to_state("values", self.values),
                "kept_positions": self.kept_positions}

    @state.setter
    def state(self, arrays):
        self.keys = self.codec.from_state("keys", arrays)
        self.values = self.codec.from_state("values", arrays)
        self.kept_positions = arrays["kept_positions"]

    @property
    def nbytes(self) -> int:
        return (self.codec.nbytes(self.keys) + self.codec.nbytes(self.values)
                + self.kept_positions.nbytes)
