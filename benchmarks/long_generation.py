"""Needle retrieval and long-form agreement at long contexts on
Qwen2.5-Coder-0.5B-Instruct (32K context), every policy, at budgets L/16 and L/8.

- needle: a pass key planted at depths 0.1-0.9 of a haystack (each manual in
  turn), asked for at the end (`evaluate.needle_prompt`); a hit is the key in 8
  greedy tokens;
- longform: a window of each manual, then `--max-tokens` greedy tokens under each
  policy against full's: the share of tokens equal to full's, the first
  divergence, ROUGE-L.

Prefill is what costs, so it is shared as in long_context.py: full, SnapKV and
RefreshKV read a prompt with full attention, so each continues one full prefill
of it (`evaluate.continue_from_full`, tested bit-exact) and reads only its last
FORK_TAIL tokens itself; every other policy prefills its own.

    python benchmarks/long_generation.py --quick   # needle, 4K, 2 depths, L/8
    python benchmarks/long_generation.py --tasks needle,longform --lengths 8192,16384

Writes benchmarks/results/long_generation.json (long_generation_quick.json)
after every prompt.
"""

import argparse
import random
import time
from fractions import Fraction

import mlx.core as mx
from common import write_result
from long_context import MODEL, START, TEXTS, UNBUDGETED, advance

from mlx_kvcache import load, make_cache
from mlx_kvcache.evaluate import (FORK_TAIL, PolicySpec, continue_from_full,
                                  continues_full_prefill, greedy, needle_prompt, read_text,
                                  rouge_l)

NEEDLE_TOKENS = 8
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Every policy: the evicting and selecting ones at each ratio, the quantized
# ones (UNBUDGETED) once.
BUDGETED = ("streaming", "snapkv", "h2o", "refreshkv", "mixed")


def specs_for(policies, ratios):
    specs = [PolicySpec("full")]
    specs += [PolicySpec(name, {"budget_ratio": r, **({"kv_bits": 4} if name == "mixed" else {})})
              for r in ratios for name in BUDGETED if name in policies]
    specs += [PolicySpec(name, args) for name, args in UNBUDGETED.items() if name in policies]
    return specs


def prompts(task, tokenizer, texts, length, depths, max_tokens, seed):
    """(haystack or text name, depth or None, key or None, prompt tokens) to run;
    texts: {name: its tokens}."""
    keys = random.Random(seed)
    for name, tokens in texts.items():
        if task == "needle":
            for depth in depths:
                key = str(keys.randint(10000, 99999))
                yield name, depth, key, needle_prompt(tokenizer, tokens, length, depth, key)
        else:
            # The continuation is compared, so the prompt leaves it room.
            yield name, None, None, tokens[: length - max_tokens]


def generate_all(model, specs, prompt, max_tokens, stop, log):
    """Each spec's greedy tokens after `prompt`, the full prefill shared."""
    full = make_cache(model, "full")
    t0 = time.perf_counter()
    advance(model, full, prompt, len(prompt) - 1 - FORK_TAIL)
    log(f"  shared full prefill of {len(prompt)} tokens: {time.perf_counter() - t0:.0f} s")
    out = {}
    for spec in specs:
        t0 = time.perf_counter()
        if continues_full_prefill(spec):
            cache = continue_from_full(model, spec, full, prompt)
            tokens = greedy(model, cache, prompt, max_tokens, stop, prefilled=True)
        else:
            cache = spec.cache(model, len(prompt))
            tokens = greedy(model, cache, prompt, max_tokens, stop)
        out[spec.label()] = {"policy": spec.name, "args": spec.args, "tokens": tokens,
                             "seconds": time.perf_counter() - t0,
                             "kv_bytes": sum(c.nbytes for c in cache)}
        del cache
        mx.clear_cache()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", default="needle", help="comma-separated: needle, longform")
    parser.add_argument("--lengths", default=None, help="comma-separated (default 8192,16384)")
    parser.add_argument("--ratios", default=None, help="comma-separated (default 1/16,1/8)")
    parser.add_argument("--policies", default=",".join(BUDGETED + tuple(UNBUDGETED)),
                        help="comma-separated (full always runs)")
    parser.add_argument("--depths", default=None, help="needle depths (default 0.1,...,0.9)")
    parser.add_argument("--texts", default=",".join(TEXTS),
                        help=f"comma-separated haystacks / texts, of {', '.join(TEXTS)}")
    parser.add_argument("--max-tokens", type=int, default=128, help="longform tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None,
                        help="result file name (default long_generation, long_generation_quick)")
    args = parser.parse_args()
    quick = args.quick
    lengths = [int(x) for x in (args.lengths or ("4096" if quick else "8192,16384")).split(",")]
    ratios = [float(Fraction(r)) for r in (args.ratios or ("1/8" if quick else "1/16,1/8")).split(",")]
    depths = ([float(d) for d in args.depths.split(",")] if args.depths
              else (0.1, 0.9) if quick else DEPTHS)
    policies = args.policies.split(",")
    unknown = set(policies) - set(BUDGETED) - set(UNBUDGETED)
    if unknown:
        raise SystemExit(f"unknown policies: {', '.join(sorted(unknown))}")
    unknown = set(args.texts.split(",")) - set(TEXTS)
    if unknown:
        raise SystemExit(f"unknown texts: {', '.join(sorted(unknown))}")
    log = lambda line: print(line, flush=True)  # noqa: E731

    model, tokenizer = load(MODEL)
    specs = specs_for(policies, ratios)
    texts = {name: tokenizer.encode(read_text(TEXTS[name]), add_special_tokens=False)[START:]
             for name in args.texts.split(",")}
    report = {"benchmark": "long_generation", "model": model.source, "quick": quick,
              "lengths": lengths, "ratios": ratios, "policies": [s.label() for s in specs],
              "needle_tokens": NEEDLE_TOKENS, "max_tokens": args.max_tokens, "runs": []}
    for task in args.tasks.split(","):
        max_tokens = NEEDLE_TOKENS if task == "needle" else args.max_tokens
        stop = tokenizer.eos_token_ids if task == "needle" else ()
        for length in lengths:
            for text, depth, key, prompt in prompts(task, tokenizer, texts, length, depths,
                                                    args.max_tokens, args.seed):
                log(f"{task} {length} {text}" + (f" depth {depth}" if depth is not None else ""))
                outputs = generate_all(model, specs, prompt, max_tokens, stop, log)
                reference = outputs["full"]["tokens"]
                results = []
                for label, out in outputs.items():
                    entry = {"label": label, "policy": out["policy"], "args": out["args"],
                             "seconds": out["seconds"], "kv_bytes": out["kv_bytes"]}
                    if task == "needle":
                        answer = tokenizer.decode(out["tokens"])
                        entry.update(answer=answer, correct=key in answer)
                    else:
                        same = [a == b for a, b in zip(out["tokens"], reference)]
                        entry.update(
                            agreement=sum(same) / max(len(reference), 1),
                            first_divergence=same.index(False) if False in same else len(same),
                            rouge_l=rouge_l(out["tokens"], reference))
                    results.append(entry)
                    log(f"  {label}: " + (f"{entry['correct']} ({entry['answer']!r})"
                                          if task == "needle" else
                                          f"agreement {entry['agreement']:.2f}, rouge-l "
                                          f"{entry['rouge_l']:.2f}"))
                report["runs"].append({"task": task, "context": length, "text": text,
                                       "depth": depth, "key": key,
                                       "prompt_tokens": len(prompt), "results": results})
                write_result(args.name or ("long_generation_quick" if quick
                                           else "long_generation"), report)


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
