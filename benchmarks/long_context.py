"""Every policy at long contexts on Qwen2.5-Coder-0.5B-Instruct (32K context):
perplexity of the last 256 tokens of each window, scored one token at a time,
at budgets L/16 and L/8, with decode ms/token and memory per context length
beside the full cache and mlx-lm's KVCache.

Prefill and decoding are what cost here: exact attention over L tokens takes
14 heads x 24 layers x L^2/2 exponentials, and each scored token reads the 2 GB
of float32 weights. The work is shared:

- windows nest: each window has the longest length; a shorter length's window
  is its first L tokens, so one prefill track passes every length's checkpoint
  (L - 256 tokens prefilled, the next 256 scored);
- full, SnapKV and RefreshKV read a prompt with full attention and hold what
  `full` holds: at each checkpoint they continue from the full track's cache
  (evaluate.continue_from_full, tested bit-exact) and read only its last
  FORK_TAIL tokens themselves; mlx-lm's KVCache starts from the same keys;
- H2O's prefill is the same at every budget (it cuts at decode steps only):
  one track serves L/16 and L/8 (policies.with_budget, tested exact);
- every other policy runs its own track, copied at each checkpoint;
- the scored tokens: each policy is fed its first ALONE by itself, timed (its
  decode ms/token), then every policy's cache steps through the rest as one
  row of a batch (evaluate.window_nll_together): one read of the weights a
  step for all of them. Batched matmuls sum in another order, so perplexities
  move by ~1e-5 relative (tests/test_stacked.py), except the plain 4-bit
  quantized cache's, which is chaotic under any such change.

    python benchmarks/long_context.py --quick    # one 8K window, L/8, 128 scored (~6 min)
    python benchmarks/long_context.py            # every policy at 8K, both texts (under 2 h)
    python benchmarks/long_context.py --lengths 8192,16384,32768 --windows 2   # hours: see docs

What an 8K window of every policy cost here (measured) before the batch and the
shared H2O track: the shared prefill 90 s, each own-prefill policy 85 s (KIVI)
to 245 s (H2O: it scores every chunk), 256 scored tokens at 0.3-0.5 s each per
setting: 41 min. Batched, the same scores came out equal to 3 decimals
(results/long_context_batched_check.json against long_context_8k.json).
Prefill grows with the square of the context, so a 32K window of every policy
is many hours on 2 cores (docs/benchmarks.md).

Writes benchmarks/results/long_context.json (long_context_quick.json) after
every checkpoint.
"""

import argparse
import math
import time
from fractions import Fraction
from pathlib import Path

import mlx.core as mx
from common import write_result
from mlx_lm.models.cache import KVCache

from mlx_kvcache import load, make_cache
from mlx_kvcache.cache_file import load_cache, save_cache
from mlx_kvcache.policies import fork, reads_prompts_at_any_budget, with_budget
from mlx_kvcache.evaluate import (FORK_TAIL, PREFILL_STEP, PolicySpec, continue_from_full,
                                  continues_full_prefill, read_text, window_nll_together)
from tests.helpers import mlx_lm_twin

MODEL = "qwen2.5-coder-0.5b"
TEXTS = {
    "coreutils": "/usr/share/info/coreutils.info.gz",
    "gettext": "/usr/share/info/gettext.info.gz",
}
SCORED = 256
QUICK_SCORED = 128
# Where the windows start in each text: past the table of contents, then spread.
START = 2000
# Scored tokens each policy steps through alone (timed) before the rest are fed
# to every policy in one batch.
ALONE = 32
# The policies that keep every token (so no ratio): run once, beside the budgeted.
UNBUDGETED = {"quantized": {"kv_bits": 4}, "kivi": {"kv_bits": 4}}


def tradeoff_at(ratio: float):
    """RefreshKV's settings between its defaults and refreshing every step:
    each continues the shared prefill, so they cost only their scoring."""
    def refresh(**kw):
        return PolicySpec("refreshkv", {"budget_ratio": ratio, **kw})

    return ([refresh(refresh="stride", refresh_every=k) for k in (2, 4, 8, 16)]
            + [refresh(refresh="stride", refresh_every=k, refresh_mode="score") for k in (2, 4)]
            + [refresh(refresh="query", qc=2, threshold=t) for t in (0.9, 0.95)]
            # StreamingLLM beats the defaults at 8K on code: is it recency?
            + [refresh(recent=128)])


def specs_at(ratio: float, quick: bool):
    def at(name, **kw):
        return PolicySpec(name, {"budget_ratio": ratio, **kw})

    # --quick: the policies that continue the shared prefill, and StreamingLLM
    # (its own prefill: ~100 s at 8K here).
    specs = [at("streaming"), at("snapkv"), at("refreshkv")]
    if not quick:
        # The trade-off curve's lossless point (fidelity.py): every step
        # scores all keys and attends to the best L*ratio of them.
        specs += [at("refreshkv", refresh="stride", refresh_every=1, refresh_mode="score"),
                  at("h2o"), at("mixed", kv_bits=4)]
    return specs


def track_of(spec) -> str:
    """The own prefill track a policy continues: its own, or for a policy whose
    prefill is the same at every budget (H2O), one shared by its budgets."""
    if reads_prompts_at_any_budget(spec.name):
        budgets = {"budget", "budget_ratio", "min_budget"}
        return PolicySpec(spec.name, {k: v for k, v in spec.args.items()
                                      if k not in budgets}).label() + " at any budget"
    return spec.label()


def from_track(model, spec, track: list) -> list:
    """spec's cache going on from its prefill track (`track_of`): a copy of
    its own track, or of the track its budgets share, under spec's budget."""
    if track_of(spec) == spec.label():
        return fork(track)
    return with_budget(track, model, spec.name, **spec.args)


class MlxLmKVCache:
    """mlx-lm's KVCache on mlx-lm's qwen2 model, started from our full cache's
    keys and values (the same tensors its own prefill would hold)."""

    name, args = "mlx-lm KVCache", {}

    def __init__(self, twin):
        self.twin = twin

    def label(self):
        return self.name

    def start_from(self, full_cache, prompt):
        cache = []
        for full in full_cache:
            layer = KVCache()
            state = full.state
            layer.update_and_fetch(state["keys"], state["values"])
            cache.append(layer)
        self.twin(mx.array(prompt[full_cache[0].offset : -1])[None], cache=cache)
        mx.eval([c.state for c in cache])
        return cache


def window_starts(n_tokens: int, length: int, count: int):
    usable = n_tokens - START - length
    if usable < 0:
        raise SystemExit(f"text too short for a {length}-token window")
    return [START + (usable * i) // max(count - 1, 1) for i in range(count)]


def kept_path(directory: Path, text_name: str, first: int, upto) -> Path:
    """Where the full prefill of `text_name`'s window starting at token `first`
    through token `upto` is kept (`upto="*"`: the glob of every length kept)."""
    return Path(directory) / f"{text_name}-{first}-{upto}.safetensors"


def longest_kept_below(directory: Path, text_name: str, first: int, stop: int):
    """(length, path) of the longest kept prefill of this window that stops
    before `stop`, or None."""
    kept = []
    for path in directory.glob(kept_path(directory, text_name, first, "*").name):
        upto = int(path.stem.rsplit("-", 1)[1])
        if upto < stop:
            kept.append((upto, path))
    return max(kept, default=None)


def resume_full(model, directory, text_name: str, first: int, stop: int, beyond: int = 0):
    """(length, cache) of the longest full prefill kept in `directory` of the
    window of `text_name` starting at token `first` that stops at or before
    token `stop` and is longer than `beyond` tokens, or None."""
    kept = directory and longest_kept_below(Path(directory), text_name, first, stop + 1)
    if not kept or kept[0] <= beyond:
        return None
    return kept[0], load_cache(kept[1], model, policy="full")


def advance(model, cache, tokens, upto: int):
    """Prefill `cache` (at its offset) through tokens[:upto], in chunks."""
    chunk_times = []
    while cache[0].offset < upto:
        start = cache[0].offset
        end = min(start + PREFILL_STEP, upto)
        t0 = time.perf_counter()
        model(mx.array(tokens[start:end])[None], cache=cache)
        mx.eval([c.state for c in cache])
        chunk_times.append((end, time.perf_counter() - t0))
    return chunk_times


def entry_of(nll, decode_ms, cache):
    entry = {"nll": nll, "ppl": math.exp(nll), "decode_ms_per_token": decode_ms,
             "kv_bytes": sum(c.nbytes for c in cache)}
    stats = [c.stats() for c in cache if hasattr(c, "stats")]
    if stats and "full_steps" in stats[0]:
        # What a refresh schedule costs, whatever else shares the machine:
        # the share of layer-steps that read every key.
        full = sum(s["full_steps"] for s in stats)
        entry["full_step_share"] = full / max(1, full + sum(s["partial_steps"] for s in stats))
    return entry


def score_together(model, labelled, window, scored, alone, log):
    """{label: result} for each (label, cache) of `labelled`, every cache holding
    the window's prompt: each is timed alone on its first `alone` scored tokens,
    then all step through the rest in one batch (evaluate.window_nll_together)."""
    caches = [cache for _, cache in labelled]
    scores = window_nll_together(model, caches, window, scored, alone)
    results = {}
    for (label, cache), (nll, decode_ms) in zip(labelled, scores):
        results[label] = entry_of(nll, decode_ms, cache)
        timed = f"{decode_ms:.0f} ms/token" if decode_ms is not None else "not timed"
        log(f"  {label}: ppl {results[label]['ppl']:.3f}, {timed}, "
            f"kv {results[label]['kv_bytes'] / 2**20:.0f} MiB")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--lengths", default=None, help="comma-separated (default 8192)")
    parser.add_argument("--windows", type=int, default=None,
                        help="windows per text (default 1; --quick: one text, one window)")
    parser.add_argument("--ratios", default=None, help="comma-separated (default 1/16,1/8)")
    parser.add_argument("--policies", default=None,
                        help="comma-separated: only these (full and mlx-lm's KVCache always run)")
    parser.add_argument("--tradeoff", action="store_true",
                        help="also RefreshKV's trade-off curve (refresh strides, query "
                        "thresholds) at each ratio")
    parser.add_argument("--prefill-cache", default=None, metavar="DIR",
                        help="keep each shared full prefill here (~24 KiB per token) and "
                        "reuse it in later runs: settings can be added without paying "
                        "the prefill again")
    parser.add_argument("--only-window", type=int, default=None, metavar="N",
                        help="run only the Nth (from 0) of each text's --windows windows: add "
                        "a window to an earlier run (--windows 2 --only-window 1)")
    parser.add_argument("--texts", default=None,
                        help=f"comma-separated, of {', '.join(TEXTS)} (default: both; --quick: "
                        "coreutils)")
    parser.add_argument("--only-first", type=int, default=None, metavar="N",
                        help="score only the first N of each window's scored tokens (the "
                        "prompt, and so a kept prefill, stay the same): a timing run")
    parser.add_argument("--alone", type=int, default=ALONE, metavar="N",
                        help=f"scored tokens each policy is fed by itself, timed for its "
                        f"decode ms/token, before all step together (default {ALONE})")
    parser.add_argument("--defaults-only", action="store_true",
                        help="each policy with its default settings only (no RefreshKV "
                        "score-every-step point), and no mlx-lm KVCache beside full: the "
                        "scoring that fits a 32K run here")
    parser.add_argument("--name", default=None,
                        help="result file name (default long_context, long_context_quick)")
    args = parser.parse_args()
    quick = args.quick
    lengths = sorted(int(x) for x in (args.lengths or "8192").split(","))
    ratios = [float(Fraction(r)) for r in (args.ratios or ("1/8" if quick else "1/16,1/8")).split(",")]
    names = args.texts.split(",") if args.texts else ["coreutils"] if quick else list(TEXTS)
    texts = {name: TEXTS[name] for name in names}
    n_windows = args.windows or 1
    scored = QUICK_SCORED if quick else SCORED
    measured = min(args.only_first or scored, scored)
    log = lambda line: print(line, flush=True)  # noqa: E731

    model, tokenizer = load(MODEL)
    twin = mlx_lm_twin(model)
    reference = MlxLmKVCache(twin)
    specs = [PolicySpec("full")] + [s for r in ratios for s in specs_at(r, quick)]
    if not quick:
        specs += [PolicySpec(name, kw) for name, kw in UNBUDGETED.items()]
    if args.policies:
        specs = specs[:1] + [s for s in specs[1:] if s.name in args.policies.split(",")]
    if args.defaults_only:
        specs = [s for s in specs if set(s.args) <= {"budget_ratio", "kv_bits"}]
    references = [] if args.defaults_only else [reference]
    if args.tradeoff:
        specs += [s for r in ratios for s in tradeoff_at(r)]
    shared = [s for s in specs if continues_full_prefill(s)]
    own = [s for s in specs if not continues_full_prefill(s)]
    report = {"benchmark": "long_context", "model": model.source, "quick": quick,
              "lengths": lengths, "ratios": ratios, "scored": measured, "alone": args.alone,
              "policies": [s.label() for s in specs + references],
              "prefill": [], "checkpoints": []}
    started = time.perf_counter()
    for text_name, path in texts.items():
        tokens = tokenizer.encode(read_text(path), add_special_tokens=False)
        for w, first in enumerate(window_starts(len(tokens), lengths[-1], n_windows)):
            if args.only_window is not None and w != args.only_window:
                continue
            window = tokens[first : first + lengths[-1]]
            tracks = {"full": make_cache(model, "full")}
            for spec in own:
                tracks.setdefault(track_of(spec), spec.cache(model, lengths[-1]))
            for length in lengths:
                prompt_len = length - scored
                # The shared track stops FORK_TAIL short of each prompt's end,
                # where the policies continuing from it take over.
                stop = prompt_len - 1 - FORK_TAIL
                resumed = resume_full(model, args.prefill_cache, text_name, first, stop,
                                      beyond=tracks["full"][0].offset)
                if resumed:
                    tracks["full"] = resumed[1]
                    log(f"{text_name} window {w}: full prefill to {resumed[0]} tokens kept "
                        f"in {args.prefill_cache}")
                if tracks["full"][0].offset < stop:
                    t0, start = time.perf_counter(), tracks["full"][0].offset
                    chunks = advance(model, tracks["full"], window, stop)
                    report["prefill"].append({"text": text_name, "window": w, "from": start,
                                              "upto": stop,
                                              "seconds": time.perf_counter() - t0,
                                              "chunks": chunks})
                    log(f"{text_name} window {w}: full prefill to {stop} tokens "
                        f"({time.perf_counter() - t0:.0f} s)")
                    if args.prefill_cache:
                        kept = kept_path(args.prefill_cache, text_name, first, stop)
                        kept.parent.mkdir(parents=True, exist_ok=True)
                        save_cache(kept, tracks["full"], model)
                prompt, scored_window = window[:prompt_len], window[:prompt_len + measured]
                labelled = [(spec.label(), continue_from_full(model, spec, tracks["full"], prompt))
                            for spec in shared]
                for spec in own:
                    track = tracks[track_of(spec)]
                    if track[0].offset < prompt_len - 1:
                        t0 = time.perf_counter()
                        advance(model, track, window, prompt_len - 1)
                        log(f"  {track_of(spec)}: own prefill to {prompt_len - 1} "
                            f"({time.perf_counter() - t0:.0f} s)")
                    labelled.append((spec.label(), from_track(model, spec, track)))
                scores = score_together(model, labelled, scored_window, measured, args.alone, log)
                # mlx-lm's cache runs on mlx-lm's model, so it is scored by itself.
                for reference in references:
                    cache = reference.start_from(tracks["full"], prompt)
                    scores.update(score_together(twin, [(reference.label(), cache)],
                                                 scored_window, measured, args.alone, log))
                results = [{"label": spec.label(), "policy": spec.name, "args": spec.args,
                            **scores[spec.label()]} for spec in shared + references + own]
                full_ppl = results[0]["ppl"]
                for r in results:
                    r["ratio_to_full"] = r["ppl"] / full_ppl
                report["checkpoints"].append({"text": text_name, "window": w, "start": first,
                                              "context": length, "results": results})
                report["wall_seconds"] = time.perf_counter() - started
                write_result(args.name or ("long_context_quick" if quick else "long_context"),
                             report)


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
