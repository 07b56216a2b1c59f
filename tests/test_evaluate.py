"""python -m mlx_kvcache.evaluate: the three fidelity tasks, their JSON, and
their errors. Run on a tiny random-weight model written as a GGUF file, so the
protocol (not the model) is what is tested."""

import json

import pytest

from mlx_kvcache.evaluate import main, needle_prompt, rouge_l, windows
from tests.helpers import tiny_model, write_gguf

TEXT = "/usr/share/common-licenses/GPL-3"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return str(write_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", tiny_model("llama3")))


def evaluate(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_rouge_l_and_windows():
    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l([1, 9, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert rouge_l([5], [1, 2]) == 0.0
    cut = windows(list(range(100)), 10, 4)
    assert [w[0] for w in cut] == [0, 30, 60, 90] and all(len(w) == 10 for w in cut)


def test_ppl_compares_policies_on_the_same_windows(tmp_path, capsys, tiny_gguf):
    out_json = tmp_path / "ppl.json"
    code, out, err = evaluate(
        capsys, "--task", "ppl", "--model", tiny_gguf, "--text-file", TEXT,
        "--context", "160", "--score-last", "32", "--windows", "2",
        "--policy", "full,streaming,refreshkv", "--budget-ratio", "2.0",
        "--json", str(out_json))
    assert code == 1 and "--budget-ratio" in err  # ratios are fractions
    code, out, err = evaluate(
        capsys, "--task", "ppl", "--model", tiny_gguf, "--text-file", TEXT,
        "--context", "160", "--score-last", "32", "--windows", "2",
        "--policy", "full,streaming,refreshkv,h2o", "--budget", "4096", "--json", str(out_json))
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert report["task"] == "ppl" and report["context"] == 160
    full, streaming, refresh, h2o = report["results"]
    assert full["args"] == {} and streaming["args"] == {"budget": 4096}
    assert len(full["per_window"]) == 2
    # Budgets covering the window: every policy gives full's perplexity.
    for result in (streaming, refresh, h2o):
        assert result["ppl"] == full["ppl"] and result["ratio_to_full"] == 1.0
    assert "streaming(budget=4096): ppl" in out

    code, out, err = evaluate(
        capsys, "--task", "ppl", "--model", tiny_gguf, "--text-file", TEXT,
        "--context", "160", "--score-last", "32", "--windows", "1",
        "--policy", "full,streaming,snapkv", "--budget-ratio", "0.25", "--min-budget", "16",
        "--window", "8", "--json", str(out_json))
    assert code == 0, err
    full, streaming, snapkv = json.loads(out_json.read_text())["results"]
    assert streaming["args"] == {"budget_ratio": 0.25, "min_budget": 16}
    assert streaming["ppl"] != full["ppl"] and snapkv["ppl"] != full["ppl"]


def test_ppl_with_a_short_prompt_scores_a_growing_context(tmp_path, capsys, tiny_gguf):
    out_json = tmp_path / "grow.json"
    code, out, err = evaluate(
        capsys, "--task", "ppl", "--model", tiny_gguf, "--text-file", TEXT,
        "--context", "160", "--prompt-tokens", "16", "--block", "48", "--start", "500",
        "--windows", "1", "--policy", "full,refreshkv,h2o", "--min-budget", "64",
        "--json", str(out_json))
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert report["score_last"] == 144 and report["block"] == 48
    full, refresh, h2o = report["results"]
    assert len(full["block_ppl"]) == 3 and "per block" in out
    # The first block is read with at most 64 tokens of context (the floor):
    # exactly full attention; past it the budget (64, then 1/8) bites.
    for result in (refresh, h2o):
        assert result["block_ppl"][0] == full["block_ppl"][0]
        assert result["block_ppl"][1:] != full["block_ppl"][1:]


def test_longform_and_needle(tmp_path, capsys, tiny_gguf):
    out_json = tmp_path / "lf.json"
    code, _, err = evaluate(
        capsys, "--task", "longform", "--model", tiny_gguf, "--text-file", TEXT,
        "--context", "128", "--max-tokens", "12", "--windows", "1",
        "--policy", "full,streaming", "--budget", "32", "--json", str(out_json))
    assert code == 0, err
    full, streaming = json.loads(out_json.read_text())["results"]
    assert full["agreement"] == 1.0 and full["rouge_l"] == 1.0
    assert full["first_divergence"] == 12
    assert 0 <= streaming["agreement"] <= 1

    code, _, err = evaluate(
        capsys, "--task", "needle", "--model", tiny_gguf, "--haystack-file", TEXT,
        "--context", "600", "--depths", "0.2,0.8", "--windows", "1",
        "--policy", "full", "--json", str(out_json))
    assert code == 0, err
    (full,) = json.loads(out_json.read_text())["results"]
    assert [w["depth"] for w in full["per_window"]] == [0.2, 0.8]
    assert 0 <= full["accuracy"] <= 1


def test_needle_prompt_places_the_key_at_depth(smollm2):
    _, tokenizer = smollm2
    haystack = tokenizer.encode(open(TEXT).read(), add_special_tokens=False)
    for depth in (0.1, 0.9):
        prompt = needle_prompt(tokenizer, haystack, 1000, depth, "48213")
        assert len(prompt) == 1000
        text = tokenizer.decode(prompt)
        where = text.index("The pass key is 48213") / len(text)
        assert abs(where - depth) < 0.1
        assert text.endswith("The pass key is")


@pytest.mark.parametrize("argv, fragment", [
    (["--task", "ppl"], "needs --text-file"),
    (["--task", "ppl", "--text-file", "/nonexistent.txt"], "cannot read"),
    (["--task", "ppl", "--text-file", TEXT, "--policy", "full,lru"], "unknown policy 'lru'"),
    (["--task", "ppl", "--text-file", TEXT, "--policy", "full", "--budget", "8"],
     "--budget applies to none of: full"),
    (["--task", "ppl", "--text-file", TEXT, "--context", "100", "--score-last", "100"],
     "--score-last"),
    (["--task", "needle", "--haystack-file", TEXT, "--depths", "a,b"], "--depths"),
    (["--task", "ppl", "--text-file", TEXT, "--context", "100", "--prompt-tokens", "100"],
     "--prompt-tokens must be smaller"),
    (["--task", "ppl", "--text-file", TEXT, "--score-last", "9", "--prompt-tokens", "9"],
     "not both"),
    (["--task", "ppl", "--text-file", TEXT, "--policy", "snapkv", "--min-budget", "8"],
     "snapkv: --min-budget (8) must exceed --window (32)"),
])
def test_bad_input_is_one_line(capsys, tiny_gguf, argv, fragment):
    code, _, err = evaluate(capsys, "--model", tiny_gguf, *argv)
    assert code == 1 and fragment in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("policy, args", [
    ("full", {}), ("h2o", {"budget": 40}), ("mixed", {"budget": 40, "kv_group_size": 32}),
    ("quantized", {"kv_bits": 4, "kv_group_size": 32}),
], ids=lambda x: str(x))
def test_prompts_that_begin_alike_read_their_shared_tokens_once_exactly(policy, args):
    # benchmarks/long_generation.py reads a haystack's first tokens once for
    # the needle at growing depths: each prompt's cache must be the one its
    # own prefill from empty makes, bit for bit, whatever the policy.
    import mlx.core as mx

    from mlx_kvcache import make_cache
    from mlx_kvcache.evaluate import SharedPrefix, prefill
    from mlx_kvcache.prompt_cache import common_prefix

    model = tiny_model("llama3")
    haystack = [(7 * i + 3) % 256 for i in range(150)]
    needle = [250, 251, 252]
    prompts = [haystack[:at] + needle + haystack[at:] for at in (20, 50, 90, 95)]
    prompts.append(haystack[:10] + needle)  # shares no chunk with the others
    new_cache = lambda: make_cache(model, policy, **args)  # noqa: E731
    sharing = SharedPrefix(model, step=16)
    read_before = []
    for prompt, after in zip(prompts, prompts[1:] + [[]]):
        cache = sharing.start(prompt, common_prefix(prompt, after), len(prompt) - 1, new_cache)
        read_before.append((cache[0].offset, sharing.kept is not None))
        prefill(model, cache, prompt, step=16)
        own = new_cache()
        prefill(model, own, prompt, step=16)
        for token in (prompt[-1], 5, 9):
            step = mx.array([[token]])
            assert mx.array_equal(model(step, cache=cache), model(step, cache=own))
    # (tokens each cache came with, whether a cache is still kept): the fourth
    # prompt takes the kept one, as nothing after it shares its tokens; the
    # fifth starts empty.
    assert read_before == [(16, True), (48, True), (80, True), (80, False), (0, False)]


@pytest.mark.parametrize("arch", ["llama3", "gemma3"])
def test_continuing_a_full_prefill_is_exact(arch):
    # The long-context benchmark prefills a window once with `full` and lets
    # SnapKV and RefreshKV continue from it: their logits must be the ones of
    # their own prefill with the same chunks, bit for bit.
    import mlx.core as mx

    from mlx_kvcache import make_cache
    from mlx_kvcache.evaluate import (FORK_TAIL, PolicySpec, continue_from_full,
                                      continues_full_prefill, prefill)

    model = tiny_model(arch)
    prompt = [(7 * i + 3) % 256 for i in range(100 + FORK_TAIL + 1)]
    full = make_cache(model, "full")
    prefill(model, full, prompt[:101])  # the first 100 tokens
    specs = [PolicySpec("full"), PolicySpec("snapkv", {"budget": 40, "window": 8}),
             PolicySpec("refreshkv", {"budget": 30}),
             PolicySpec("refreshkv", {"budget": 30, "refresh": "stride", "refresh_every": 1,
                                      "refresh_mode": "score"})]

    def decode(cache):
        return mx.concatenate([model(mx.array([[t]]), cache=cache)
                               for t in prompt[-1:] + list(range(40, 56))], axis=1)

    for spec in specs:
        assert continues_full_prefill(spec)
        own = spec.cache(model, len(prompt))
        model(mx.array(prompt[:100])[None], cache=own)
        model(mx.array(prompt[100:-1])[None], cache=own)
        forked = continue_from_full(model, spec, full, prompt)
        assert mx.array_equal(decode(forked), decode(own)), spec.label()
    assert all(c.offset == 100 for c in full)  # the shared prefill is untouched
    for spec in [PolicySpec("h2o", {"budget": 30}), PolicySpec("streaming"),
                 PolicySpec("refreshkv", {"full_cache_bits": 4})]:
        assert not continues_full_prefill(spec)
        with pytest.raises(ValueError):
            continue_from_full(model, spec, full, prompt)
    with pytest.raises(ValueError):  # too short a tail for SnapKV to vote
        continue_from_full(model, specs[1], full, prompt[:100 + FORK_TAIL])
