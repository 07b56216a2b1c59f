"""A local OpenAI-compatible server with the cache policies and prompt-cache reuse.

    python -m mlx_kvcache.server --model M --policy P [policy flags] [--port 8080]

POST /v1/chat/completions and /v1/completions (streamed as server-sent events
ending with [DONE], or not), GET /v1/models, /health and /metrics. A request
may choose its cache policy in an extra field, `"kv_cache": {"policy":
"refreshkv", "budget": 512}`; the server's flags are the default. Caches of
recent conversations are kept (prompt_cache.py) and a request continuing one
reads only its new tokens; `usage.prompt_tokens_details.cached_tokens` says
how many it did not read.

One model, one request at a time: requests queue for it in order (a single
worker thread runs every generation), so two conversations never share a
cache. A client that disconnects mid-stream stops its generation at the next
token. Bad requests get a 400 (413 for a body over the limit, refused before
it is read) with an OpenAI-shaped error body. It binds to 127.0.0.1 unless
told otherwise. Starlette and uvicorn carry the HTTP.
"""

import asyncio
import json
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx

from mlx_kvcache.cli import Parser, add_model_flags, load_model, policy_args, run_command
from mlx_kvcache.errors import UserError
from mlx_kvcache.generate import (DEFAULT_PREFILL_STEP, encode_prompt, make_sampler,
                                  stream_generate)
from mlx_kvcache.policies import make_cache
from mlx_kvcache.prompt_cache import PromptCacheStore

MAX_TOKENS_CAP = 4096
MAX_BODY_BYTES = 4 << 20


class BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def error_body(message: str, param: Optional[str] = None, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclass
class Request:
    """A validated completion request."""

    chat: bool
    prompt_ids: List[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: List[str]
    stream: bool
    include_usage: bool
    policy: str
    policy_args: dict
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def cache_key(self) -> str:
        return json.dumps([self.policy, self.policy_args], sort_keys=True)


def _typed(body: dict, name: str, kinds, default, check=None, what=""):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in (
            kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(f"'{name}' must be {what}", name)
    if check is not None and not check(value):
        raise BadRequest(f"'{name}' must be {what}", name)
    return value


class Server:
    def __init__(self, model, tokenizer, *, policy: str, policy_flags: dict, model_name: str,
                 max_tokens: int, max_tokens_cap: int, prompt_cache_bytes: int,
                 prefill_step_size: int = DEFAULT_PREFILL_STEP):
        self.model, self.tokenizer = model, tokenizer
        self.policy, self.policy_flags = policy, policy_flags
        self.model_name = model_name
        self.max_tokens, self.max_tokens_cap = max_tokens, max_tokens_cap
        self.prefill_step_size = prefill_step_size
        self.prompt_caches = PromptCacheStore(prompt_cache_bytes)
        # The model runs on this one thread, one request after another.
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="mlx-kvcache-model")
        self.metrics = {"requests_total": 0, "requests_failed_total": 0,
                        "prompt_tokens_total": 0, "cached_prompt_tokens_total": 0,
                        "generation_tokens_total": 0, "disconnects_total": 0}
        self.waiting = 0
        self.lock = threading.Lock()

    # ------------------------------------------------------------ requests

    def parse(self, body, chat: bool) -> Request:
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty list", "messages")
            for m in messages:
                if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
                        or not isinstance(m.get("content"), str)):
                    raise BadRequest("each message needs a string 'role' and 'content'",
                                     "messages")
            if self.tokenizer.has_chat_template:
                ids = self.tokenizer.apply_chat_template(
                    [{"role": m["role"], "content": m["content"]} for m in messages],
                    add_generation_prompt=True)
            else:
                ids = self.tokenizer.encode("\n".join(m["content"] for m in messages))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise BadRequest("'prompt' must be a non-empty string", "prompt")
            ids = encode_prompt(self.tokenizer, prompt)
        max_tokens = _typed(body, "max_tokens", int, min(self.max_tokens, self.max_tokens_cap),
                            lambda v: v >= 1, "an integer >= 1")
        if chat and body.get("max_completion_tokens") is not None:
            max_tokens = _typed(body, "max_completion_tokens", int, max_tokens,
                                lambda v: v >= 1, "an integer >= 1")
        if max_tokens > self.max_tokens_cap:
            raise BadRequest(f"'max_tokens' is {max_tokens}; this server allows at most "
                             f"{self.max_tokens_cap}", "max_tokens")
        context = getattr(self.model, "context_length", None)
        if context and len(ids) + 1 > context:
            raise BadRequest(f"the prompt is {len(ids)} tokens; the model's context is "
                             f"{context} tokens", "messages" if chat else "prompt")
        temperature = _typed(body, "temperature", (int, float), 1.0,
                             lambda v: 0 <= v <= 2, "a number from 0 to 2")
        top_p = _typed(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1,
                       "a number in (0, 1]")
        seed = _typed(body, "seed", int, None, None, "an integer")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise BadRequest("'stop' must be a string or a list of strings", "stop")
        stream = _typed(body, "stream", bool, False, None, "true or false")
        options = _typed(body, "stream_options", dict, {}, None, "an object")
        policy, flags = self.policy, dict(self.policy_flags)
        kv = _typed(body, "kv_cache", dict, None, None, "an object")
        if kv is not None:
            kv = dict(kv)
            policy = kv.pop("policy", policy)
            if not isinstance(policy, str):
                raise BadRequest("'kv_cache.policy' must be a string", "kv_cache")
            # The server's flags are the default for its own policy only.
            flags = {**flags, **kv} if policy == self.policy else kv
        try:
            make_cache(self.model, policy, **flags)
        except (UserError, TypeError, ValueError) as e:
            raise BadRequest(f"kv_cache: {e}", "kv_cache") from None
        return Request(chat, ids, max_tokens, float(temperature), float(top_p), seed, stop,
                       stream, bool(options.get("include_usage")), policy, flags)

    # ------------------------------------------------------------ generation

    def generate(self, request: Request, emit, cancelled: threading.Event) -> dict:
        """Run one request on the worker thread: emit(text) per piece of
        text; returns the finish reason and usage."""
        cache, cached = self.prompt_caches.take(request.cache_key, request.prompt_ids)
        if cache is None:
            cache = make_cache(self.model, request.policy, **request.policy_args)
        if request.seed is not None:
            mx.random.seed(request.seed)
        text, tokens, finish = "", [], "length"
        held = len(request.prompt_ids)
        try:
            for response in stream_generate(
                    self.model, self.tokenizer, request.prompt_ids[cached:], cache=cache,
                    max_tokens=request.max_tokens,
                    sampler=make_sampler(request.temperature, request.top_p),
                    prefill_step_size=self.prefill_step_size):
                tokens.append(response.token)
                text += response.text
                stopped = next((s for s in request.stop if s in text), None)
                if stopped is not None:
                    text = text[: text.index(stopped)]
                    finish = "stop"
                    break
                # Text that could still become a stop sequence waits.
                safe = len(text) - max((len(s) - 1 for s in request.stop), default=0)
                emit(text, safe)
                if response.finish_reason is not None:
                    finish = response.finish_reason
                    break
                if cancelled.is_set():
                    finish = "cancelled"
                    break
            held += len(tokens)
            self.prompt_caches.put(request.cache_key,
                                   (request.prompt_ids + tokens)[:held], cache)
        finally:
            with self.lock:
                self.metrics["prompt_tokens_total"] += len(request.prompt_ids)
                self.metrics["cached_prompt_tokens_total"] += cached
                self.metrics["generation_tokens_total"] += len(tokens)
        emit(text, len(text))
        return {"finish_reason": finish, "text": text,
                "usage": {"prompt_tokens": len(request.prompt_ids),
                          "completion_tokens": len(tokens),
                          "total_tokens": len(request.prompt_ids) + len(tokens),
                          "prompt_tokens_details": {"cached_tokens": cached}}}


# ---------------------------------------------------------------- HTTP


def build_app(server: Server, max_body_bytes: int = MAX_BODY_BYTES):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    def bad(e: BadRequest):
        with server.lock:
            server.metrics["requests_failed_total"] += 1
        return JSONResponse(error_body(str(e), e.param), status_code=e.status)

    async def read_json(request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            raise BadRequest(f"the body is over {max_body_bytes} bytes", status=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise BadRequest(f"the body is over {max_body_bytes} bytes", status=413)
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the body is not valid JSON") from None

    def chunk(req: Request, text: str, finish=None, role=False) -> dict:
        if req.chat:
            delta = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish}
            kind = "text_completion"
        return {"id": req.id, "object": kind, "created": req.created,
                "model": server.model_name, "choices": [choice]}

    async def completions(request, chat: bool):
        with server.lock:
            server.metrics["requests_total"] += 1
        try:
            req = server.parse(await read_json(request), chat)
        except BadRequest as e:
            return bad(e)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        sent = [0]

        def emit(text, safe):
            if safe > sent[0]:
                piece, sent[0] = text[sent[0]:safe], safe
                loop.call_soon_threadsafe(queue.put_nowait, ("text", piece))

        def run():
            try:
                message = ("done", server.generate(req, emit, cancelled))
            except Exception as e:  # a UserError from the model side, or a bug
                message = ("error", e)
            # No longer waiting before the client can hear it is done, so a
            # /metrics read after the response never counts it.
            with server.lock:
                server.waiting -= 1
            loop.call_soon_threadsafe(queue.put_nowait, message)

        with server.lock:
            server.waiting += 1
        loop.run_in_executor(server.worker, run)

        if req.stream:
            async def events():
                finished = False
                try:
                    if req.chat:
                        yield _sse(chunk(req, "", role=True))
                    while True:
                        kind, value = await queue.get()
                        if kind == "text":
                            yield _sse(chunk(req, value))
                        elif kind == "error":
                            finished = True
                            yield _sse(error_body(str(value), kind="server_error"))
                            break
                        else:
                            finished = True
                            finish = value["finish_reason"]
                            yield _sse(chunk(req, "", finish=finish if finish != "cancelled"
                                             else "stop"))
                            if req.include_usage:
                                yield _sse({**chunk(req, ""), "choices": [],
                                            "usage": value["usage"]})
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    if not finished:  # the client went away mid-stream
                        cancelled.set()
                        with server.lock:
                            server.metrics["disconnects_total"] += 1

            return StreamingResponse(events(), media_type="text/event-stream")

        text = []
        while True:
            kind, value = await queue.get()
            if kind == "text":
                text.append(value)
            elif kind == "error":
                return JSONResponse(error_body(str(value), kind="server_error"), status_code=500)
            else:
                break
        body = chunk(req, "".join(text), finish=value["finish_reason"])
        if req.chat:
            body["object"] = "chat.completion"
            body["choices"][0] = {"index": 0, "message": {"role": "assistant",
                                                          "content": "".join(text)},
                                  "finish_reason": value["finish_reason"]}
        body["usage"] = value["usage"]
        return JSONResponse(body)

    async def chat_completions(request):
        return await completions(request, chat=True)

    async def text_completions(request):
        return await completions(request, chat=False)

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": server.model_name, "object": "model", "created": 0, "owned_by": "local"}]})

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def metrics(request):
        with server.lock:
            values = dict(server.metrics)
            values["requests_waiting"] = server.waiting
        values["prompt_cache_bytes"] = server.prompt_caches.nbytes
        values["prompt_cache_entries"] = len(server.prompt_caches.entries)
        values["active_memory_bytes"] = mx.get_active_memory()
        lines = [f"mlx_kvcache_{k} {v}" for k, v in values.items()]
        return PlainTextResponse("\n".join(lines) + "\n")

    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ])


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


# ---------------------------------------------------------------- the CLI


def setup_arg_parser():
    parser = Parser(prog="python -m mlx_kvcache.server",
                    description="An OpenAI-compatible server with KV-cache policies.")
    add_model_flags(parser, max_tokens=512, prefill_step=DEFAULT_PREFILL_STEP)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-tokens-cap", type=int, default=MAX_TOKENS_CAP,
                        help="the largest max_tokens a request may ask for")
    parser.add_argument("--prompt-cache-bytes", type=int, default=2 << 30,
                        help="bytes of conversation caches kept for reuse (0: none)")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    return parser


def run(args) -> None:
    import uvicorn

    flags = policy_args(args)
    model, tokenizer = load_model(args)
    name = args.model or "smollm2"
    server = Server(model, tokenizer, policy=args.policy, policy_flags=flags, model_name=name,
                    max_tokens=args.max_tokens, max_tokens_cap=args.max_tokens_cap,
                    prompt_cache_bytes=args.prompt_cache_bytes,
                    prefill_step_size=args.prefill_step_size)
    where = ("this machine only" if args.host in ("127.0.0.1", "localhost", "::1")
             else "REACHABLE FROM THE NETWORK")
    print(f"serving {name} ({args.policy}) on http://{args.host}:{args.port}/v1 ({where})",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(build_app(server, args.max_body_bytes), host=args.host, port=args.port,
                    log_level="warning")
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None


def main(argv=None) -> int:
    return run_command(run, setup_arg_parser().parse_args(argv))


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    exit_now(main())
