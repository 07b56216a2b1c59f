"""The context grows while it is read, as in every chat: a short prompt (64
tokens), then a long continuation of real text scored one token at a time
(2,048 tokens), for every budgeted policy with its defaults (budget 1/8 of
the context so far, never below the floor) beside full; on the coreutils
manual also RefreshKV and streaming at floors 0-512 and RefreshKV at what the
old default resolved to (1/8 of the prompt, once: 8 tokens for the whole
run). Perplexity over the whole continuation and per block of 256 scored
tokens. The default floor is read off this table (README, "Budgets that grow
with the context").

    python benchmarks/growing_context.py [--quick] [--texts coreutils gettext]

One result file per text, benchmarks/results/growing_context_<text>.json, so
texts can run in separate processes. --quick: one text, 64 + 512 tokens.
"""

import argparse
from types import SimpleNamespace

from common import write_result

from mlx_kvcache import load
from mlx_kvcache.evaluate import PolicySpec, run_task
from mlx_kvcache.policies.budget import DEFAULT_MIN_BUDGET

TEXTS = {
    "coreutils": "/usr/share/info/coreutils.info.gz",
    "gettext": "/usr/share/info/gettext.info.gz",
}
PROMPT_TOKENS = 64
START = 20000  # past the manuals' tables of contents, into running text
RATIO = 1 / 8
SWEPT = "coreutils"


def specs(sweep: bool, quick: bool):
    """full, then every budgeted policy at the default floor; with `sweep`,
    also RefreshKV and streaming at other floors (0: the ratio alone) and a
    fixed 1/8 of the prompt (what the old default resolved to)."""
    def at(name, floor, **kw):
        return PolicySpec(name, {"budget_ratio": RATIO, "min_budget": floor, **kw})

    floor = 128 if quick else DEFAULT_MIN_BUDGET
    out = [PolicySpec("full")]
    if sweep:
        out.append(PolicySpec("refreshkv", {"budget": max(1, round(RATIO * PROMPT_TOKENS))}))
        others = (0, 128, 256, 512)
        out += [at("refreshkv", f) for f in others if f != floor]
        # streaming's floor must exceed its 4 sinks: no floor-0 row
        out += [at("streaming", f) for f in others if f not in (0, floor)]
    out += [at(name, floor) for name in ("refreshkv", "streaming", "snapkv", "h2o", "mixed")]
    out += [at("refreshkv", floor, refresh="stride")]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--texts", nargs="+", choices=sorted(TEXTS), default=None)
    args = parser.parse_args()
    texts = args.texts or (["coreutils"] if args.quick else sorted(TEXTS))
    # The floors are swept on the first text; the others check the defaults.
    scored = 512 if args.quick else 2048
    model, tokenizer = load("smollm2")
    log = lambda line: print(line, flush=True)  # noqa: E731
    for text in texts:
        ns = SimpleNamespace(text_file=TEXTS[text], context=PROMPT_TOKENS + scored,
                             score_last=scored, windows=1, block=256, start=START)
        sweep = text == SWEPT and not args.quick
        result = run_task("ppl", model, tokenizer, specs(sweep, args.quick), ns, log)
        result.update(text=text, windows=1, start=START, prompt_tokens=PROMPT_TOKENS, ratio=RATIO,
                      default_min_budget=DEFAULT_MIN_BUDGET, swept=sweep)
        write_result(f"growing_context_{text}",
                     {"benchmark": "growing_context", "quick": args.quick, **result})


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
