"""Our cache policies inside mlx-lm's own models and `mlx_lm.generate`.

mlx-lm's attention layers rotate queries and keys themselves, call
`cache.update_and_fetch(keys, values)`, then
`scaled_dot_product_attention(queries, keys, values, cache=cache, ...)`. The
policy needs the queries, which only that second call sees, so `make_mlx_lm_cache`
routes it: the model's module gets a `scaled_dot_product_attention` that sends
calls carrying a `PolicyCache` to the policy's `attend` (with rope=None: already
rotated) and every other call to mlx-lm's own function, unchanged.
"""

import sys

from mlx_lm.models import base as mlx_lm_base

from mlx_kvcache.policies import make_cache

_mlx_lm_sdpa = mlx_lm_base.scaled_dot_product_attention


class PolicyCache:
    """mlx-lm's cache protocol around one of our layer policies."""

    def __init__(self, policy):
        self.policy = policy
        self._pending = None

    @property
    def offset(self) -> int:
        return self.policy.offset

    def update_and_fetch(self, keys, values):
        # Nothing is stored yet: the policy stores and attends in one step,
        # when the queries arrive.
        self._pending = (keys, values)
        return keys, values

    def attend(self, queries, *, scale, mask):
        keys, values = self._pending
        self._pending = None
        return self.policy.attend(queries, keys, values, rope=None, scale=scale, mask=mask)

    @property
    def state(self):
        return self.policy.state

    @property
    def nbytes(self) -> int:
        return self.policy.nbytes

    def empty(self) -> bool:
        return self.policy.offset == 0

    def is_trimmable(self) -> bool:
        return False


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    if isinstance(cache, PolicyCache):
        if sinks is not None:
            raise ValueError("learned attention sinks are not supported by cache policies")
        return cache.attend(queries, scale=scale, mask=mask)
    return _mlx_lm_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def make_mlx_lm_cache(model, policy: str = "full", **policy_args) -> list:
    """A prompt cache for an mlx-lm model, e.g.
    `mlx_lm.generate(model, tokenizer, prompt, prompt_cache=make_mlx_lm_cache(model, "refreshkv", budget=512))`.
    """
    module = sys.modules[type(model).__module__]
    if getattr(module, "scaled_dot_product_attention", None) is not scaled_dot_product_attention:
        if not hasattr(module, "scaled_dot_product_attention"):
            raise ValueError(f"{module.__name__} does not call scaled_dot_product_attention")
        module.scaled_dot_product_attention = scaled_dot_product_attention
    return [PolicyCache(p) for p in make_cache(model, policy, **policy_args)]
