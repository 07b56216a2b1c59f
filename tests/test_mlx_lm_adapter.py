"""Our policies inside mlx-lm's own llama model and mlx_lm.generate."""

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_kvcache import make_cache
from mlx_kvcache.mlx_lm_adapter import make_mlx_lm_cache
from tests.helpers import mlx_lm_twin


@pytest.mark.parametrize("policy, args", [
    ("full", {}), ("refreshkv", {"budget": 4096}), ("streaming", {"budget": 4096}),
    ("snapkv", {"budget": 4096}), ("h2o", {"budget": 4096}),
])
def test_covering_budget_in_mlx_lm_equals_mlx_lm_kvcache(smollm2, policy, args):
    model, tokenizer = smollm2
    twin = mlx_lm_twin(model)
    prompt = "Explain why the sky is blue."
    expected = mlx_lm.generate(twin, tokenizer, prompt, max_tokens=24,
                               prompt_cache=make_prompt_cache(twin))
    cache = make_mlx_lm_cache(twin, policy, **args)
    assert mlx_lm.generate(twin, tokenizer, prompt, max_tokens=24, prompt_cache=cache) == expected
    assert cache[0].policy.offset > 24


def test_small_budget_runs_in_mlx_lm_and_matches_our_port(smollm2):
    model, tokenizer = smollm2
    twin = mlx_lm_twin(model)
    ids = tokenizer.encode("The capital of France is")
    ours = make_cache(model, "refreshkv", budget=4, refresh="stride", refresh_every=3)
    theirs = make_mlx_lm_cache(twin, "refreshkv", budget=4, refresh="stride", refresh_every=3)
    for cache, m in ((ours, model), (theirs, twin)):
        m(mx.array(ids[:-1])[None], cache=cache)
    token = ids[-1]
    for _ in range(10):
        a = model(mx.array([[token]]), cache=ours)
        b = twin(mx.array([[token]]), cache=theirs)
        assert mx.allclose(a, b, atol=1e-4)
        token = a[0, -1].argmax().item()
    assert theirs[0].policy.stats() == ours[0].stats()
    assert ours[0].stats()["partial_steps"] > 0
