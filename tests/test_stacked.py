"""Several policies' caches stepped as one batch (mlx_kvcache/stacked.py) give
each policy the perplexity it gets alone, on real weights and text."""

import pytest

from mlx_kvcache.evaluate import (PolicySpec, greedy, greedy_together, prefill, read_text,
                                  window_nll, window_nll_together)
from mlx_kvcache.policies import fork
from mlx_kvcache.stacked import stack

TEXT = "/usr/share/common-licenses/GPL-3"
# Budgets well under the window, so every policy drops, selects or quantizes.
# The plain quantized cache rounds every new key on its own, and rounding is
# where a summation order shows: at 4 bits on SmolLM2, scaling the embeddings by
# 1 + 1e-7 moves its logits by up to 3.5 within 16 steps, alone. At 8 bits it
# stays within REL_QUANTIZED of itself; every other policy within REL.
SPECS = [PolicySpec("full"), PolicySpec("streaming", {"budget": 48}),
         PolicySpec("snapkv", {"budget": 48}), PolicySpec("refreshkv", {"budget": 48}),
         PolicySpec("h2o", {"budget": 48}), PolicySpec("mixed", {"budget": 48, "kv_bits": 4}),
         PolicySpec("quantized", {"kv_bits": 8}), PolicySpec("kivi", {"kv_bits": 2})]
REL, REL_QUANTIZED = 1e-4, 5e-3


def prefilled(model, spec, prompt):
    cache = spec.cache(model, len(prompt))
    prefill(model, cache, prompt)
    return cache


# Gemma's steps are costly here (a 262K-token vocabulary): its hybrid layers
# are checked under a policy of each kind (evicting, selecting, quantized).
GEMMA_SPECS = [s for s in SPECS if s.name in ("full", "streaming", "refreshkv", "kivi")]


@pytest.mark.parametrize("name, specs", [("smollm2", SPECS), ("gemma", GEMMA_SPECS)],
                         ids=["smollm2", "gemma"])
def test_every_policy_scores_in_a_batch_as_it_does_alone(name, specs, request):
    model, tokenizer = request.getfixturevalue(name)
    window = tokenizer.encode(read_text(TEXT), add_special_tokens=False)[:200]
    scored = 20
    caches = [prefilled(model, spec, window[:-scored]) for spec in specs]
    alone = [window_nll(model, spec, window, scored, cache=fork(cache))[0]
             for spec, cache in zip(specs, caches)]
    together = window_nll_together(model, caches, window, scored, alone=3)
    for spec, nll, (batched, ms) in zip(specs, alone, together):
        # Batched matmuls sum in another order: logits ~4e-5 apart in float32.
        rel = REL_QUANTIZED if spec.name == "quantized" else REL
        assert batched == pytest.approx(nll, rel=rel), spec.label()
        assert ms > 0
    # The policies really differ here, so agreement is not a single number.
    assert len({round(nll, 3) for nll in alone}) >= len(specs) - 3
    assert caches[0][0].offset == len(window) - 1


def test_every_policy_generates_in_a_batch_what_it_generates_alone(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.encode(read_text(TEXT), add_special_tokens=False)[:200]
    caches = [prefilled(model, spec, prompt) for spec in SPECS]
    alone = [greedy(model, fork(cache), prompt, 12, prefilled=True) for cache in caches]
    # A stop token met by the first row only ends that row.
    stop = alone[0][4]
    expected = [tokens[: tokens.index(stop)] if stop in tokens else tokens for tokens in alone]
    assert len({tuple(tokens) for tokens in expected}) >= 3, expected
    assert greedy_together(model, caches, prompt[-1], 12, stop=(stop,)) == expected


def test_caches_at_different_offsets_do_not_stack(smollm2):
    model, tokenizer = smollm2
    tokens = tokenizer.encode("one two three four five six", add_special_tokens=False)
    short, long = (prefilled(model, PolicySpec("full"), tokens[:n]) for n in (3, 5))
    with pytest.raises(ValueError, match="different offsets"):
        stack([short, long])
