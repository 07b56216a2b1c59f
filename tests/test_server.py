"""python -m mlx_kvcache.server on SmolLM2, driven by the `openai` client and
plain HTTP: answers equal the library's, streams equal non-streamed answers,
prompt caches are reused, bad requests get a 400 and leave the server
unharmed, a client that leaves mid-stream stops its generation, concurrent
requests never mix, and a bounded soak passes."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from mlx_kvcache import generate  # noqa: E402

CAP = 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_kvcache.server", "--port", str(port),
         "--max-tokens-cap", str(CAP), "--max-body-bytes", "200000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(process.stderr.read())
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)
    assert "this machine only" in process.stderr.read()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="local", max_retries=0)


def ask(client, question, **kw):
    return client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": question}],
        temperature=0, max_tokens=kw.pop("max_tokens", 12), **kw)


def library_answer(smollm2, question, max_tokens=12):
    model, tokenizer = smollm2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True)
    return generate(model, tokenizer, ids, max_tokens=max_tokens)


def post(url, body: bytes, headers=None):
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metrics(url) -> dict:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return {line.split()[0].removeprefix("mlx_kvcache_"): float(line.split()[1])
            for line in text.splitlines()}


def test_the_openai_client_gets_the_librarys_answer(client, smollm2):
    question = "What is the capital of France?"
    reply = ask(client, question)
    assert reply.choices[0].message.content == library_answer(smollm2, question)
    assert reply.usage.prompt_tokens > 20 and reply.usage.completion_tokens >= 1
    stream = ask(client, question, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_text_completions(client):
    done = client.completions.create(model="smollm2", prompt="One, two, three,",
                                     max_tokens=6, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens == 6
    assert done.choices[0].finish_reason == "length"
    stopped = client.completions.create(model="smollm2", prompt="One, two, three,",
                                        max_tokens=6, temperature=0,
                                        stop=[done.choices[0].text[2:4]])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == done.choices[0].text[:2]


def test_a_follow_up_turn_reads_only_its_new_tokens(client):
    first = [{"role": "user", "content": "Name a large river in Europe."}]
    reply = client.chat.completions.create(model="smollm2", messages=first, temperature=0,
                                           max_tokens=16)
    follow = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                      {"role": "user", "content": "Which sea does it flow into?"}]
    again = client.chat.completions.create(model="smollm2", messages=follow, temperature=0,
                                           max_tokens=8)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= reply.usage.prompt_tokens
    assert again.usage.prompt_tokens - cached < 20


def test_a_request_chooses_its_cache_policy(client, smollm2):
    question = "Name three colours."
    reply = ask(client, question, extra_body={"kv_cache": {"policy": "refreshkv",
                                                           "budget": 4096}})
    # A budget covering the context is exactly full attention.
    assert reply.choices[0].message.content == library_answer(smollm2, question)


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), 400, "content"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}).encode(),
     400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": CAP + 1}).encode(),
     400, f"at most {CAP}"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode(),
     400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": 3}).encode(),
     400, "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(),
     400, "stream"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "kv_cache": {"policy": "magic"}}).encode(), 400, "unknown policy"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "kv_cache": {"policy": "refreshkv", "colour": 3}}).encode(), 400, "kv_cache"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 9000}]}).encode(),
     400, "context is 8192 tokens"),
    (b"{" + b" " * 300000 + b"}", 413, "over 200000 bytes"),
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_requests_get_an_openai_shaped_error(server, body, status, message):
    code, reply = post(server + "/v1/chat/completions", body)
    assert code == status
    assert message in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"
    assert post(server + "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode())[0] == 200


def test_a_client_that_leaves_mid_stream_stops_its_generation(server, client):
    before = metrics(server)
    body = json.dumps({"messages": [{"role": "user", "content": "Count from one to a hundred."}],
                       "max_tokens": CAP, "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(server + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=60)
    for _ in range(3):
        response.readline()
    response.close()
    ask(client, "Hi", max_tokens=2)  # served after the abandoned one stopped
    after = metrics(server)
    assert after["disconnects_total"] == before["disconnects_total"] + 1
    generated = after["generation_tokens_total"] - before["generation_tokens_total"]
    assert generated < CAP  # the abandoned request did not run to its end
    assert after["requests_waiting"] == 0


QUESTIONS = ["Name a fruit.", "Name a planet.", "Name a metal.", "Name a bird.",
             "Name an ocean.", "Name a tree.", "Name a colour.", "Name a fish."]


def test_concurrent_requests_never_mix(client, smollm2):
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda q: ask(client, q, max_tokens=8), QUESTIONS))
    for question, reply in zip(QUESTIONS, replies):
        assert reply.choices[0].message.content == library_answer(smollm2, question, 8)


def test_a_bounded_soak(server, client, smollm2):
    questions = [f"Say the number {i}." for i in range(8)]
    alone = {q: library_answer(smollm2, q, max_tokens=6) for q in questions}
    before = metrics(server)

    def one(i):
        question = questions[i % 8]
        if i % 6 == 1:  # a client that leaves after the first chunk
            stream = ask(client, question, max_tokens=CAP, stream=True)
            next(iter(stream))
            stream.close()
            return None
        if i % 2:
            return question, "".join(c.choices[0].delta.content or "" for c in ask(
                client, question, max_tokens=6, stream=True) if c.choices)
        return question, ask(client, question, max_tokens=6).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = [a for a in pool.map(one, range(48)) if a is not None]
    assert len(answers) == 40
    for question, answer in answers:  # as the same request alone
        assert answer == alone[question], question
    deadline = time.time() + 60
    while metrics(server)["requests_waiting"] and time.time() < deadline:
        time.sleep(0.2)
    after = metrics(server)
    assert after["requests_total"] - before["requests_total"] == 48
    assert after["requests_failed_total"] == before["requests_failed_total"]
    assert after["requests_waiting"] == 0
    # Memory back to the baseline, but for the conversations' caches now kept.
    kept = after["prompt_cache_bytes"] - before["prompt_cache_bytes"]
    assert after["active_memory_bytes"] - kept <= before["active_memory_bytes"] + (8 << 20)
    assert urllib.request.urlopen(server + "/health", timeout=5).status == 200


def test_the_readmes_openai_example_runs_against_the_server(server, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                   if "from openai import OpenAI" in b)
    assert "http://127.0.0.1:8080/v1" in example
    exec(compile(example.replace("http://127.0.0.1:8080", server), "README.md", "exec"), {})
    answer, cached = capsys.readouterr().out.rsplit(" ", 1)
    assert answer.strip() and int(cached) >= 0
