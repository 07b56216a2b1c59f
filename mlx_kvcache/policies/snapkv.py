from dataclasses import dataclass, field
from typing import ClassVar, Optional

import mlx.core as mx

from mlx_kvcache.attention import dense, gather_rows, scores
from mlx_kvcache.errors import UserError

from .budget import budget_field, budget_ratio_field, budget_rule, min_budget_field
from .full import FullCache
from .protocol import rotate
from .registry import register
from .selection import select


@register
@dataclass(eq=False)
class SnapKVCache:
    """SnapKV (arXiv 2404.14469): once a prompt is in, keep per layer and KV
    head the tokens the last `window` prompt queries attend to most (summed,
    max-pooled, GQA groups reduced by max), plus the window itself. Generated
    tokens are appended and never evicted.

    A prompt is prefilled with full attention; the cut happens at the first
    single-token step after it, which in the generation loop is the prompt's
    last token, so the window is the prompt's real last queries. Each new
    prompt (a chat turn) is cut again, to the budget of the context then (a
    ratio of it, never below the floor: a context within the floor is kept
    whole).
    """

    name: ClassVar[str] = "snapkv"
    budget: Optional[int] = budget_field()
    budget_ratio: Optional[float] = budget_ratio_field()
    min_budget: Optional[int] = min_budget_field()
    window: int = field(default=32, metadata={
        "help": "snapkv: prompt queries that vote (observation window)"})
    pool_kernel: int = field(default=7, metadata={
        "help": "max-pool kernel over token scores (snapkv, refreshkv)"})

    def __post_init__(self):
        self.budget_rule = budget_rule(self.name, self.budget, self.budget_ratio,
                                       self.min_budget)
        if self.window < 1 or self.pool_kernel < 1:
            raise UserError("snapkv: --window and --pool-kernel must be >= 1")
        if self.budget_rule.least <= self.window:
            flag = "--budget" if self.budget is not None else "--min-budget"
            raise UserError(f"snapkv: {flag} ({self.budget_rule.least}) must exceed "
                            f"--window ({self.window})")
        self.storage = FullCache()  # rows kept, in cache order
        self.window_queries = None  # the last queries of the prompt being read
        self.offset = 0

    def attend(self, queries, keys, values, *, rope, scale, mask):
        queries = rotate(rope, queries, self.offset)
        keys, values = self.storage.append(rotate(rope, keys, self.offset), values)
        self.offset += queries.shape[2]
        out = dense(queries, keys, values, scale=scale, mask=mask)
        reading_prompt = queries.shape[2] > 1 or self.window_queries is not None
        if reading_prompt:
            recent = queries if self.window_queries is None else mx.concatenate(
                [self.window_queries, queries], axis=2)
            self.window_queries = recent[:, :, -self.window :]
            if queries.shape[2] == 1:
                self._compress(keys, values, scale)
        return out

    def _compress(self, keys, values, scale):
        """Cut the kept rows (in time order, per head) to the budget."""
        n = keys.shape[2]
        k = self.budget_rule.at(self.offset)
        window_queries, self.window_queries = self.window_queries, None
        w = window_queries.shape[2]
        if k >= n:
            return
        prefix = n - w
        # Rows are in time order, so row i is causally before row j when i < j.
        q_rows = mx.arange(prefix, n)[:, None]
        probs = scores(window_queries, keys, scale, mask=mx.arange(n)[None] <= q_rows)
        chosen, _ = select(probs[..., :prefix], keys.shape[1], k - w,
                           pool_kernel=self.pool_kernel)
        B, H = chosen.shape[:2]
        recent = mx.broadcast_to(mx.arange(prefix, n, dtype=mx.uint32), (B, H, w))
        kept = mx.concatenate([chosen, recent], axis=-1)
        self.storage = FullCache()
        self.storage.append(gather_rows(keys, kept), gather_rows(values, kept))

    def stats(self) -> dict:
        return {"kept_tokens": self.storage.offset}

    @property
    def state(self):
        arrays = dict(self.storage.state)
        if self.window_queries is not None:
            arrays["window_queries"] = self.window_queries
        return arrays

    @state.setter
    def state(self, arrays):
        self.storage.state = arrays
        self.window_queries = arrays.get("window_queries")

    @property
    def nbytes(self) -> int:
        held = 0 if self.window_queries is None else self.window_queries.nbytes
        return self.storage.nbytes + held
