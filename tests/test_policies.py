"""Cache policies: each reproduces `full` exactly when its budget covers the
sequence, evicts what its paper says, and stays correct under chunked prefill."""

import mlx.core as mx
import pytest

from mlx_kvcache import UserError, cpu_attention, make_cache
from mlx_kvcache.attention import group_max, pool_max
from mlx_kvcache.generate import encode_prompt, generate, generate_step
from mlx_kvcache.policies import fork, reads_prompts_at_any_budget, with_budget
from mlx_kvcache.policies.selection import protect, select, top_k
from tests.helpers import TINY_CONFIGS, tiny_model

# Every policy, in settings that exercise its modes, with a budget >= any
# sequence these tests build.
COVERING = [
    ("streaming", {"budget": 4096}),
    ("streaming", {"budget": 4096, "positions": "cache"}),
    ("snapkv", {"budget": 4096}),
    ("snapkv", {"budget_ratio": 1.0, "window": 4}),
    ("h2o", {"budget": 4096}),
    ("refreshkv", {"budget": 4096}),
    ("refreshkv", {"budget": 4096, "refresh": "stride", "refresh_every": 3,
                   "refresh_mode": "score"}),
    ("refreshkv", {"budget": 4096, "refresh": "query", "qc": 2, "threshold": 0.99,
                   "query": "post-rope", "sinks": 4, "recent": 8}),
]


def run_logits(model, policy, prompt, n_decode, chunk=16, forced=None, **args):
    """Logits of a chunked prefill, then of `n_decode` single-token steps: the
    last prompt token, then greedy tokens (or the `forced` ones)."""
    cache = make_cache(model, policy, **args)
    out = []
    for i in range(0, len(prompt) - 1, chunk):
        out.append(model(mx.array(prompt[i : min(i + chunk, len(prompt) - 1)])[None], cache=cache))
    token = mx.array(prompt[-1:])
    for step in range(n_decode):
        logits = model(token[None], cache=cache)
        out.append(logits)
        token = logits[0, -1:].argmax(axis=-1) if forced is None else mx.array([forced[step]])
    return mx.concatenate(out, axis=1), cache


@pytest.mark.parametrize("policy, args", COVERING, ids=lambda x: str(x))
@pytest.mark.parametrize("arch", ["llama3", "qwen3", "gemma3"])
def test_covering_budget_reproduces_full_exactly(arch, policy, args):
    model = tiny_model(arch)
    prompt = [(7 * i + 3) % 256 for i in range(70)]
    expected, _ = run_logits(model, "full", prompt, 24)
    got, _ = run_logits(model, policy, prompt, 24, **args)
    assert mx.array_equal(got, expected)


@pytest.mark.parametrize("policy, args", COVERING[::2], ids=lambda x: str(x))
def test_covering_budget_reproduces_full_on_smollm2(smollm2, policy, args):
    model, tokenizer = smollm2
    with open("/usr/share/common-licenses/GPL-3") as f:
        prompt = tokenizer.encode(f.read()[:1500])
    expected, _ = run_logits(model, "full", prompt, 8, chunk=128)
    got, _ = run_logits(model, policy, prompt, 8, chunk=128, **args)
    assert mx.array_equal(got, expected)


def test_streaming_chunked_prefill_equals_one_piece():
    model = tiny_model("llama3")
    prompt = [(5 * i + 2) % 256 for i in range(90)]
    whole, _ = run_logits(model, "streaming", prompt, 10, chunk=1000, budget=24, sinks=4)
    chunked, cache = run_logits(model, "streaming", prompt, 10, chunk=7, budget=24, sinks=4)
    assert mx.allclose(whole[:, -10:], chunked[:, -10:], atol=1e-5)
    # A sliding window with sinks keeps exactly the first 4 and the last 20.
    expected = list(range(4)) + list(range(99 - 20, 99))  # 89 prefilled + 10 steps
    assert cache[0].kept_positions.tolist() == expected
    assert cache[0].keys.shape[2] == 24


def test_streaming_cache_positions_depend_only_on_what_is_kept():
    # One layer: kept keys depend only on their tokens. With slot positions the
    # next logits then depend only on the kept tokens, not on how long the
    # history was, which is what lets generation run past the trained context.
    model = tiny_model("llama3", layers=1)
    sinks, window = [1, 2, 3, 4], [50 + i for i in range(12)]
    short = sinks + [9] * 10 + window
    long = sinks + [7] * 300 + window

    def next_logits(positions, prompt):
        cache = make_cache(model, "streaming", budget=16, sinks=4, positions=positions)
        for t in prompt:
            logits = model(mx.array([[t]]), cache=cache)
        return logits

    assert mx.allclose(next_logits("cache", short), next_logits("cache", long), atol=1e-5)
    assert not mx.allclose(next_logits("original", short), next_logits("original", long),
                           atol=1e-3)


def test_snapkv_keeps_window_and_budget_and_ignores_chunking():
    model = tiny_model("qwen3")
    prompt = [(11 * i + 5) % 256 for i in range(80)]
    whole, a = run_logits(model, "snapkv", prompt, 12, chunk=1000, budget=30, window=8)
    chunked, b = run_logits(model, "snapkv", prompt, 12, chunk=9, budget=30, window=8)
    assert mx.allclose(whole, chunked[:, -whole.shape[1]:], atol=1e-5)
    # 30 kept at the cut (after the last prompt token), then 11 generated appended.
    assert a[0].storage.offset == 30 + 11 and a[0].offset == 80 + 11


def test_h2o_keeps_recent_half_and_budget():
    model = tiny_model("llama3")
    prompt = [(3 * i + 1) % 256 for i in range(60)]
    _, cache = run_logits(model, "h2o", prompt, 15, budget=20)
    layer = cache[1]
    assert layer.keys.shape[2] == 20 and layer.offset == 59 + 15
    for head in layer.kept_positions[0].tolist():
        assert head == sorted(head)
        assert set(range(74 - 10, 74)) <= set(head)  # the 10 most recent


def test_selection_pools_reduces_groups_and_picks_top_k():
    scores = mx.array([[[0, 0, 5, 0, 0, 0, 0, 0, 1, 0]]], dtype=mx.float32)
    assert pool_max(scores, 3).tolist() == [[[0, 5, 5, 5, 0, 0, 0, 1, 1, 1]]]
    heads = mx.array([[[1.0, 0, 0], [0, 2, 0], [0, 0, 3], [4, 0, 0]]])  # 4 q heads
    assert group_max(heads, 2).tolist() == [[[1, 2, 0], [4, 0, 3]]]
    assert top_k(mx.array([[[0.1, 0.9, 0.5, 0.7]]]), 2).tolist() == [[[1, 3]]]
    assert protect(mx.zeros((1, 1, 6)), 1, 2).tolist()[0][0] == [
        float("inf"), 0, 0, 0, float("inf"), float("inf")]
    probs = mx.zeros((1, 2, 1, 20)).at[0, 0, 0, 13].add(1.0).at[0, 1, 0, 2].add(0.5)
    indices, chosen_scores = select(probs, 1, 2, pool_kernel=1)
    assert indices.tolist() == [[[2, 13]]]
    assert chosen_scores.tolist() == [[[0.5, 1.0]]]


def test_refreshkv_stride_schedule_counts():
    model = tiny_model("llama3")
    prompt = [(3 * i + 1) % 256 for i in range(64)]
    _, cache = run_logits(model, "refreshkv", prompt, 21, budget=8, refresh="stride",
                          refresh_every=5)
    for layer in cache:
        # The first step selects (a full step), then every 5th step refreshes.
        assert layer.stats()["full_steps"] == 5 and layer.stats()["partial_steps"] == 16
        assert layer.stats()["retained_tokens"] == 8
        assert layer.offset == 64 + 20


def test_refreshkv_query_schedule_refreshes_when_the_query_drifts():
    model = tiny_model("qwen3")
    prompt = [(3 * i + 1) % 256 for i in range(64)]
    distinct = list(range(100, 121))  # distinct tokens: no two queries are equal
    _, never = run_logits(model, "refreshkv", prompt, 21, forced=distinct, budget=8, qc=2,
                          threshold=-1.0)
    _, always = run_logits(model, "refreshkv", prompt, 21, forced=distinct, budget=8, qc=2,
                           threshold=1.0)
    assert all(layer.stats()["full_steps"] == 1 for layer in never)
    # Checked on every 2nd step; a cosine never exceeds 1, so each check refreshes.
    assert all(layer.stats()["full_steps"] == 11 for layer in always)


def test_refreshkv_partial_steps_attend_only_to_the_retained_set():
    model = tiny_model("llama3")
    prompt = [(3 * i + 1) % 256 for i in range(64)]
    small, _ = run_logits(model, "refreshkv", prompt, 6, budget=4, refresh="stride",
                          refresh_every=100)
    full, _ = run_logits(model, "full", prompt, 6)
    # The step that selects attends fully; the partial steps after it do not.
    assert mx.array_equal(small[:, :4], full[:, :4])
    assert not mx.allclose(small[:, -1], full[:, -1], atol=1e-4)


def test_refreshkv_between_refreshes_slides_its_window_and_keeps_its_sinks():
    # One selection at the prompt's end, then no refresh for 40 steps: the
    # scored picks leave first, then the oldest new tokens; the sinks stay.
    model = tiny_model("llama3")
    prompt = [(3 * i + 1) % 256 for i in range(30)]
    _, cache = run_logits(model, "refreshkv", prompt, 41, budget=8, sinks=4,
                          refresh="stride", refresh_every=1000)
    newest = cache[0].offset - 1
    for layer in cache:
        assert layer.stats()["full_steps"] == 1
        for head in layer.retained[0].tolist():
            assert sorted(head) == [0, 1, 2, 3] + list(range(newest - 3, newest + 1))


@pytest.mark.parametrize("policy, args, message", [
    ("streaming", {"budget": 4, "sinks": 4}, "--sinks"),
    ("streaming", {"min_budget": 4, "sinks": 4}, r"\[0, --min-budget\)"),
    ("streaming", {"budget": 8, "positions": "slot"}, "--positions"),
    ("streaming", {"budget": 8, "min_budget": 100}, "--min-budget is the floor"),
    ("snapkv", {"budget": 10, "budget_ratio": 0.1}, "not both"),
    ("snapkv", {"budget": 16, "window": 32}, "--budget .16. must exceed --window"),
    ("snapkv", {"min_budget": 16, "window": 32}, "--min-budget .16. must exceed --window"),
    ("h2o", {"budget": 0}, "--budget must be >= 1"),
    ("h2o", {"min_budget": -1}, "--min-budget must be >= 0"),
    # mixed holds an H2O inside: the error still names the policy asked for.
    ("mixed", {"budget": 0}, "^mixed: --budget must be >= 1"),
    ("mixed", {"budget_ratio": 0.0}, "^mixed: --budget-ratio"),
    ("refreshkv", {"budget_ratio": 1.5}, "--budget-ratio"),
    ("refreshkv", {"refresh_every": 0}, ">= 1"),
    ("refreshkv", {"threshold": 2.0}, "--threshold"),
    ("full", {"budget": 3}, "takes no arguments"),
    ("lru", {}, "unknown policy"),
])
def test_invalid_settings_are_user_errors(policy, args, message):
    with pytest.raises(UserError, match=message):
        make_cache(tiny_model("qwen3"), policy, **args)


def test_policies_report_real_bytes():
    model = tiny_model("llama3")
    prompt = [(3 * i + 1) % 256 for i in range(64)]
    cfg = TINY_CONFIGS["llama3"]
    row = cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"]) * 4 * 2
    _, full = run_logits(model, "full", prompt, 4)
    _, streaming = run_logits(model, "streaming", prompt, 4, budget=16)
    assert full[0].nbytes == 256 * row  # one 256-token block
    assert streaming[0].nbytes == 16 * row + 16 * 4  # rows + int32 positions


# Every budgeted policy as a user gets it from `--policy NAME` alone (mixed's
# quantization groups sized to the tiny model's head dim, 32).
MIXED = {"kv_group_size": 32}
DEFAULTS = [
    ("streaming", {}), ("snapkv", {}), ("h2o", {}), ("refreshkv", {}),
    ("refreshkv", {"refresh": "stride"}), ("mixed", MIXED),
    ("mixed", {"importance": "refreshkv", **MIXED}),
]


@pytest.mark.parametrize("policy, args", DEFAULTS, ids=lambda x: str(x))
def test_defaults_under_the_floor_are_full_attention_bit_for_bit(policy, args):
    # 70 prompt tokens + 24 steps: under the default floor (256 tokens).
    model = tiny_model("llama3")
    prompt = [(7 * i + 3) % 256 for i in range(70)]
    expected, _ = run_logits(model, "full", prompt, 24)
    got, _ = run_logits(model, policy, prompt, 24, **args)
    assert mx.array_equal(got, expected)


@pytest.mark.parametrize("policy, args", [d for d in DEFAULTS if d[0] != "snapkv"],
                         ids=lambda x: str(x))
def test_a_ratio_budget_is_exact_up_to_its_floor_and_compresses_past_it(policy, args):
    model = tiny_model("llama3")
    prompt = [(7 * i + 3) % 256 for i in range(30)]
    forced = [(11 * i + 5) % 256 for i in range(40)]
    expected, _ = run_logits(model, "full", prompt, 40, forced=forced)
    got, _ = run_logits(model, policy, prompt, 40, forced=forced,
                        budget_ratio=0.25, min_budget=40, **args)
    # Row p holds the logits after position p, with p + 1 tokens of context.
    assert mx.array_equal(got[:, :40], expected[:, :40])
    assert not mx.array_equal(got[:, 40:], expected[:, 40:])


def held(layer) -> int:
    """What a budgeted policy holds to attend to at full precision."""
    stats = layer.stats()
    for key in ("retained_tokens", "high_precision_tokens"):
        if key in stats:
            return stats[key]
    return stats["kept_tokens"]


@pytest.mark.parametrize("policy, args", DEFAULTS, ids=lambda x: str(x))
def test_the_budget_grows_with_the_context(policy, args):
    # A 38-token prompt, then 1,000 tokens: the ratio (1/8) is of the context
    # now, never below the floor (here 32 tokens), never of the prompt alone.
    model = tiny_model("llama3", layers=1)
    window = {"window": 8} if policy == "snapkv" else {}  # under the floor
    cache = make_cache(model, policy, min_budget=32, **window, **args)
    prompt = [(7 * i + 3) % 256 for i in range(38)]
    model(mx.array(prompt[:-1])[None], cache=cache)
    tokens = prompt[-1:] + [(13 * i + 40) % 256 for i in range(1000)]
    for context, token in enumerate(tokens, start=len(prompt)):
        mx.eval(model(mx.array([[token]]), cache=cache))
        if policy == "snapkv":
            # Cut once at the prompt's end, to 32 (the floor over 38/8), then
            # the generated tokens are appended and never evicted.
            expected = 32 + context - len(prompt)
        else:
            expected = min(context, max(32, -(-context // 8)))
        assert held(cache[0]) == expected, context
    assert held(cache[0]) == (32 + 1000 if policy == "snapkv" else 130)


def test_snapkv_cuts_each_new_prompt_to_the_budget_of_the_context_then():
    # A chat: each turn's prompt ends in a cut, to 1/8 of the context so far.
    model = tiny_model("qwen3")
    cache = make_cache(model, "snapkv", min_budget=40, window=8)
    for turn in range(3):
        prompt = [(11 * i + 5 * turn) % 256 for i in range(300)]
        model(mx.array(prompt[:-1])[None], cache=cache)
        for token in prompt[-1:] + [1, 2, 3]:
            mx.eval(model(mx.array([[token]]), cache=cache))
    # Cut to max(40, ceil(context / 8)) at each turn's last prompt token.
    assert cache[0].offset == 3 * 303
    assert cache[0].storage.offset == -(-(2 * 303 + 300) // 8) + 3


def test_refreshkv_on_a_short_chat_prompt_grows_its_retained_set(smollm2):
    # The issue's prompt through SmolLM2's chat template (38 tokens), then
    # generated tokens. The old default resolved its ratio of the prompt once:
    # 5 tokens at 1/8 for the whole run. Now every token is retained up to the
    # floor (40 here, just over the prompt), then the ratio of the context so
    # far (1/4 here, so that 140 tokens pass 160 of context).
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    prompt = encode_prompt(tokenizer, tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True))
    assert len(prompt) == 38
    cache = make_cache(model, "refreshkv", min_budget=40, budget_ratio=0.25)
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    seen = []
    for _, _ in zip(range(140), generate_step(prompt, model, cache, greedy)):
        context = cache[0].offset
        retained = {layer.stats()["retained_tokens"] for layer in cache}
        assert retained == {min(context, max(40, -(-context // 4)))}, context
        seen.append(retained.pop())
    assert seen[0] == 38 + 1 and seen[-1] == -(-cache[0].offset // 4) > 40
    assert all(a <= b for a, b in zip(seen, seen[1:]))


@pytest.fixture(scope="module")
def fulls_poem(smollm2):
    """The issue's prompt and what --policy full writes after it (60 tokens)."""
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return prompt, generate(model, tokenizer, prompt, max_tokens=60)


@pytest.mark.parametrize("policy, args", [
    ("snapkv", {}), ("h2o", {}), ("mixed", {}), ("refreshkv", {"refresh": "stride"}),
    ("streaming", {}),
], ids=lambda x: str(x))
def test_every_budgeted_policy_alone_writes_fulls_poem(smollm2, fulls_poem, policy, args):
    # The prompt, each policy with its defaults only (the CLI test
    # runs --policy refreshkv the same way).
    model, tokenizer = smollm2
    prompt, expected = fulls_poem
    assert generate(model, tokenizer, prompt, max_tokens=60, policy=policy, **args) == expected


@pytest.mark.parametrize("policy, args", [
    ("full", {}), ("streaming", {"budget": 40}), ("snapkv", {"budget": 40}),
    ("h2o", {"budget": 40}), ("refreshkv", {"budget": 40}), ("mixed", {"budget": 40, **MIXED}),
    ("quantized", {"kv_bits": 4, "kv_group_size": 32}),
    ("kivi", {"kv_bits": 4, "kv_group_size": 32}),
], ids=lambda x: str(x))
def test_a_forked_cache_goes_on_as_the_original_would_and_alone(policy, args):
    model = tiny_model("llama3")
    prompt = [(7 * i + 3) % 256 for i in range(70)]
    cache = make_cache(model, policy, **args)
    model(mx.array(prompt)[None], cache=cache)
    copy = fork(cache)
    step = mx.array([[5]])
    forked = [model(step, cache=copy) for _ in range(3)]
    assert cache[0].offset == 70 and copy[0].offset == 73  # the original untouched
    assert all(mx.array_equal(model(step, cache=cache), f) for f in forked)


def test_an_h2o_prefill_serves_every_budget_exactly():
    # benchmarks/long_context.py prefills H2O once for L/16 and L/8.
    model = tiny_model("llama3")
    prompt = [(7 * i + 3) % 256 for i in range(90)]
    steps = [mx.array([[t]]) for t in (5, 9, 11, 2)]

    def prefilled(**budget):
        cache = make_cache(model, "h2o", **budget)
        model(mx.array(prompt)[None], cache=cache)
        return cache

    track = prefilled(budget_ratio=1 / 16, min_budget=8)
    for budget in ({"budget_ratio": 1 / 4, "min_budget": 8},
                   {"budget_ratio": 1 / 16, "min_budget": 8}, {"budget": 30}):
        direct, moved = prefilled(**budget), with_budget(track, model, "h2o", **budget)
        for step in steps:
            assert mx.array_equal(model(step, cache=direct), model(step, cache=moved))
        assert moved[0].stats()["kept_tokens"] == direct[0].stats()["kept_tokens"] < 90
    assert track[0].offset == 90 and track[0].stats()["kept_tokens"] == 90  # untouched
    assert not reads_prompts_at_any_budget("streaming")
    with pytest.raises(ValueError, match="depends on its budget"):
        with_budget(track, model, "mixed", budget=30)


def test_h2o_scores_alike_in_one_pass_and_in_two(monkeypatch):
    # On the CPU a large float32 prompt chunk gets its output and H2O's scores
    # from one pass (cpu_attention); elsewhere the rows are scored again.
    model = tiny_model("llama3")
    prompt = [(5 * i + 2) % 256 for i in range(120)]
    monkeypatch.setattr(cpu_attention, "MIN_SCORES", 0)
    one_logits, one = run_logits(model, "h2o", prompt, 12, chunk=40, budget=48)
    monkeypatch.setattr(cpu_attention, "MIN_SCORES", 1 << 62)
    two_logits, two = run_logits(model, "h2o", prompt, 12, chunk=40, budget=48)
    assert mx.allclose(one_logits, two_logits, atol=1e-4).item()
    for a, b in zip(one, two):
        assert mx.array_equal(a.kept_positions, b.kept_positions)
        assert mx.allclose(a.accumulated, b.accumulated, atol=1e-4, rtol=1e-5).item()
