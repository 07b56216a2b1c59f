"""Chat: ChatSession carries the cache across turns (feeding only what is new),
survives interruptions and restarts bit for bit, and `python -m mlx_kvcache.chat`
works in a real terminal and from a pipe."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_kvcache import UserError
from mlx_kvcache.cache_file import snapshot
from mlx_kvcache.chat_session import ChatSession, TurnInterrupted
from tests.helpers import tiny_model, write_gguf

GPL = "/usr/share/common-licenses/GPL-3"
QUESTIONS = ["Name a fruit.", "Why is it healthy?", "What colour is it?"]
# Every policy, with budgets small enough to compress a few turns.
SETTINGS = [
    ("full", {}),
    ("streaming", {"budget": 48}),
    ("snapkv", {"budget": 48, "window": 8}),
    ("h2o", {"budget": 48}),
    ("refreshkv", {"budget": 32}),
    ("quantized", {"kv_bits": 4}),
    ("kivi", {"kv_bits": 4, "residual": 16}),
    ("mixed", {"budget": 32, "kv_bits": 4}),
]


def reply(session, text, **kw):
    return "".join(r.text for r in session.send(text, **kw))


def state_of(session):
    return (list(session.messages), session.cached_text,
            [(record, {k: v.tolist() for k, v in state.items()})
             for record, state in snapshot(session.cache)])


def test_each_turn_feeds_only_what_is_new(smollm2):
    model, tokenizer = smollm2
    session = ChatSession(model, tokenizer, "full", max_tokens=24)
    reply(session, QUESTIONS[0])
    used = session.context_used()
    answer = reply(session, QUESTIONS[1])
    fed = session.last_reply.prompt_tokens
    # The second question's template tokens, not the conversation again.
    assert fed < 20 and session.context_used() == used + fed + session.last_reply.generation_tokens
    assert session.notices == []
    rendered = tokenizer.apply_chat_template(session.messages, tokenize=False)
    assert rendered.startswith(session.cached_text) and answer in session.cached_text


def test_a_template_that_renders_the_past_differently_is_read_again(smollm2):
    model, tokenizer = smollm2
    session = ChatSession(model, tokenizer, "full", max_tokens=8)
    reply(session, QUESTIONS[0])
    # As if the template now rendered the first answer otherwise (Qwen3 drops
    # thinking blocks): the cache no longer holds a prefix of the rendering.
    session.messages[-1]["content"] = "Something else entirely."
    reply(session, QUESTIONS[1])
    assert session.notices and "reading the whole conversation again" in session.notices[0]
    whole = tokenizer.apply_chat_template(session.messages[:-1], tokenize=False,
                                          add_generation_prompt=True)
    assert session.context_used() == (len(tokenizer.encode(whole, add_special_tokens=False))
                                      + session.last_reply.generation_tokens)


@pytest.mark.parametrize("policy, args", [("full", {}), ("refreshkv", {"budget": 32}),
                                          ("refreshkv", {"budget": 32, "full_cache_bits": 8}),
                                          ("streaming", {"budget": 48})], ids=str)
def test_a_re_rendered_last_turn_is_trimmed_where_the_policy_can(smollm2, policy, args):
    """The second answer renders otherwise now (Qwen3 drops its thinking block):
    a trimmable cache forgets that turn and reads only its new rendering, and
    holds what a session that was never told the old one holds, bit for bit."""
    model, tokenizer = smollm2
    changed = "Because of its vitamins."

    def after_first_turn():
        session = ChatSession(model, tokenizer, policy, max_tokens=12, **args)
        reply(session, QUESTIONS[0])
        return session

    session = after_first_turn()
    reply(session, QUESTIONS[1])
    session.messages[-1]["content"] = changed
    answer = reply(session, QUESTIONS[2])
    # The reference: the same first turn, then the second as it renders now.
    never_told = after_first_turn()
    never_told.messages += [{"role": "user", "content": QUESTIONS[1]},
                            {"role": "assistant", "content": changed}]
    expected = reply(never_told, QUESTIONS[2])
    if policy == "streaming":  # it has dropped tokens: it cannot go back
        assert len(session.notices) == 1
        assert "reading the whole conversation again" in session.notices[0]
        whole = tokenizer.apply_chat_template(session.messages[:-1], tokenize=False,
                                              add_generation_prompt=True)
        assert session.last_reply.prompt_tokens == len(tokenizer.encode(whole))
        return
    assert len(session.notices) == 1 and "forgot their" in session.notices[0], session.notices
    assert never_told.notices == []
    assert answer == expected
    assert session.last_reply.prompt_tokens == never_told.last_reply.prompt_tokens
    # The same tokens and selection; only the step counters (stats) differ.
    same_cache(session, never_told)
    assert session.messages == never_told.messages
    assert session.cached_text == never_told.cached_text


def same_cache(session, other):
    """Every array of every layer equal, and the scalars but step counters."""
    counters = ("full_steps", "partial_steps")
    for (record, arrays), (other_record, other_arrays) in zip(snapshot(session.cache),
                                                             snapshot(other.cache)):
        assert {k: v for k, v in record["scalars"].items() if k not in counters} == {
            k: v for k, v in other_record["scalars"].items() if k not in counters}
        assert arrays.keys() == other_arrays.keys()
        assert all(mx.array_equal(arrays[k], other_arrays[k]) for k in arrays)


@pytest.mark.parametrize("policy, args", [("snapkv", {"budget": 48, "window": 8}),
                                          ("refreshkv", {"budget": 32})], ids=str)
def test_a_forked_session_is_the_one_that_read_the_document_itself(smollm2, policy, args):
    """A document read once under full serves every policy that reads prompts in
    full (the multi-turn benchmark relies on it)."""
    model, tokenizer = smollm2
    document = open(GPL).read()[:2500]
    reader = ChatSession(model, tokenizer, "full", max_tokens=10)
    reader.add_document(document)
    forked = reader.fork(policy, **args)
    itself = ChatSession(model, tokenizer, policy, max_tokens=10, **args)
    itself.add_document(document)
    for question in QUESTIONS[:2]:
        assert reply(forked, question) == reply(itself, question)
    same_cache(forked, itself)
    assert forked.cached_text == itself.cached_text and forked.turn_ends == itself.turn_ends
    with pytest.raises(UserError, match="has not replied"):
        forked.fork("full")
    with pytest.raises(UserError, match="streaming does not read prompts in full"):
        reader.fork("streaming", budget=48)


@pytest.mark.parametrize("policy, args", SETTINGS, ids=lambda x: str(x))
def test_a_restored_session_continues_bit_for_bit(tmp_path, smollm2, policy, args):
    model, tokenizer = smollm2
    path = tmp_path / "chat.safetensors"
    first = ChatSession(model, tokenizer, policy, "Be brief.", max_tokens=12, **args)
    for question in QUESTIONS[:2]:
        reply(first, question)
    first.save(path)
    restored = ChatSession.load(path, model, tokenizer, policy)
    assert restored.messages == first.messages and restored.policy_args == args
    # The saved session going on uninterrupted is the reference.
    expected = [r.token for r in first.send(QUESTIONS[2])]
    assert [r.token for r in restored.send(QUESTIONS[2])] == expected
    assert [c.nbytes for c in restored.cache] == [c.nbytes for c in first.cache]


def test_a_document_read_is_cancelled_whole_and_a_reply_stops_cleanly(smollm2):
    model, tokenizer = smollm2
    session = ChatSession(model, tokenizer, "refreshkv", max_tokens=40, budget=32,
                          prefill_step_size=64)
    reply(session, QUESTIONS[0])
    before = state_of(session)

    def ctrl_c(done, total):
        if done >= 128:
            raise TurnInterrupted()

    with pytest.raises(TurnInterrupted):
        session.add_document(GPL, progress=ctrl_c)
    assert state_of(session) == before
    # Ctrl-C mid-reply: the reply so far stays, and the next turn carries on
    # from a cache that holds exactly it.
    tokens = []
    for r in session.send(QUESTIONS[1], stop=lambda: len(tokens) >= 5):
        tokens.append(r.token)
    assert len(tokens) == 5 and session.last_reply.finish_reason == "interrupted"
    assert session.messages[-1]["content"] == tokenizer.decode(tokens)
    reply(session, QUESTIONS[2])
    assert session.notices == []
    n = session.add_document("A short note about apples.\nThey are red.")
    assert 5 < n < 40


def test_the_context_limit_refuses_a_turn_unless_the_policy_runs_past_it(smollm2):
    model, tokenizer = smollm2
    limit = model.context_length
    try:
        model.context_length = 120
        session = ChatSession(model, tokenizer, "full", max_tokens=20)
        with pytest.raises(UserError, match="/reset"):
            session.add_document(GPL)
        assert session.context_used() == 0 and session.messages == []
        reply(session, QUESTIONS[0])
        while True:
            try:
                reply(session, QUESTIONS[1])
            except UserError as e:
                assert "streaming --positions cache" in str(e)
                break
        assert session.context_used() <= 120
        endless = ChatSession(model, tokenizer, "streaming", max_tokens=20, budget=64,
                              positions="cache")
        for _ in range(5):
            reply(endless, QUESTIONS[1])
        assert endless.context_used() > 120
    finally:
        model.context_length = limit


def test_a_base_model_is_refused_in_one_line(gemma):
    model, tokenizer = gemma
    with pytest.raises(UserError, match="no chat template"):
        ChatSession(model, tokenizer)


# ---------------------------------------------------------------- the CLI

def chat_cli(*args, stdin="", timeout=300):
    return subprocess.run([sys.executable, "-m", "mlx_kvcache.chat", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_piped_turns_and_a_session_that_survives_the_process(tmp_path, main_in_process):
    session = tmp_path / "chat.session"  # any name, not only *.safetensors
    common = ["--policy", "h2o", "--budget", "48", "--max-tokens", "16"]

    def in_process(*args, stdin):
        return main_in_process("mlx_kvcache.chat", *args, stdin=stdin)

    # Two processes, then the three turns as one run says them.
    first = chat_cli(*common, "--session", str(session), stdin="\n".join(QUESTIONS[:2]) + "\n")
    second = chat_cli("--max-tokens", "16", "--session", str(session), stdin=QUESTIONS[2])
    assert second.returncode == 0, second.stderr
    whole = in_process(*common, stdin="\n".join(QUESTIONS) + "\n")
    assert whole.returncode == 0, whole.stderr
    assert first.stdout + second.stdout == whole.stdout
    assert "tokens of context" in whole.stderr and "MiB KV (h2o)" in whole.stderr

    saved = session.read_bytes()
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(saved[: len(saved) // 2])
    # Another model: a tiny one, quick to load (the check is the same).
    other_model = write_gguf(tmp_path / "tiny.gguf", tiny_model("qwen3"))
    bad = [in_process("--policy", "full", "--session", str(session), stdin="hi\n"),
           in_process("--session", str(truncated), stdin="hi\n"),
           in_process("--model", str(other_model), "--session", str(session), stdin="hi\n")]
    for result in bad:
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert "'h2o' session" in bad[0].stderr and "saved from another model" in bad[2].stderr
    assert session.read_bytes() == saved and truncated.read_bytes() == saved[: len(saved) // 2]


def test_piped_errors_are_one_line(tmp_path):
    # A model without a chat template (as Gemma 3 270M, a base model, is).
    base = write_gguf(tmp_path / "base.gguf", tiny_model("qwen3"))
    result = chat_cli("--model", str(base), stdin="hi\n")
    assert result.returncode == 1 and "no chat template" in result.stderr, result.stderr
    result = chat_cli(stdin="/nonsense\n")
    assert result.returncode == 1 and result.stderr.strip() == (
        "error: unknown command /nonsense (/help lists them)")


def test_a_person_at_a_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    saved = tmp_path / "mine.safetensors"
    child = pexpect.spawn(sys.executable, ["-m", "mlx_kvcache.chat", "--max-tokens", "200",
                                           "--policy", "refreshkv"],
                          env={**os.environ, "TERM": "dumb"}, encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendline("What is the capital of France?")
    child.expect("Paris")
    child.expect(r"\[\d+/8192 tokens of context")
    child.expect(">>> ")
    # Ctrl-C in the middle of a long reply: it stops, and the chat goes on.
    child.sendline("Write a long story about a dragon.")
    child.expect(r"dragon\.\r\n")  # the terminal's echo of the line
    child.expect(r"\n[^\[]*\w+ \w+ \w+")  # the reply streaming
    child.sendintr()
    child.expect(r"\(stopped\)")
    child.expect(">>> ")
    child.sendline('"""')
    child.sendline("Say only:")
    child.sendline("yes")
    child.sendline('"""')
    child.expect(">>> ")
    child.sendline(f"/save {saved}")
    child.expect("saved to")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.sendline(f"/load {saved}")
    child.expect(r"loaded .*: 6 messages")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert saved.exists()
