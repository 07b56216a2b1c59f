"""Time to first token of follow-up turns through the server, with prompt-cache
reuse and without (`--prompt-cache-bytes 0`): a document of N tokens as the
first message, then questions in turn, each request carrying the whole
conversation as OpenAI clients send it. Measured with the `openai` client,
streamed, from sending the request to the first content chunk.

    python benchmarks/server.py --quick     # SmolLM2, a 1500-token document
    python benchmarks/server.py             # Qwen2.5-Coder-0.5B, 6000 tokens

Writes benchmarks/results/server_ttft.json (server_ttft_quick.json).
"""

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request

from common import write_result

from mlx_kvcache.evaluate import read_text

TEXT = "/usr/share/info/gettext.info.gz"
QUESTIONS = ["What is this document about?", "Name one program it describes.",
             "What does that program do?", "Summarise the document in one sentence."]


def start_server(model, port, extra):
    process = subprocess.Popen([sys.executable, "-m", "mlx_kvcache.server", "--model", model,
                                "--port", str(port), *extra],
                               stderr=subprocess.PIPE, text=True, env=os.environ)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return process
        except OSError:
            if process.poll() is not None:
                raise SystemExit(process.stderr.read())
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def conversation_ttft(client, model, document, max_tokens):
    messages = [{"role": "user", "content": f"{document}\n\n{QUESTIONS[0]}"}]
    turns = []
    for i, _ in enumerate(QUESTIONS):
        if i:
            messages.append({"role": "user", "content": QUESTIONS[i]})
        start = time.perf_counter()
        first, text, usage = None, "", None
        for chunk in client.chat.completions.create(
                model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - start
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        messages.append({"role": "assistant", "content": text})
        turns.append({"turn": i + 1, "ttft_s": first, "prompt_tokens": usage.prompt_tokens,
                      "cached_tokens": usage.prompt_tokens_details.cached_tokens})
        print(f"  turn {i + 1}: {first:.2f} s to the first token, "
              f"{usage.prompt_tokens_details.cached_tokens}/{usage.prompt_tokens} cached",
              flush=True)
    return turns


def main():
    import openai

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None)
    parser.add_argument("--doc-words", type=int, default=None)
    args = parser.parse_args()
    model = args.model or ("smollm2" if args.quick else "qwen2.5-coder-0.5b")
    words = args.doc_words or (1000 if args.quick else 4000)
    document = " ".join(read_text(TEXT)[20000:].split(" ")[:words])
    report = {"benchmark": "server_ttft", "model": model, "document_words": words,
              "questions": QUESTIONS, "runs": {}}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, extra in (("reuse", []), ("no reuse", ["--prompt-cache-bytes", "0"])):
        print(f"{name}:", flush=True)
        process = start_server(model, port, extra)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local")
            report["runs"][name] = conversation_ttft(client, model, document, 24)
        finally:
            process.terminate()
            process.wait(timeout=60)
    write_result("server_ttft_quick" if args.quick else "server_ttft", report)


if __name__ == "__main__":
    main()
