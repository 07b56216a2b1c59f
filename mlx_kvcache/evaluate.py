"""Fidelity of cache policies on real text, and `python -m mlx_kvcache.evaluate`.

Three tasks, each run for several policies on the same windows in one process:
- ppl: perplexity of the last `score_last` tokens of each `context`-token window,
  the prompt prefilled and the scored tokens fed ONE AT A TIME, so decode-time
  policy behaviour (partial steps, refreshes, evictions) is what is measured;
  with `--prompt-tokens 64` the prompt is short and the context grows from 64
  tokens while it is scored, the regime of a chat (per `--block` of tokens);
- needle: a passkey sentence at each depth of a real-text haystack, the model
  asked for it, exact match;
- longform: a greedy continuation under the policy against the one under
  `full`: token agreement, first divergence, ROUGE-L.
"""

import gzip
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import mlx.core as mx

from mlx_kvcache.cli import Parser, add_policy_flags, number, write_json_atomic
from mlx_kvcache.errors import UserError
from mlx_kvcache.generate import prefill as feed
from mlx_kvcache.policies import (POLICIES, fork, make_cache, parameters,
                                   reads_prompts_in_full, take_over)
from mlx_kvcache.prompt_cache import common_prefix
from mlx_kvcache.stacked import stack

PREFILL_STEP = 2048


@dataclass
class PolicySpec:
    """A policy and the arguments it was given. A ratio budget is resolved by
    the policy itself against the context as it grows, the same rule for every
    policy, so policies compared side by side hold the same budget."""

    name: str
    args: Dict[str, object] = field(default_factory=dict)

    def cache(self, model, prompt_tokens: int):
        # prompt_tokens sizes the fixed caches of mlx-lm compared beside ours
        # (benchmarks/fidelity.py); our policies need no help.
        return make_cache(model, self.name, **self.args)

    def check(self) -> None:
        """Raise UserError now for settings that would fail mid-run."""
        POLICIES[self.name](**self.args)

    def label(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.args.items())
        return f"{self.name}({shown})" if shown else self.name


def read_text(path: str) -> str:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                return f.read()
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None


def windows(tokens: List[int], length: int, count: int) -> List[List[int]]:
    """`count` windows of `length` tokens at evenly spaced, fixed offsets."""
    if len(tokens) < length:
        raise UserError(f"the text has {len(tokens)} tokens, fewer than --context {length}")
    if count == 1:
        return [tokens[:length]]
    stride = (len(tokens) - length) // (count - 1)
    return [tokens[i * stride : i * stride + length] for i in range(count)]


def prefill(model, cache, tokens: List[int], step: int = PREFILL_STEP) -> None:
    """All but the last token, in chunks of `step`, as the generation loop does,
    going on from the tokens[:offset] `cache` already holds (none, or a chunk
    boundary's worth from `SharedPrefix`, so the chunks fall where they would
    from the start)."""
    feed(model, cache, tokens[cache[0].offset : -1], prefill_step_size=step)


class SharedPrefix:
    """Prefills of prompts that begin alike (a needle at growing depths of one
    haystack) that read what they share once: a cache kept at a chunk boundary
    inside the shared tokens is copied (`fork`) for each prompt, the last one
    to use it taking it, and each prompt reads only the rest. The chunks fall
    where a prefill from the start puts them, so each cache is the one a
    prefill from empty makes, bit for bit (tests)."""

    def __init__(self, model, step: int = PREFILL_STEP):
        self.model, self.step = model, step
        self.kept, self.held = None, []  # the kept cache and the tokens it holds

    def start(self, prompt: List[int], shared: int, most: int, new_cache) -> list:
        """A cache for `prompt` (of `new_cache()`'s policy, the same at every
        call) holding as many of its first tokens as the kept cache holds, no
        more than `most`; before that the kept cache reads on to the last
        chunk boundary at or below `shared`, how many first tokens of `prompt`
        the prompts still to come share."""
        if self.kept is None or prompt[: len(self.held)] != self.held or len(self.held) > most:
            self.kept, self.held = new_cache(), []
        upto = min(shared, most) // self.step * self.step
        if upto > len(self.held):
            feed(self.model, self.kept, prompt[len(self.held) : upto],
                 prefill_step_size=self.step)
            self.held = prompt[:upto]
        if not self.held or min(shared, most) < len(self.held):
            # Of no use to the prompts to come: this one takes it, uncopied.
            cache, self.kept, self.held = self.kept, None, []
            return cache
        return fork(self.kept)


# The last prompt tokens a policy continuing from a full prefill reads itself:
# at least SnapKV's observation window, so it votes with its own queries.
FORK_TAIL = 64


def continues_full_prefill(spec: PolicySpec) -> bool:
    return reads_prompts_in_full(spec.name, spec.args)


def continue_from_full(model, spec: PolicySpec, full_cache: list, prompt: List[int]) -> list:
    """spec's cache after prefilling `prompt` (all but its last token, as
    `prefill` does), taking its first tokens from `full_cache`, a full cache
    that prefilled prompt[:offset] and is left as it was. The rest, at least
    FORK_TAIL tokens, is read by the policy in one chunk."""
    offset = full_cache[0].offset
    if not continues_full_prefill(spec) or len(prompt) - 1 - offset < FORK_TAIL:
        raise ValueError(f"{spec.label()} cannot continue a full prefill at {offset} "
                         f"of {len(prompt)} tokens")
    cache = spec.cache(model, len(prompt))
    take_over(cache, full_cache)
    model(mx.array(prompt[offset:-1])[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def step_nll(model, cache, token: int, target: int, rows: int = 1) -> mx.array:
    """Negative log-likelihood of `target` after `token` is fed to `cache`, one
    per row when `rows` caches step together as a batch (`stacked`); not yet
    evaluated, so that callers sum on the device."""
    logits = model(mx.array([[token]] * rows), cache=cache)[:, -1].astype(mx.float32)
    return mx.logsumexp(logits, axis=-1) - logits[:, target]


def window_nll(model, spec: PolicySpec, window: List[int], score_last: int,
               block: Optional[int] = None, cache: Optional[list] = None):
    """(mean negative log-likelihood of the window's last `score_last` tokens,
    the same per consecutive `block` of them (all of them if None),
    milliseconds per scored token). `cache`: spec's cache with the prompt
    (all of the window before the scored tokens) already prefilled."""
    prompt = window[:-score_last]
    if cache is None:
        cache = spec.cache(model, len(prompt))
        prefill(model, cache, prompt)
    block = block or score_last
    total, per_block, block_sum = 0.0, [], mx.array(0.0)
    start = time.perf_counter()
    for n, i in enumerate(range(len(prompt) - 1, len(window) - 1), start=1):
        block_sum = block_sum + step_nll(model, cache, window[i], window[i + 1])[0]
        mx.eval(block_sum)
        if n % block == 0 or n == score_last:
            per_block.append(block_sum.item() / (n - block * len(per_block)))
            total += block_sum.item()
            block_sum = mx.array(0.0)
    decode_ms = (time.perf_counter() - start) / score_last * 1e3
    return total / score_last, per_block, decode_ms


def window_nll_together(model, caches: List[list], window: List[int], score_last: int,
                        alone: int) -> List[tuple]:
    """[(mean negative log-likelihood of the window's last `score_last` tokens,
    milliseconds per token)] for each of `caches`, each holding the window's
    prompt (as `window_nll`'s cache). Each cache is fed its first `alone` scored
    tokens by itself, timed; then all of them step through the rest as the rows
    of one batch (`stacked`), which reads the weights once a step for all.
    A single cache is fed every token alone."""
    first = len(window) - score_last - 1
    # One cache alone needs no batch (and may be another library's cache).
    alone = score_last if len(caches) == 1 else min(alone, score_last)
    sums, decode_ms = [], []
    for cache in caches:
        total = mx.array(0.0)
        start = time.perf_counter()
        for i in range(first, first + alone):
            total = total + step_nll(model, cache, window[i], window[i + 1])[0]
            mx.eval(total)
        decode_ms.append((time.perf_counter() - start) / alone * 1e3 if alone else None)
        sums.append(total)
    together, totals = stack(caches), mx.stack(sums)
    for i in range(first + alone, len(window) - 1):
        totals = totals + step_nll(model, together, window[i], window[i + 1], len(caches))
        mx.eval(totals)
    return [(t / score_last, ms) for t, ms in zip(totals.tolist(), decode_ms)]


def greedy(model, cache, prompt: List[int], max_tokens: int, stop=(),
           prefilled: bool = False) -> List[int]:
    """Greedy tokens after `prompt`; prefilled: `cache` already holds all of it
    but its last token (as `prefill` and `continue_from_full` leave it)."""
    if not prefilled:
        prefill(model, cache, prompt)
    return greedy_together(model, [cache], prompt[-1], max_tokens, stop)[0]


def greedy_together(model, caches: List[list], last: int, max_tokens: int,
                    stop=()) -> List[List[int]]:
    """Each cache's greedy tokens after the prompt token `last`, every cache
    holding the rest of the same prompt: the caches step as the rows of one
    batch (`stacked`), each row fed its own previous token, until every row
    has met a token of `stop` or made `max_tokens`."""
    cache = caches[0] if len(caches) == 1 else stack(caches)
    tokens, out, done = [last] * len(caches), [[] for _ in caches], [False] * len(caches)
    for _ in range(max_tokens):
        logits = model(mx.array([[t] for t in tokens]), cache=cache)[:, -1]
        tokens = logits.argmax(axis=-1).tolist()
        for row, token in enumerate(tokens):
            done[row] = done[row] or token in stop
            if not done[row]:
                out[row].append(token)
        if all(done):
            break
    return out


def rouge_l(candidate: List[int], reference: List[int]) -> float:
    """ROUGE-L F1 over tokens (longest common subsequence)."""
    if not candidate or not reference:
        return 0.0
    previous = [0] * (len(reference) + 1)
    for c in candidate:
        row = [0]
        for j, r in enumerate(reference):
            row.append(previous[j] + 1 if c == r else max(previous[j + 1], row[j]))
        previous = row
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
NEEDLE_INTRO = ("There is an important piece of information hidden inside a lot of "
                "irrelevant text. Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE_QUESTION = "\n\nWhat is the pass key? The pass key is"


def needle_prompt(tokenizer, haystack: List[int], context: int, depth: float, key: str):
    intro = tokenizer.encode(NEEDLE_INTRO)
    needle = tokenizer.encode(" " + NEEDLE.format(key=key) + " ", add_special_tokens=False)
    question = tokenizer.encode(NEEDLE_QUESTION, add_special_tokens=False)
    room = context - len(intro) - len(needle) - len(question)
    if room <= 0:
        raise UserError(f"--context {context} is too short for the needle task")
    filler = haystack[:room]
    at = int(depth * len(filler))
    return intro + filler[:at] + needle + filler[at:] + question


def run_task(task: str, model, tokenizer, specs: List[PolicySpec], args, log) -> dict:
    results = [{"policy": s.name, "args": s.args, "label": s.label(), "per_window": []}
               for s in specs]
    if task == "needle":
        haystack = tokenizer.encode(read_text(args.haystack_file), add_special_tokens=False)
        keys = random.Random(args.seed)
        trials = [(d, str(keys.randint(10000, 99999))) for d in args.depths
                  for _ in range(args.windows)]
        prompts = [needle_prompt(tokenizer, haystack, args.context, depth, key)
                   for depth, key in trials]
        # The prompts begin alike up to the needle: each policy reads that once
        # (holding one more cache meanwhile).
        sharing = [SharedPrefix(model) for _ in specs]
        for (depth, key), prompt, after in zip(trials, prompts, prompts[1:] + [[]]):
            shared = common_prefix(prompt, after)
            for spec, result, prefix in zip(specs, results, sharing):
                cache = prefix.start(prompt, shared, len(prompt) - 1,
                                     lambda: spec.cache(model, len(prompt)))
                answer = tokenizer.decode(greedy(model, cache, prompt, 8,
                                                 tokenizer.eos_token_ids))
                found = key in answer
                result["per_window"].append({"depth": depth, "key": key, "answer": answer,
                                             "correct": found})
                log(f"needle depth {depth:.2f} {spec.label()}: {found}")
        for result in results:
            hits = [w["correct"] for w in result["per_window"]]
            result["accuracy"] = sum(hits) / len(hits)
        metric = "accuracy"
    else:
        tokens = tokenizer.encode(read_text(args.text_file), add_special_tokens=False)
        cut = windows(tokens[getattr(args, "start", 0):], args.context, args.windows)
        for w, window in enumerate(cut):
            reference = None
            for spec, result in zip(specs, results):
                start = time.perf_counter()
                if task == "ppl":
                    nll, per_block, decode_ms = window_nll(
                        model, spec, window, args.score_last, getattr(args, "block", None))
                    entry = {"window": w, "nll": nll, "ppl": math.exp(nll),
                             "block_nll": per_block, "decode_ms_per_token": decode_ms}
                else:
                    prompt = window
                    out = greedy(model, spec.cache(model, len(prompt)), prompt, args.max_tokens)
                    if reference is None:
                        reference = out if spec.name == "full" else greedy(
                            model, make_cache(model, "full"), prompt, args.max_tokens)
                    same = [a == b for a, b in zip(out, reference)]
                    entry = {"window": w,
                             "agreement": sum(same) / max(len(reference), 1),
                             "first_divergence": same.index(False) if False in same else len(same),
                             "rouge_l": rouge_l(out, reference)}
                entry["seconds"] = time.perf_counter() - start
                result["per_window"].append(entry)
                log(f"{task} window {w} {spec.label()}: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in entry.items()
                                if isinstance(v, float)))
        for result in results:
            per = result["per_window"]
            if task == "ppl":
                result["ppl"] = math.exp(sum(p["nll"] for p in per) / len(per))
                result["block_ppl"] = [math.exp(sum(b) / len(b))
                                       for b in zip(*(p["block_nll"] for p in per))]
                result["decode_ms_per_token"] = sum(
                    p["decode_ms_per_token"] for p in per) / len(per)
            else:
                for key in ("agreement", "first_divergence", "rouge_l"):
                    result[key] = sum(p[key] for p in per) / len(per)
        metric = "ppl" if task == "ppl" else "agreement"

    full = next((r for r in results if r["policy"] == "full" and not r["args"]), None)
    for result in results:
        result["ratio_to_full"] = (result[metric] / full[metric]
                                   if full and full[metric] else None)
    report = {"task": task, "model": model.source, "context": args.context,
              "metric": metric, "results": results}
    if task == "ppl":
        report.update(score_last=args.score_last, block=getattr(args, "block", None))
    return report


def setup_arg_parser():
    parser = Parser(prog="python -m mlx_kvcache.evaluate",
                     description="Fidelity of KV-cache policies on real text.")
    parser.add_argument("--task", choices=["ppl", "needle", "longform"], required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--policy", default="full",
                        help="comma-separated policies, compared on the same windows")
    parser.add_argument("--text-file", default=None, help="ppl, longform: the text (.gz ok)")
    parser.add_argument("--haystack-file", default=None, help="needle: the filler text")
    parser.add_argument("--context", type=number(int, 16), default=2048,
                        help="tokens per window (prompt + scored tokens)")
    parser.add_argument("--score-last", type=number(int, 1), default=None,
                        help="ppl: tokens scored at the end of each window (default 256)")
    parser.add_argument("--start", type=number(int, 0), default=0,
                        help="ppl, longform: skip this many tokens of the text first "
                        "(a manual's table of contents)")
    parser.add_argument("--prompt-tokens", type=number(int, 1), default=None,
                        help="ppl: prefill this many tokens and score all the rest: the "
                        "context grows while it is scored, as in a chat")
    parser.add_argument("--block", type=number(int, 1), default=None,
                        help="ppl: also report the perplexity of each block of this many "
                        "scored tokens")
    parser.add_argument("--windows", type=number(int, 1), default=4,
                        help="windows per text (needle: trials per depth)")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--max-tokens", type=number(int, 1), default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    add_policy_flags(parser)
    return parser


def specs_from_args(args) -> List[PolicySpec]:
    names = [n.strip() for n in args.policy.split(",") if n.strip()]
    flags = {name: getattr(args, name) for cls in POLICIES.values()
             for name in parameters(cls) if getattr(args, name, None) is not None}
    specs = []
    for name in names:
        if name not in POLICIES:
            raise UserError(f"unknown policy {name!r} (available: {', '.join(sorted(POLICIES))})")
        accepted = parameters(POLICIES[name])
        specs.append(PolicySpec(name, {k: v for k, v in flags.items() if k in accepted}))
    unused = set(flags) - {k for s in specs for k in s.args}
    if unused:
        raise UserError(f"{', '.join('--' + u.replace('_', '-') for u in sorted(unused))} "
                        f"applies to none of: {', '.join(names)}")
    return specs


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        if args.task in ("ppl", "longform") and not args.text_file:
            raise UserError(f"--task {args.task} needs --text-file")
        if args.task == "needle" and not args.haystack_file:
            raise UserError("--task needle needs --haystack-file")
        if args.prompt_tokens is not None:
            if args.score_last is not None:
                raise UserError("give --score-last or --prompt-tokens, not both")
            if args.prompt_tokens >= args.context:
                raise UserError("--prompt-tokens must be smaller than --context")
            args.score_last = args.context - args.prompt_tokens
        elif args.score_last is None:
            args.score_last = 256
        if args.task == "ppl" and args.score_last >= args.context:
            raise UserError("--score-last must be smaller than --context")
        try:
            args.depths = [float(d) for d in args.depths.split(",")]
        except ValueError:
            raise UserError(f"--depths: comma-separated fractions, got {args.depths!r}") from None
        specs = specs_from_args(args)
        for spec in specs:
            spec.check()
        from mlx_kvcache.loading import load

        model, tokenizer = load(args.model)
        if model.context_length and args.context > model.context_length:
            raise UserError(f"--context {args.context} exceeds the model's context "
                            f"({model.context_length} tokens)")
        report = run_task(args.task, model, tokenizer, specs, args,
                          lambda line: print(line, file=sys.stderr, flush=True))
        for result in report["results"]:
            value = result[report["metric"]]
            ratio = result["ratio_to_full"]
            blocks = result.get("block_ppl", [])
            print(f"{result['label']}: {report['metric']} {value:.4f}"
                  + (f" ({ratio:.3f}x full)" if ratio else "")
                  + (" | per block " + " ".join(f"{b:.2f}" for b in blocks)
                     if len(blocks) > 1 else ""))
        if args.json:
            write_json_atomic(args.json, report)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    exit_now(main())
