from dataclasses import dataclass, field
from itertools import chain
from typing import ClassVar, Optional

import mlx.core as mx

from mlx_kvcache.attention import dense, refresh_scores
from mlx_kvcache.errors import UserError
from mlx_kvcache.quantized_attention import (blocked_attention, buffer_segment, decode_attention,
                                             exact_segment)
from mlx_kvcache.quantized_kv import QuantizedKV, QuantizedRows, check_quantization

from .budget import budget_field, budget_ratio_field, budget_rule, min_budget_field
from .h2o import H2OCache
from .registry import register


@register
@dataclass(eq=False)
class MixedCache:
    """Mixed precision ("No Token Left Behind", arXiv 2402.18096): nothing is
    evicted. The tokens H2O would keep (`budget`: heavy hitters + recent) stay
    at high precision (`high_bits` 16: the model's dtype, or 8); every token
    H2O would evict is demoted to `kv_bits` (2-4) instead of dropped.

    What marks a token important (`importance`): H2O's attention accumulated
    over every query so far (the paper's rule), or RefreshKV's selection: the
    attention of the current query alone, taken at the end of each prompt
    chunk and every `refresh_every` decode steps; between refreshes each new
    token enters the set and the lowest-scored one leaves it. Either way
    only the high-precision set is scored: a demoted token's lost bits cannot
    come back, so it is never promoted.
    """

    name: ClassVar[str] = "mixed"
    budget: Optional[int] = budget_field()
    budget_ratio: Optional[float] = budget_ratio_field()
    min_budget: Optional[int] = min_budget_field()
    high_bits: int = field(default=16, metadata={
        "choices": [16, 8], "help": "mixed: precision of the important tokens"})
    kv_bits: int = 4
    kv_group_size: int = 64
    importance: str = field(default="h2o", metadata={
        "choices": ["h2o", "refreshkv"],
        "help": "mixed: what keeps a token at high precision: H2O's accumulated attention, "
                "or RefreshKV's selection by the current query"})
    refresh_every: int = field(default=10, metadata={
        "help": "refreshkv --refresh stride, mixed --importance refreshkv: "
                "steps between refreshes"})

    def __post_init__(self):
        # Validated here so that errors name `mixed`, not the H2O inside it.
        budget_rule(self.name, self.budget, self.budget_ratio, self.min_budget)
        if self.high_bits not in (16, 8):
            raise UserError(f"mixed: --high-bits is 16 or 8, got {self.high_bits}")
        if self.kv_bits not in (2, 3, 4):
            raise UserError(f"mixed: --kv-bits (the demoted tokens) is 2, 3 or 4, got {self.kv_bits}")
        check_quantization(self.name, self.kv_bits, self.kv_group_size)
        if self.importance not in ("h2o", "refreshkv"):
            raise UserError(f"mixed: --importance is h2o or refreshkv, got {self.importance!r}")
        if self.refresh_every < 1:
            raise UserError("mixed: --refresh-every must be >= 1")
        self.important = H2OCache(budget=self.budget, budget_ratio=self.budget_ratio,
                                  min_budget=self.min_budget)
        if self.importance == "refreshkv":
            # The set is the top `budget` by the last refresh's scores, new
            # tokens included until the next refresh judges them.
            self.important.keep_recent = False
        self.steps_since_refresh = 0
        if self.high_bits == 8:
            self.important.codec = QuantizedRows(8, self.kv_group_size)
        self.demoted = QuantizedKV(self.kv_bits, self.kv_group_size)

    @property
    def offset(self) -> int:
        return self.important.offset

    def attend(self, queries, keys, values, *, rope, scale, mask):
        queries, keys, values = self.important.store(queries, keys, values, rope)
        if self.demoted.length == 0:
            out = dense(queries, keys, values, scale=scale, mask=mask)
        elif queries.shape[2] == 1:
            out = decode_attention(queries, scale, keys.shape[1],
                                   [buffer_segment(self.demoted), exact_segment(keys, values)])
        else:
            # Demoted tokens are all older than the important ones' newest, so
            # with the important block last a causal mask stays bottom-right.
            important = [(self.demoted.length, keys, values)]
            out = blocked_attention(queries, lambda: chain(self.demoted.blocks(), important),
                                    self.demoted.length + keys.shape[2], scale,
                                    causal=mask is not None)
        if self.importance == "h2o":
            self.important.accumulate(queries, keys, scale)
        else:
            self._refresh_scores(queries, keys, scale)
        # Demote right after each prompt chunk too, not only at decode steps as
        # H2O cuts: else every layer holds its whole prompt exact until then and
        # the prefill peaks above the full cache's.
        dropped = self.important.cut()
        if dropped is not None:
            codec = self.important.codec
            self.demoted.append(*(codec.decode(rows, values.dtype) for rows in dropped))
        if queries.shape[2] > 1:
            mx.eval(self.state)  # this layer's demotion now, not at the end of the forward pass
        return out

    def _refresh_scores(self, queries, keys, scale):
        """RefreshKV's rule over the high-precision set: at the end of a prompt
        chunk or every `refresh_every` steps, score it with the last query
        (softmax over the set, max over each GQA group); else the new token
        is unbeatable until then."""
        if queries.shape[2] == 1 and self.steps_since_refresh + 1 < self.refresh_every:
            self.steps_since_refresh += 1
            self.important.accumulated[..., -1:] = mx.inf
            return
        # No max-pooling (RefreshKV's pool_kernel): after the first demotion
        # neighbours in the set are not neighbours in the text.
        self.important.accumulated = refresh_scores(
            queries[:, :, -1:], keys, keys.shape[2], scale, pool_kernel=1)
        self.steps_since_refresh = 0

    def stats(self) -> dict:
        return {"kept_tokens": self.offset, "high_precision_tokens":
                self.important.stats()["kept_tokens"], "demoted_tokens": self.demoted.length}

    @property
    def state(self):
        return {**{f"important_{k}": v for k, v in self.important.state.items()},
                **self.demoted.state}

    @state.setter
    def state(self, arrays):
        important = {k[len("important_"):]: v for k, v in arrays.items()
                     if k.startswith("important_")}
        if important:
            self.important.state = important
        if "keys_packed" in arrays:
            self.demoted.state = arrays

    @property
    def nbytes(self) -> int:
        return self.important.nbytes + self.demoted.nbytes
