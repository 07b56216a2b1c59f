from dataclasses import dataclass, field
from typing import ClassVar, Optional

import mlx.core as mx

from mlx_kvcache.attention import dense, refresh_scores, sparse
from mlx_kvcache.distributed import world
from mlx_kvcache.errors import UserError
from mlx_kvcache.quantized_attention import attend_quantized
from mlx_kvcache.quantized_kv import QuantizedKV, check_quantization

from .budget import budget_field, budget_ratio_field, budget_rule, min_budget_field
from .full import FullCache
from .protocol import rotate
from .registry import register
from .selection import top_scored

# The score of a token admitted between refreshes: the largest float32, above
# any attention probability, below the +inf of tokens a refresh guarantees.
NEW_TOKEN = float(mx.finfo(mx.float32).max)


@register
@dataclass(eq=False)
class RefreshKVCache:
    """RefreshKV (arXiv 2411.05787): keep the whole cache, attend to a small
    retained set on most steps, and refresh that set from the whole cache now
    and then.

    Prefill uses full attention. At the first single-token step (the last prompt
    token) the query's attention row over all tokens, max-pooled and reduced
    over each GQA group by max, picks the budget's tokens per KV head (a ratio
    of the context now, never below the floor, resolved at every step: while
    the context fits the floor every token is selected). Partial
    steps attend only to them (sparse attention); each new token joins the set
    and the lowest-scored selected token leaves. Full steps score the whole
    cache with the current query and rebuild the set: `refresh_mode="full"`
    also attends to everything on that step (the paper), `"score"` reads only
    the keys and then attends to the new set. The schedule is per layer:
    `stride` refreshes every `refresh_every` steps; `query` (the paper's
    default) compares every `qc` steps the head-averaged query with the one of
    the last refresh and refreshes below cosine `threshold`.

    `full_cache_bits` (our extension) stores the whole cache quantized: it is
    read only to score and on full steps, while the retained rows are kept
    dequantized in the model's dtype for the partial steps.
    """

    name: ClassVar[str] = "refreshkv"
    budget: Optional[int] = budget_field()
    budget_ratio: Optional[float] = budget_ratio_field()
    min_budget: Optional[int] = min_budget_field()
    refresh: str = field(default="query", metadata={
        "choices": ["query", "stride"], "help": "refreshkv: when to refresh the selection"})
    refresh_every: int = field(default=10, metadata={
        "help": "refreshkv --refresh stride, mixed --importance refreshkv: "
                "steps between refreshes"})
    # Measured on Qwen2.5-Coder-0.5B at 8K tokens, L/8 (docs/benchmarks.md,
    # RefreshKV's trade-off): the paper's qc=5 / 0.85 almost never refreshed
    # there (3% of layer-steps; 1.23x full's perplexity, worse than
    # StreamingLLM's 1.08x); qc=2 / 0.9 refreshes 9% of layer-steps for 1.06x
    # at StreamingLLM's cost, 0.95 23% for 1.04x.
    qc: int = field(default=2, metadata={
        "help": "refreshkv --refresh query: steps between query checks"})
    threshold: float = field(default=0.9, metadata={
        "help": "refreshkv --refresh query: refresh below this cosine similarity"})
    refresh_mode: str = field(default="full", metadata={
        "choices": ["full", "score"],
        "help": "refreshkv: full attention on refresh steps, or scores only"})
    query: str = field(default="pre-rope", metadata={
        "choices": ["pre-rope", "post-rope"], "help": "refreshkv: query compared by the schedule"})
    pool_kernel: int = 7
    # Not in the paper: measured here, a layer whose query schedule rarely
    # refreshes lives on its sliding window of new tokens, and without the
    # first tokens (StreamingLLM's attention sinks) that window degrades
    # (growing-context table).
    sinks: int = field(default=4)
    recent: int = field(default=0, metadata={
        "help": "refreshkv: newest tokens always selected at a refresh"})
    full_cache_bits: Optional[int] = field(default=None, metadata={
        "parse": int, "help": "refreshkv: store the whole cache quantized to 4 or 8 bits"})
    kv_group_size: int = 64

    def __post_init__(self):
        self.budget_rule = budget_rule(self.name, self.budget, self.budget_ratio,
                                       self.min_budget)
        if self.refresh_every < 1 or self.qc < 1 or self.pool_kernel < 1:
            raise UserError("refreshkv: --refresh-every, --qc and --pool-kernel must be >= 1")
        if not -1 <= self.threshold <= 1:
            raise UserError(f"refreshkv: --threshold is a cosine in [-1, 1], got {self.threshold}")
        if self.sinks < 0 or self.recent < 0:
            raise UserError("refreshkv: --sinks and --recent must be >= 0")
        if self.full_cache_bits is None:
            self.full_cache = FullCache()
        else:
            if self.full_cache_bits not in (4, 8):
                raise UserError("refreshkv: --full-cache-bits is 4 or 8")
            check_quantization(self.name, self.full_cache_bits, self.kv_group_size)
            self.full_cache = QuantizedKV(self.full_cache_bits, self.kv_group_size)
        self.offset = 0
        self.partial_keys = self.partial_values = None  # quantized full cache only
        self.retained = None  # [B, Hkv, k] token indices into the full cache
        self.retained_scores = None  # [B, Hkv, k] float32; new tokens get NEW_TOKEN
        self.refreshed_query = None  # [B, D] the schedule compares against it
        self.steps_since_refresh = 0
        self.full_steps = 0
        self.partial_steps = 0
        # Sharded (mlx.launch): this rank holds some of the heads, and the
        # schedule's head-averaged query must average over every rank's.
        self.ranks = world()

    @property
    def quantized(self) -> bool:
        return self.full_cache_bits is not None

    def attend(self, queries, keys, values, *, rope, scale, mask):
        schedule_query = queries
        queries = rotate(rope, queries, self.offset)
        if self.query == "post-rope":
            schedule_query = queries
        keys = rotate(rope, keys, self.offset)
        self.offset += keys.shape[2]
        new_keys, new_values = keys, values
        if self.quantized:
            self.full_cache.append(keys, values)
        else:
            keys, values = self.full_cache.append(keys, values)
        if queries.shape[2] > 1:
            # Prompt chunks (or a new chat turn): full attention; the next
            # single-token step selects afresh.
            self.retained = None
            return self._attend_all(queries, keys, values, scale, mask)
        if self.retained is None or self._due(schedule_query):
            return self._full_step(queries, keys, values, scale, schedule_query)
        self._admit_newest(self.offset - 1, new_keys, new_values)
        self.partial_steps += 1
        self.steps_since_refresh += 1
        return self._attend_retained(queries, scale)

    def is_trimmable(self) -> bool:
        return True  # the whole cache is kept

    def trim(self, n: int) -> None:
        """Forget the last n tokens. The selection goes with them: the next
        single-token step selects afresh, as it does after any prompt chunk."""
        self.offset -= n
        self.full_cache.trim(n)
        self.retained = self.retained_scores = None
        self.partial_keys = self.partial_values = None

    def _attend_all(self, queries, keys, values, scale, mask):
        if self.quantized:
            return attend_quantized(queries, self.full_cache, scale, causal=mask is not None)
        return dense(queries, keys, values, scale=scale, mask=mask)

    def _attend_retained(self, queries, scale):
        if self.quantized:
            return dense(queries, self.partial_keys, self.partial_values, scale=scale)
        # The whole buffers, not the valid slice: gathering rows from a
        # contiguous array does not copy it.
        storage = self.full_cache
        return sparse(queries, storage.keys, storage.values, self.retained, scale)

    def _mean_query(self, schedule_query):
        mean = schedule_query.mean(axis=(1, 2)).astype(mx.float32)
        if self.ranks is not None:  # every rank holds as many heads
            mean = mx.distributed.all_sum(mean, group=self.ranks) / self.ranks.size()
        return mean

    def _due(self, schedule_query) -> bool:
        if self.refresh == "stride":
            return self.steps_since_refresh + 1 >= self.refresh_every
        if (self.steps_since_refresh + 1) % self.qc:
            return False
        now = self._mean_query(schedule_query)
        then = self.refreshed_query
        cosine = (now * then).sum(-1) / (
            mx.linalg.norm(now, axis=-1) * mx.linalg.norm(then, axis=-1) + 1e-12)
        # One Python decision per layer every qc steps (a sync, as in the paper).
        return bool((cosine < self.threshold).any().item())

    def _full_step(self, queries, keys, values, scale, schedule_query):
        n = self.offset
        storage = self.full_cache
        quantization = (storage.bits, storage.group_size) if self.quantized else None
        # The whole buffer, not the valid slice: the fused kernel reads it in place.
        per_head = refresh_scores(queries, storage.keys, n, scale, self.pool_kernel, quantization)
        self.retained, self.retained_scores = top_scored(
            per_head, min(self.budget_rule.at(n), n), sinks=self.sinks, recent=self.recent)
        if self.quantized:
            self.partial_keys, self.partial_values = self.full_cache.gather(self.retained)
        self.refreshed_query = self._mean_query(schedule_query)
        self.full_steps += 1
        self.steps_since_refresh = 0
        if self.refresh_mode == "full":
            return self._attend_all(queries, keys, values, scale, None)
        return self._attend_retained(queries, scale)

    def _admit_newest(self, position: int, new_keys, new_values):
        """The new token joins the retained set: appended while the set is
        under the budget (which grows with the context), else in place of the
        lowest-scored selected token, the oldest of them on a tie.

        A new token is scored NEW_TOKEN until the next refresh judges it:
        above every attention score, below the +inf of the guaranteed sinks.
        So between refreshes the set loses its scored tokens first, then its
        oldest new ones (a sliding window), never its sinks. (Breaking ties
        by slot instead, once every slot held a new token the same slot was
        overwritten at every step: the set froze, all but the newest token.)"""
        B, H, k = self.retained.shape
        newest = mx.full((B, H, 1), position, dtype=self.retained.dtype)
        score = mx.full((B, H, 1), NEW_TOKEN, dtype=mx.float32)
        if k < self.budget_rule.at(self.offset):
            self.retained = mx.concatenate([self.retained, newest], axis=-1)
            self.retained_scores = mx.concatenate([self.retained_scores, score], axis=-1)
            if self.quantized:
                self.partial_keys = mx.concatenate([self.partial_keys, new_keys], axis=2)
                self.partial_values = mx.concatenate([self.partial_values, new_values], axis=2)
            return
        lowest = self.retained_scores.min(axis=-1, keepdims=True)
        later = mx.array(position, dtype=self.retained.dtype)
        victim = mx.argmin(mx.where(self.retained_scores == lowest, self.retained, later),
                           axis=-1, keepdims=True)
        self.retained = mx.put_along_axis(self.retained, victim, newest, axis=-1)
        self.retained_scores = mx.put_along_axis(self.retained_scores, victim, score, axis=-1)
        if self.quantized:
            rows = victim[..., None]
            self.partial_keys = mx.put_along_axis(self.partial_keys, rows, new_keys, axis=2)
            self.partial_values = mx.put_along_axis(self.partial_values, rows, new_values, axis=2)

    def stats(self) -> dict:
        steps = self.full_steps + self.partial_steps
        return {"kept_tokens": self.offset,
                "retained_tokens": 0 if self.retained is None else self.retained.shape[-1],
                "full_steps": self.full_steps, "partial_steps": self.partial_steps,
                "effective_stride": steps / self.full_steps if self.full_steps else None}

    def _selection(self) -> dict:
        arrays = {"retained": self.retained, "retained_scores": self.retained_scores,
                  "refreshed_query": self.refreshed_query,
                  "partial_keys": self.partial_keys, "partial_values": self.partial_values}
        return {k: v for k, v in arrays.items() if v is not None}

    @property
    def state(self):
        return {**self.full_cache.state, **self._selection()}

    @state.setter
    def state(self, arrays):
        self.full_cache.state = arrays
        for name in ("retained", "retained_scores", "refreshed_query", "partial_keys",
                     "partial_values"):
            setattr(self, name, arrays.get(name))

    @property
    def nbytes(self) -> int:
        return self.full_cache.nbytes + sum(a.nbytes for a in self._selection().values())
