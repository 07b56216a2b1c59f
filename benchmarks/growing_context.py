"""The context grows while it is read, as in every chat: a short prompt (64
tokens), then a long continuation of real text scored one token at a time
(2,048 tokens), for every budgeted policy with its defaults (budget 1/8 of
the context so far, never below the floor) beside full; on the coreutils
manual also RefreshKV and streaming at floors 0-512 and RefreshKV at what the
old default resolved to (1/8 of the prompt, once: 8 tokens for the whole
run). Perplexity over the whole continuation and per block of 256 scored
tokens. The default floor is read off this table (docs/long_context.md,
"Budgets that grow: where the floor comes from").

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
    RefreshKV's other floors (0: the ratio alone) right after its default, and
    later streaming's, and a fixed 1/8 of the prompt (what the old default
    resolved to). SnapKV comes last: a 64-token prompt is under any floor it
    takes, so it never cuts and its logits are full's (tested bit for bit)."""
    def at(name, floor, **kw):
        return PolicySpec(name, {"budget_ratio": RATIO, "min_budget": floor, **kw})

    floor = 128 if quick else DEFAULT_MIN_BUDGET
    others = [f for f in (128, 512, 0) if sweep and f != floor]
    out = [PolicySpec("full"), at("refreshkv", floor)]
    out += [at("refreshkv", f) for f in others]
    out += [at(name, floor) for name in ("streaming", "h2o", "mixed")]
    out += [at("refreshkv", floor, refresh="stride")]
    if sweep:
        out.append(PolicySpec("refreshkv", {"budget": max(1, round(RATIO * PROMPT_TOKENS))}))
        # streaming's floor must exceed its 4 sinks: no floor-0 row
        out += [at("streaming", f) for f in others if f]
    return out + [at("snapkv", floor)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--texts", nargs="+", choices=sorted(TEXTS), default=None)
    args = parser.parse_args()
    texts = args.texts or (["coreutils"] if args.quick else sorted(TEXTS))
    scored = 512 if args.quick else 2048
    model, tokenizer = load("smollm2")
    log = lambda line: print(line, flush=True)  # noqa: E731
    for text in texts:
        ns = SimpleNamespace(text_file=TEXTS[text], context=PROMPT_TOKENS + scored,
                             score_last=scored, windows=1, block=256, start=START)
        # The floors are swept on one text; the others check the defaults.
        sweep = text == SWEPT and not args.quick
        results = []
        # One setting at a time, the file rewritten after each: a long run
        # stopped early keeps what it measured.
        for spec in specs(sweep, args.quick):
            report = run_task("ppl", model, tokenizer, [spec], ns, log)
            results += report["results"]
            for r in results:
                r["ratio_to_full"] = r["ppl"] / results[0]["ppl"]
            report.update(results=results, text=text, windows=1, start=START,
                          prompt_tokens=PROMPT_TOKENS, ratio=RATIO,
                          default_min_budget=DEFAULT_MIN_BUDGET, swept=sweep)
            write_result(f"growing_context_{text}",
                         {"benchmark": "growing_context", "quick": args.quick, **report})


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
