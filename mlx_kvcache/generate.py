"""The generation loop, and `python -m mlx_kvcache.generate`.

tokenize -> prefill in chunks -> for each step: model -> sample -> stream.
The cache policy hides inside the model's attention call.
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Union

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from mlx_kvcache.cli import (Parser, add_model_flags, load_model, policy_args, run_command,
                             write_json_atomic)
from mlx_kvcache.distributed import shared_seed, speaks, world
from mlx_kvcache.errors import UserError
from mlx_kvcache.policies import make_cache

DEFAULT_PREFILL_STEP = 2048


@dataclass
class GenerationResponse:
    """One generated token, with the run's figures so far."""

    text: str  # the text this token completes (may be empty mid-character)
    token: int
    prompt_tokens: int
    generation_tokens: int
    prefill_s: float  # prompt processing, up to the first generated token
    prompt_tps: float
    generation_tps: float  # decode tokens/s after the first token
    peak_memory: int  # bytes, mx.get_peak_memory()
    finish_reason: Optional[str]  # None while going, then "stop" or "length"


def encode_prompt(tokenizer, prompt: Union[str, List[int]]) -> List[int]:
    if isinstance(prompt, str):
        # A prompt already rendered by a chat template carries its own BOS.
        bos = tokenizer.bos_token
        add_special = bos is None or not prompt.startswith(bos)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    return list(prompt)


def prefill(model, cache: list, tokens: List[int], *,
            prefill_step_size: int = DEFAULT_PREFILL_STEP,
            progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Feed `tokens` to the model in chunks, only filling `cache`; returns
    how many were fed."""
    done, total = 0, len(tokens)
    while done < total:
        n = min(prefill_step_size, total - done)
        model(mx.array(tokens[done : done + n])[None], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        if progress:
            progress(done, total)
        mx.clear_cache()
    return done


def generate_step(
    prompt: List[int],
    model,
    cache: list,
    sampler: Callable[[mx.array], mx.array],
    *,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Iterator[int]:
    """Token ids, without end. Every yielded token has already been fed to the
    model, so `cache` holds the prompt and all yielded tokens. `progress(done,
    total)` is called after each prefill chunk; an exception it raises stops
    the prefill there."""
    tokens = mx.array(prompt)
    total = len(prompt)
    # All but the last prompt token only fill the cache: their logits are never
    # evaluated, so the vocabulary projection runs for one position only.
    done = prefill(model, cache, prompt[:-1], prefill_step_size=prefill_step_size,
                   progress=progress and (lambda n, _: progress(n, total)))

    def step(token_ids: mx.array) -> mx.array:
        logits = model(token_ids[None], cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs)

    y = step(tokens[done:])
    mx.async_eval(y)
    if progress:
        progress(total, total)
    while True:
        # Schedule the next step before handing this token out, so the model
        # computes while the caller prints.
        next_y = step(y)
        mx.async_eval(next_y)
        yield y.item()
        y = next_y


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    policy: str = "full",
    cache: Optional[list] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    progress: Optional[Callable[[int, int], None]] = None,
    **policy_args,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text or token ids), one response per token.

    The cache is `make_cache(model, policy, **policy_args)` unless `cache` is
    given (to continue a conversation, or to inspect it afterwards).
    """
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise UserError("the prompt is empty")
    context = getattr(model, "context_length", None)
    if context and len(ids) > context:
        raise UserError(
            f"the prompt is {len(ids)} tokens; the model's context is {context} tokens"
        )
    if cache is None:
        cache = make_cache(model, policy, **policy_args)
    elif policy_args:
        raise UserError("pass policy arguments to make_cache, not with an existing cache")
    sampler = sampler or make_sampler(temp, top_p)
    detokenizer = tokenizer.detokenizer
    eos = tokenizer.eos_token_ids

    start = time.perf_counter()
    prefill_s, first_token_at = 0.0, start
    steps = generate_step(
        ids, model, cache, sampler, prefill_step_size=prefill_step_size, progress=progress
    )
    for n, token in enumerate(steps, start=1):
        now = time.perf_counter()
        if n == 1:
            prefill_s, first_token_at = now - start, now
        finish = "stop" if token in eos else ("length" if n >= max_tokens else None)
        if token not in eos:
            detokenizer.add_token(token)
        if finish:
            detokenizer.finalize()
        decode_s = now - first_token_at
        yield GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            prompt_tokens=len(ids),
            generation_tokens=n,
            prefill_s=prefill_s,
            prompt_tps=len(ids) / prefill_s,
            generation_tps=(n - 1) / decode_s if n > 1 else 0.0,
            peak_memory=mx.get_peak_memory(),
            finish_reason=finish,
        )
        if finish:
            break


def generate(model, tokenizer, prompt, **kwargs) -> str:
    """The whole generated text; the same arguments as `stream_generate`."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


# ---------------------------------------------------------------- the CLI


def setup_arg_parser():
    parser = Parser(
        prog="python -m mlx_kvcache.generate",
        description="Generate text with a swappable KV-cache policy.",
    )
    parser.add_argument("--prompt", "-p", default=None, help="the prompt; '-' reads stdin")
    parser.add_argument("--prompt-file", default=None, help="read the prompt from a file")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--ignore-chat-template", action="store_true",
                        help="feed the prompt as raw text")
    add_model_flags(parser, max_tokens=100, prefill_step=DEFAULT_PREFILL_STEP)
    parser.add_argument("--stats-json", default=None, help="write run figures to this file")
    parser.add_argument("--verbose", action="store_true")
    return parser


def _read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {args.prompt_file}: {e}") from None
    if args.prompt is None:
        raise UserError("no prompt: pass --prompt TEXT, --prompt-file PATH or --prompt -")
    if args.prompt == "-":
        return sys.stdin.read()
    return args.prompt


def _prompt_ids(tokenizer, args, text: str) -> List[int]:
    if not text.strip():
        raise UserError("the prompt is empty")
    if args.ignore_chat_template or not tokenizer.has_chat_template:
        return encode_prompt(tokenizer, text)
    messages = []
    if args.system_prompt is not None:
        messages.append({"role": "system", "content": args.system_prompt})
    messages.append({"role": "user", "content": text})
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    return encode_prompt(tokenizer, rendered)


def _progress_bar(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\rprefill [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\r" + " " * (width + 40) + "\r")
    sys.stderr.flush()


def run(args) -> None:
    policy_flags = policy_args(args)
    if args.stats_json:
        stats_dir = os.path.dirname(os.path.abspath(args.stats_json))
        if not os.path.isdir(stats_dir):
            raise UserError(f"cannot write {args.stats_json}: no directory {stats_dir}")
    text = _read_prompt(args)
    group = world()
    speaker = speaks(group)
    if group is not None:
        args.seed = shared_seed(group, args.seed)
    if args.seed is not None:
        mx.random.seed(args.seed)

    t0 = time.perf_counter()
    model, tokenizer = load_model(args, shardable=True)
    if args.verbose and speaker:
        print(f"loaded {model.source} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ids = _prompt_ids(tokenizer, args, text)
    cache = make_cache(model, args.policy, **policy_flags)
    # Peak memory of the generation (weights included), not of loading, which
    # briefly holds quantized and dequantized weights together.
    mx.reset_peak_memory()

    response = None
    for response in stream_generate(
        model, tokenizer, ids, max_tokens=args.max_tokens, temp=args.temp,
        top_p=args.top_p, cache=cache, prefill_step_size=args.prefill_step_size,
        progress=_progress_bar if speaker and sys.stderr.isatty() else None,
    ):
        sys.stdout.write(response.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not speaker:
        return

    kv_bytes = sum(c.nbytes for c in cache)
    stats = {
        "model": model.source,
        "policy": args.policy,
        "prompt_tokens": response.prompt_tokens,
        "generated_tokens": response.generation_tokens,
        "prefill_s": round(response.prefill_s, 4),
        "prefill_tok_per_s": round(response.prompt_tps, 2),
        "decode_tok_per_s": round(response.generation_tps, 2),
        "kv_bytes": kv_bytes,
        "peak_memory_bytes": response.peak_memory,
    }
    print(
        f"[{args.policy}] prompt {stats['prompt_tokens']} tokens, "
        f"{stats['prefill_tok_per_s']:.1f} tok/s | generated {stats['generated_tokens']} "
        f"tokens, {stats['decode_tok_per_s']:.1f} tok/s | kv cache {kv_bytes / 2**20:.1f} MiB"
        f" | peak memory {response.peak_memory / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    if group is not None:
        stats["ranks"] = group.size()
        print(f"  sharded over {group.size()} ranks: the kv cache and memory above are rank "
              "0's own", file=sys.stderr)
    offload = getattr(model, "offload", None)
    if offload is not None:
        stats["offload"] = o = offload.stats()
        print(f"  weights: budget {o['budget_bytes'] / 2**20:.0f} MiB of "
              f"{o['weight_bytes'] / 2**20:.0f} MiB, {o['pinned_units']} units resident, "
              f"{o['streamed_units']} streamed ({o['streamed_bytes_per_pass'] / 2**20:.0f} MiB "
              f"read per forward pass), {o['read_seconds']:.1f} s reading", file=sys.stderr)
        if o["mode"] == "neurons":
            print(f"  neurons: {o['neuron_bytes_read'] / 2**20:.0f} MiB of FFN neurons read, "
                  f"{o['neuron_window_bytes'] / 2**20:.0f} MiB held by the window",
                  file=sys.stderr)
    windows = model.sliding_windows
    layer_stats = [layer.stats() for layer in cache]
    if any(windows):
        # A hybrid model (Gemma 3): say which layers run the policy.
        layer_stats = [{"kind": args.policy if window is None else f"local window {window}",
                        **layer} for layer, window in zip(layer_stats, windows)]
        local = sum(c.nbytes for c, window in zip(cache, windows) if window)
        print(f"  kv cache: {(kv_bytes - local) / 2**20:.1f} MiB in "
              f"{windows.count(None)} global layers ({args.policy}), "
              f"{local / 2**20:.1f} MiB in {len(windows) - windows.count(None)} local layers "
              "(own window)", file=sys.stderr)
    stats["policy_stats"] = layer_stats
    if args.verbose:
        for i, layer in enumerate(layer_stats):
            print(f"  layer {i}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float)
                                              else f"{k} {v}" for k, v in layer.items()),
                  file=sys.stderr)
    if args.stats_json:
        write_json_atomic(args.stats_json, stats)


def main(argv=None) -> int:
    return run_command(run, setup_arg_parser().parse_args(argv))


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    exit_now(main())
