"""The full-cache baseline is exact: our ports + the `full` policy against
mlx-lm's own models and KVCache on the same weights."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_kvcache import make_cache
from tests.helpers import TINY_CONFIGS, mlx_lm_twin, ours_vs_mlx_lm, tiny_model


def prefill_logits(model, prompt, cache):
    return model(mx.array(prompt)[None], cache=cache)


def test_smollm2_greedy_tokens_match_mlx_lm(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.encode("The history of the printing press begins")
    ours, theirs = ours_vs_mlx_lm(model, prompt, 64)
    assert ours == theirs
    # Not a degenerate run: the model says different things.
    assert len(set(ours)) > 10


def test_smollm2_logits_match_mlx_lm(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.encode("The capital of France is")
    ours = prefill_logits(model, prompt, make_cache(model, "full"))
    twin = mlx_lm_twin(model)
    theirs = prefill_logits(twin, prompt, make_prompt_cache(twin))
    assert mx.array_equal(ours, theirs)
    assert tokenizer.decode([ours[0, -1].argmax().item()]) == " Paris"


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_models_match_mlx_lm(name):
    model = tiny_model(name)
    prompt = [(7 * i + 3) % 256 for i in range(40)]
    # A small prefill step makes the comparison cover chunked prefill too.
    ours, theirs = ours_vs_mlx_lm(model, prompt, 32, prefill_step_size=16)
    assert ours == theirs
    ours = prefill_logits(model, prompt, make_cache(model, "full"))
    twin = mlx_lm_twin(model)
    theirs = prefill_logits(twin, prompt, make_prompt_cache(twin))
    assert mx.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_one_piece():
    model = tiny_model("llama3")
    prompt = [(5 * i + 1) % 256 for i in range(50)]
    whole = make_cache(model, "full")
    chunked = make_cache(model, "full")
    expected = prefill_logits(model, prompt, whole)
    pieces = [prefill_logits(model, prompt[i : i + 16], chunked) for i in range(0, 50, 16)]
    assert mx.allclose(mx.concatenate(pieces, axis=1), expected, atol=1e-5)
    assert all(c.offset == 50 for c in chunked)


def test_port_without_cache_equals_full_policy():
    model = tiny_model("qwen3")
    prompt = mx.array([[1, 2, 3, 4, 5, 6]])
    assert mx.allclose(model(prompt), model(prompt, cache=make_cache(model)), atol=1e-6)
