"""Tables (markdown) and plots (PNG) from benchmarks/results/*.json, and the
results sections between their markers in the README and docs/*.md, so the
pages quote exactly what the scripts measured.

    python benchmarks/report.py
"""

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent.parent / "README.md"
DOCS = Path(__file__).parent.parent / "docs"


def replace_section(readme: str, name: str, body: str) -> str:
    """The README text between <!-- results:NAME --> and <!-- /results:NAME -->."""
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    if start not in readme:
        return readme
    return re.sub(re.escape(start) + ".*?" + re.escape(end),
                  lambda _: f"{start}\n{body}\n{end}", readme, flags=re.S)


def load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def where(result) -> str:
    if "provenance" not in result:  # written before provenance was recorded
        return f"_{result['device']}, MLX {result['mlx']}, this repository's CPU machine._"
    return f"_{setting(result['provenance'])}, {which_run(result)}._"


def setting(p) -> str:
    """Where a run was measured: device, machine, BLAS kernels, MLX and mlx-lm versions."""
    blas = f", OpenBLAS {p['openblas_core']} kernels" if p.get("openblas_core") else ""
    return f"{p['device']} on {p['machine']}{blas}, MLX {p['mlx']}, mlx-lm {p['mlx_lm']}"


def which_run(result) -> str:
    p = result["provenance"]
    how = f" (`{p['command']}`)" if "command" in p else " (--quick)" if result.get("quick") else ""
    return f"commit {p['commit']}, {p['date']}{how}"


def where_each(labelled) -> str:
    """Provenance of (label, result) runs merged into one table: the setting they share
    once, then each run's commit, date and command."""
    settings = {setting(r["provenance"]) for _, r in labelled if "provenance" in r}
    if len(settings) != 1 or any("provenance" not in r for _, r in labelled):
        return "; ".join(f"{label}{where(r)}" for label, r in labelled)
    return (f"_{settings.pop()}; "
            + "; ".join(f"{label}{which_run(r)}" for label, r in labelled) + "._")


def probe_note(result) -> str:
    probes = result.get("bandwidth_probes_gb_per_s")
    if not probes:
        return ""
    best = max(probes, key=probes.get)
    return (f" (the best of {len(probes)} STREAM-style probes: {best}; "
            f"lowest {min(probes.values()):.1f} GB/s)")


def model_name(result) -> str:
    name = result["model"].split("/")[-1].removesuffix(".gguf")
    return {"SmolLM2-135M-Instruct.Q4_1": "SmolLM2-135M",
            "qwen2.5-coder-0.5b-instruct-q4_k_m": "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M as "
                                                  "float32)"}.get(name, name)


def speed_table(result) -> str:
    forked = any(r.get("forked") for r in result["rows"])
    lines = [f"Decode and prefill on {model_name(result)}, budget = context/8 for the budgeted "
             f"caches; median over {result['repeats']} interleaved rounds of "
             f"{result['steps_per_repeat']} tokens (range in brackets). Roofline: the bytes a "
             f"decode step must move (weights {result['weight_bytes'] / 2**20:.0f} MiB + attended "
             f"KV) at the measured {result['bandwidth_gb_per_s']:.1f} GB/s{probe_note(result)}, "
             f"as a share of the measured step."
             + (" Forked (*): the cache continued one shared full prefill of the prompt "
                "(exact for these policies); its prefill tok/s is that prefill's, and its peak "
                "counts from the shared cache on." if forked else "")
             + f" {where(result)}", "",
             "| context | cache | decode ms/token | vs full | prefill tok/s | KV held MiB | "
             "peak +MiB | roofline |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    full = {r["context"]: r["decode_ms_per_token"] for r in result["rows"] if r["cache"] == "full"}
    for r in result["rows"]:
        ms = r["decode_ms_all"]
        lines.append(
            f"| {r['context']} | {r['cache']}{' (*)' if r.get('forked') else ''} | "
            f"{r['decode_ms_per_token']:.1f} "
            f"[{min(ms):.1f}-{max(ms):.1f}] | {r['decode_ms_per_token'] / full[r['context']]:.2f}x | "
            f"{r['prefill_tok_per_s']:.0f} | {r['kv_bytes'] / 2**20:.1f} | "
            f"{r['peak_memory_delta_bytes'] / 2**20:.0f} | {100 * r['roofline_fraction']:.0f}% |")
    return "\n".join(lines)


def crossover_table(result) -> str:
    """Per cache: the first measured context from which its decode step is
    faster than full's (and stays so), and its ratio to full at each context."""
    contexts = sorted({r["context"] for r in result["rows"]})
    full = {r["context"]: r["decode_ms_per_token"] for r in result["rows"] if r["cache"] == "full"}
    lines = [f"{model_name(result)}: a decode step's time as a share of full's at each context "
             f"(median of {result['repeats']} interleaved rounds of {result['steps_per_repeat']} "
             "tokens), budget = context/8 for the budgeted caches; 'faster than full from': "
             "the first context from which every measured one is below 1. "
             f"{where(result)}", "",
             "| cache | faster than full from | " + " | ".join(
                 f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts) + " |",
             "|---|---:|" + "---:|" * len(contexts)]
    for cache in dict.fromkeys(r["cache"] for r in result["rows"]):
        if cache == "full":
            continue
        ratios = {r["context"]: r["decode_ms_per_token"] / full[r["context"]]
                  for r in result["rows"] if r["cache"] == cache}
        faster = [c for c in contexts if all(ratios.get(d, 2) < 1 for d in contexts if d >= c)]
        lines.append(f"| {cache} | {faster[0] if faster else 'never here'} | "
                     + " | ".join(f"{ratios[c]:.2f}x" if c in ratios else "—" for c in contexts)
                     + " |")
    return "\n".join(lines)


def sparse_attention_table(result) -> str:
    ms = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    kernel = ("fused = the CUDA/Metal kernel" if result["fused_kernel"]
              else "no fused kernel on this device")
    lines = [f"One decode step of one layer, Llama-3.1-8B attention shape, {result['dtype']}; "
             f"median of {result['repeats']}; {kernel}. {where(result)}", "",
             "| context N | retained K | full ms | gather ms | fused ms | mlx-lm Rotating(K) ms "
             "| gather / full | fused / gather |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        fused = r.get("fused_ms")
        fused_ratio = "—" if fused is None else f"{fused / r['gather_ms']:.2f}"
        lines.append(
            f"| {r['context']} | {r['retained']} | {ms(r['full_ms'])} | {ms(r['gather_ms'])} | "
            f"{ms(fused)} | {ms(r['rotating_ms'])} | {r['gather_ms'] / r['full_ms']:.2f} | "
            f"{fused_ratio} |")
    return "\n".join(lines)


def quantized_decode_table(result) -> str:
    graph = result["primitives_per_decode_step"]
    counts = ", ".join(f"{label} {n}" for label, n in graph.items())
    shapes = "; ".join(f"{name}: {q} query heads, {kv} KV heads, head dim {d}"
                       for name, (q, kv, d) in result["shapes"].items())
    lines = [f"One layer's decode-step attention ({shapes}; group size "
             f"{result['group_size']}), median ms over {result['repeats']} runs. MLX primitives "
             f"in one decode step of one SmolLM2 layer (RoPE, append, attention): {counts}; one "
             f"small primitive costs {result['us_per_small_primitive']:.1f} us to build and run "
             f"here. {where(result)}", "",
             "| shape | rows | part | float32 rows (full) | packed 8-bit | packed 4-bit |",
             "|---|---:|---|---:|---:|---:|"]
    for row in result["parts_ms"]:
        exact, eight, four = row["float32"], row["8-bit"], row["4-bit"]
        softmax = exact["softmax"]  # the same softmax over the same logits for all three
        at = f"| {row['shape']} | {row['rows']}"
        for part in ("scores", "weighted_sum"):
            lines.append(f"{at} | {part.replace('_', ' ')} | {exact[part]:.3f} | "
                         f"{eight[part]:.3f} | {four[part]:.3f} |")
        lines.append(f"{at} | softmax | {softmax:.3f} | {softmax:.3f} | {softmax:.3f} |")
        total = lambda parts: parts["scores"] + softmax + parts["weighted_sum"]  # noqa: E731
        lines.append(f"{at} | **sum of the parts** | {total(exact):.3f} | "
                     f"{total(eight):.3f} | {total(four):.3f} |")
        lines.append(f"{at} | MLX fused attention | {exact['fused_sdpa']:.3f} | | |")
    return "\n".join(lines)


def label(result) -> str:
    return re.sub(r", min_budget=\d+", "", result["label"]).replace(
        "budget_ratio=0.0625", "L/16").replace(
        "budget_ratio=0.125", "L/8").replace("budget_ratio=0.25", "L/4")


def fidelity_tables(result) -> str:
    out = [where(result)]
    for task in result["tasks"]:
        if task["task"] == "ppl":
            windows = task["windows"]
            out += ["", f"**Perplexity**, last {task.get('score_last', 256)} of "
                    f"{task['context']}-token windows of the "
                    f"{task['text']} manual, scored one token at a time; {windows} window(s). "
                    "Ratio to full: lower is better; 1.00 is lossless"
                    + ("; per window: the lowest and highest ratio over the windows, the "
                       "spread one window cannot show." if windows > 1 else "."), "",
                    "| policy | ppl | ratio to full | per window | decode ms/token |",
                    "|---|---:|---:|---:|---:|"]
            full = task["results"][0]["per_window"]
            for r in task["results"]:
                ratios = [math.exp(w["nll"] - f["nll"]) for w, f in zip(r["per_window"], full)]
                spread = f"{min(ratios):.3f}-{max(ratios):.3f}" if len(ratios) > 1 else "—"
                out.append(f"| {label(r)} | {r['ppl']:.2f} | {r['ratio_to_full']:.3f} | "
                           f"{spread} | {r['decode_ms_per_token']:.1f} |")
        elif task["task"] == "needle":
            depths = sorted({w["depth"] for w in task["results"][0]["per_window"]})
            out += ["", f"**Needle** (passkey) in {task['context']} tokens of the {task['text']} "
                    f"manual at depths {', '.join(map(str, depths))}: exact-match accuracy.", "",
                    "| policy | accuracy |", "|---|---:|"]
            out += [f"| {label(r)} | {r['accuracy']:.2f} |" for r in task["results"]]
        else:
            out += ["", f"**Long-form agreement** with full on {task['context']}-token prompts "
                    f"from the {task['text']} manual (greedy).", "",
                    "| policy | token agreement | first divergence | ROUGE-L |",
                    "|---|---:|---:|---:|"]
            out += [f"| {label(r)} | {r['agreement']:.2f} | {r['first_divergence']:.0f} | "
                    f"{r['rouge_l']:.2f} |" for r in task["results"]]
    return "\n".join(out)


def streaming_table(runs) -> str:
    first = runs[0]
    lines = [f"SmolLM2 (trained context {first['context_length']}) fed "
             f"{first['tokens']} tokens of the coreutils manual one at a time under "
             f"`streaming` (budget {first['policy']['budget']}, 4 sinks): perplexity per "
             f"block of {first['blocks'][0]['to'] - first['blocks'][0]['from']} tokens. "
             f"{where(first)}", "",
             "| tokens | " + " | ".join(f"positions={r['policy']['positions']}" for r in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    for i, block in enumerate(first["blocks"]):
        cells = []
        for r in runs:
            own = r["blocks"][i] if i < len(r["blocks"]) else None
            partial = own and own["to"] != block["to"]
            cells.append("" if own is None else f"{own['ppl']:.2f}"
                         + (f" ({own['from']}-{own['to']})" if partial else ""))
        lines.append(f"| {block['from']}-{block['to']} | " + " | ".join(cells) + " |")
    lines.append("| last 256 of the run | " + " | ".join(
        f"{r['ppl_last_256']:.2f} (to token {r['tokens']})" for r in runs) + " |")
    return "\n".join(lines)


def gguf_load_table(result) -> str:
    r = result
    return "\n".join([
        f"{r['model']} ({', '.join(r['tensor_types'])}) read through llama.cpp's gguf "
        f"package; load time median of 3 warm loads. Kept quantized vs dequantized float32 "
        f"on a {r['prompt_tokens']}-token prompt of the coreutils manual, and "
        f"{r['greedy_tokens']} greedy tokens. {where(r)}", "",
        "| measure | value |", "|---|---:|",
        f"| load, dequantized to float32 (CPU default) | {r['load_s_dequantized_float32']:.1f} s |",
        f"| load, kept quantized (`--keep-quantized`) | {r['load_s_kept_quantized']:.1f} s |",
        f"| next-token KL divergence, mean / max | {r['mean_kl_nats']:.4f} / "
        f"{r['max_kl_nats']:.3f} nats |",
        f"| logit difference, mean / max | {r['mean_abs_logit_difference']:.3f} / "
        f"{r['max_abs_logit_difference']:.2f} |",
        f"| top-1 agreement over the prompt | {100 * r['top1_agreement']:.1f}% |",
        f"| greedy agreement, first divergence | {100 * r['greedy_agreement']:.0f}%, "
        f"token {r['greedy_first_divergence']} |"])


def growing_label(result) -> str:
    args = dict(result["args"])
    if "budget" in args:
        return (f"{result['policy']}, {args['budget']} tokens fixed (what 1/8 of the "
                f"prompt resolved to before)")
    args.pop("budget_ratio", None)
    args.pop("min_budget", None)
    extra = ", ".join(f"{k}={v}" for k, v in args.items())
    return f"{result['policy']}" + (f" ({extra})" if extra else "")


def growing_table(runs) -> str:
    """One row per setting (the swept text has more), one column pair per
    text: perplexity of the whole continuation (ratio to full) and the worst
    256-token block's ratio to full's same block."""
    first = runs[0]
    lines = [f"SmolLM2-135M: a {first['prompt_tokens']}-token prompt, then the next "
             f"{first['score_last']} tokens of the text scored one at a time (the context "
             f"grows from {first['prompt_tokens']} to {first['context']} tokens); budget "
             f"{first['ratio']:g} of the context so far, never below the floor (default "
             f"{first['default_min_budget']}); one window per text, {first['start']} tokens "
             f"in. Worst block: the highest ratio to full over the continuation's blocks of "
             f"{first['block']} tokens. {where(first)}", "",
             "| policy | floor | " + " | ".join(
                 f"{r['text']} ppl (vs full) | {r['text']} worst block" for r in runs) + " |",
             "|---|---:|" + "---:|---:|" * len(runs)]
    labels = list(dict.fromkeys(r["label"] for run in runs for r in run["results"]))
    rows = sorted(labels, key=lambda label: next(
        (r["policy"] != "full", r["policy"] != "refreshkv", r["policy"],
         r["args"].get("min_budget", -1), len(r["args"]))
        for run in runs for r in run["results"] if r["label"] == label))
    for label in rows:
        cells, row = [], None
        for run in runs:
            found = [r for r in run["results"] if r["label"] == label]
            if not found:
                cells.append("— | —")
                continue
            row, full = found[0], run["results"][0]
            worst = max(b / f for b, f in zip(row["block_ppl"], full["block_ppl"]))
            cells.append(f"{row['ppl']:.2f} ({row['ratio_to_full']:.3f}x) | {worst:.2f}x")
        floor = row["args"].get("min_budget", "—")
        lines.append(f"| {growing_label(row)} | {floor} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def long_label(row) -> str:
    args = dict(row["args"])
    ratio = args.pop("budget_ratio", None)
    name = row["policy"] + (f" L/{round(1 / ratio)}" if ratio else "")
    extra = ", ".join(f"{k}={v}" for k, v in args.items())
    return name + (f" ({extra})" if extra else "")


class ContextRow(NamedTuple):
    """One setting at one context, over the windows a (merged) run scored."""
    ratio: float  # perplexity ratio to full over all its windows
    per_window: list  # each window's ratio
    decode_ms: float  # mean decode ms/token
    kv_mib: float  # mean KV MiB held at the end
    texts: list  # the texts of its windows


def labels_in(run) -> set:
    """The settings a long-context run scored."""
    return {long_label(r) for point in run["checkpoints"] for r in point["results"]}


def long_context_rows(result):
    """{context: {label: ContextRow}}. A window scored under the same label by
    more than one merged run (full, beside each run's budgets) counts once."""
    out = {}
    for context in result["lengths"]:
        points = [c for c in result["checkpoints"] if c["context"] == context]
        if not points:
            continue
        by_label, seen = {}, set()
        for point in points:
            # Each run's ratios are to its own full: the prefills may differ in
            # the last bits (MLX's softmax then, numpy's now).
            full_nll = point["results"][0]["nll"]
            for r in point["results"]:
                label = long_label(r)
                scored = (point["text"], point["window"], point["start"], label)
                if scored not in seen:
                    seen.add(scored)
                    by_label.setdefault(label, []).append((r, full_nll, point["text"]))
        out[context] = {
            label: ContextRow(math.exp(sum(r["nll"] - f for r, f, _ in rows) / len(rows)),
                              [r["ratio_to_full"] for r, _, _ in rows],
                              sum(r["decode_ms_per_token"] for r, _, _ in rows) / len(rows),
                              sum(r["kv_bytes"] for r, _, _ in rows) / len(rows) / 2**20,
                              sorted({text for _, _, text in rows}))
            for label, rows in by_label.items()}
    return out


def long_context_table(result, timing=None, timing_note=None) -> str:
    """`timing`: a run from the same kept prefills with `--only-first`, on a
    quiet machine; its ms/token replace the scoring run's where it has them
    (`timing_note`: what the header says of them instead)."""
    rows = long_context_rows(result)
    timed = long_context_rows(timing) if timing else {}
    for context, labels in timed.items():
        for label, row in labels.items():
            if label in rows.get(context, {}):
                rows[context][label] = rows[context][label]._replace(decode_ms=row.decode_ms)
    contexts = list(rows)
    windows = sorted({(c["text"], c["window"]) for c in result["checkpoints"]})
    texts = sorted({t for t, _ in windows})
    # The first window whose prefill this run (or, merged, the first run) made.
    made = [(p["text"], p["window"]) for p in result["prefill"]][:1]
    prefill = ", ".join(
        f"{p['upto']} tokens in {p['seconds'] / 60:.0f} min"
        + (f" (going on from a kept prefill of {p['from']})" if p.get("from") else "")
        for p in result["prefill"] if made and (p["text"], p["window"]) == made[0]
    ) or "read from a prefill an earlier run kept (--prefill-cache), not timed here"
    lines = [f"Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, dequantized to float32): perplexity of the "
             f"last {result['scored']} tokens of each window, scored one token at a time, as a "
             f"ratio to full (over {len(windows)} window(s) from {', '.join(texts)}; per-window "
             f"range in brackets); decode ms/token measured on "
             + (f"the first {result['alone']} of those tokens, each policy alone (the rest "
                f"scored with every policy's cache as one row of a batch)" if result.get("alone")
                else "those tokens")
             + (timing_note if timing_note is not None else
                f" (for {', '.join(sorted({l for c in timed.values() for l in c}))}: on the "
                f"first {timing['scored']} of them, in a second run with nothing else on the "
                f"machine, {where(timing)})" if timed else "") + "; KV: what the "
             f"cache holds at the end. Prefill of the shared full track, one window: {prefill} "
             f"(SnapKV and RefreshKV continue from it, the other policies prefill their own). "
             f"{where(result)}", "",
             "| policy | " + " | ".join(f"{c // 1024}K ppl vs full | {c // 1024}K ms/token | "
                                      f"{c // 1024}K KV MiB" for c in contexts) + " |",
             "|---|" + "---:|---:|---:|" * len(contexts)]
    labels = list(dict.fromkeys(label for c in contexts for label in rows[c]))
    for label in labels:
        cells = []
        for c in contexts:
            if label not in rows[c]:
                cells.append("— | — | —")
                continue
            ratio, per_window, ms, kv, texts_of = rows[c][label]
            spread = (f" [{min(per_window):.2f}-{max(per_window):.2f}]"
                      if len(per_window) > 1 else "")
            if len(per_window) < len(windows):  # a policy a merged run added later
                spread += f" ({len(per_window)} of {len(windows)} windows: {', '.join(texts_of)})"
            cells.append(f"{ratio:.3f}{spread} | {ms:.0f} | {kv:.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def long_context_every_policy(result, *more, speed_from_first=False) -> str:
    """Every policy at its defaults over several windows: `more`, runs that
    added windows to `result` (other texts, `--only-window`), merged into it;
    a run not made yet (None) is left out. `speed_from_first`: ms/token from
    `result` alone, where the runs were made under different loads."""
    more = [m for m in more if m]
    first = result
    for added in more:
        result = {**result, "checkpoints": result["checkpoints"] + added["checkpoints"],
                  "prefill": result["prefill"] + added["prefill"]}
    if speed_from_first and more:
        windows = ", ".join(sorted({c["text"] for c in first["checkpoints"]}))
        timed = labels_in(first)
        # Policies only later runs have keep those runs' ms/token (their mean where
        # several added windows): name the fulls of those runs beside them.
        fulls_of = {}
        for added in more:
            labels = tuple(sorted(labels_in(added) - timed))
            if labels:
                fulls_of.setdefault(labels, []).extend(
                    f"{point['results'][0]['decode_ms_per_token']:.0f}"
                    for point in added["checkpoints"])
        later = "".join(f"; {', '.join(labels)}: from the run{'s' if len(fulls) > 1 else ''} "
                        f"that added them{' (mean)' if len(fulls) > 1 else ''}, where full "
                        f"took {' / '.join(fulls)} ms" for labels, fulls in fulls_of.items())
        table = long_context_table(result, first, f" (from the first run named alone, its "
                                   f"{windows} window{later}: each run's machine load was its "
                                   f"own)")
    else:
        table = long_context_table(result)
    if more:
        head, rest = table.split("\n", 1)
        table = f"{head} Windows added by: {where_each([('', m) for m in more])}\n{rest}"
    return table


def multi_turn_table(result) -> str:
    full = result["results"][0]
    reread = full.get("reread_ttft_s", {})
    carried = {int(t): full["turns"][int(t)]["ttft_s"] for t in reread}
    speedups = ", ".join(f"turn {int(t) + 1}: {v:.1f} s re-reading vs {carried[int(t)]:.2f} s "
                         f"carried" for t, v in reread.items())
    lines = [f"{result['model'].split('/')[-1]}: a {result['document_tokens']}-token stretch of "
             f"the {result['text']} manual with five facts planted at depths 0.1-0.9, asked one "
             f"per turn (not in document order), then one open question (ROUGE-L against "
             f"full's answer); budget L/8. Time to first token for full, re-reading the whole "
             f"conversation against the carried cache: {speedups}. {where(result)}"
             + (f" {', '.join(result['added_to']['policies'])}: "
                f"{where(dict(result['added_to']))}" if "added_to" in result else ""), "",
             "| policy | accuracy | per turn (depth: hit) | mean TTFT s | open ROUGE-L | KV MiB "
             "| session MiB | save s | load s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        turns = " ".join(f"{t['depth']}:{'y' if t['correct'] else 'n'}" for t in r["turns"])
        ttft = sum(t["ttft_s"] for t in r["turns"]) / len(r["turns"])
        lines.append(f"| {r['policy']} | {r['accuracy']:.1f} | {turns} | {ttft:.2f} | "
                     f"{r['open_rouge_l']:.2f} | {r['kv_bytes'] / 2**20:.1f} | "
                     f"{r['session_bytes'] / 2**20:.1f} | {r['save_s']:.2f} | {r['load_s']:.2f} |")
    return "\n".join(lines)


def tradeoff_rows(result, timing):
    """[(label, ppl ratio, quiet ms/token or None, full-step share or None)]."""
    context = result["lengths"][0]
    quality = long_context_rows(result)[context]
    timed = {}
    if timing:
        for point in timing["checkpoints"]:
            for r in point["results"]:
                timed[long_label(r)] = r
    return [(name, row.ratio, timed.get(name, {}).get("decode_ms_per_token"),
             timed.get(name, {}).get("full_step_share"))
            for name, row in quality.items()]


def tradeoff_table(result, timing=None) -> str:
    context = result["lengths"][0]
    lines = [f"RefreshKV's settings at {context // 1024}K tokens on Qwen2.5-Coder-0.5B "
             f"(Q4_K_M as float32), budget L/8, one coreutils window: perplexity of "
             f"{result['scored']} tokens scored one at a time, as a ratio to full's; decode "
             f"ms/token from a separate run with nothing else on the machine"
             + (f" ({timing['scored']} tokens from the same kept prefill)" if timing else "")
             + "; full-step share: the layer-steps that read every key (the rest attend to "
             f"the retained set only). {where(result)}", "",
             "| setting | ppl vs full | ms/token | full-step share |", "|---|---:|---:|---:|"]
    for name, ratio, ms, share in tradeoff_rows(result, timing):
        if name == "refreshkv L/8":  # the run predates the defaults it justified
            name += " (the defaults then: qc=5, threshold=0.85)"
        lines.append(f"| {name} | {ratio:.3f} | {'—' if ms is None else f'{ms:.0f}'} | "
                     f"{'—' if share is None else f'{share:.2f}'} |")
    return "\n".join(lines)


def server_ttft_table(result) -> str:
    reuse, fresh = result["runs"]["reuse"], result["runs"]["no reuse"]
    lines = [f"{result['model']} through `python -m mlx_kvcache.server`: a "
             f"{result['document_words']}-word stretch of the gettext manual and a question, "
             f"then {len(reuse) - 1} follow-up questions, each request carrying the whole "
             f"conversation (as OpenAI clients do); time to the first streamed token, with "
             f"prompt-cache reuse and with `--prompt-cache-bytes 0`. {where(result)}", "",
             "| turn | prompt tokens | read (reuse) | TTFT reuse s | TTFT no reuse s | speed-up |",
             "|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(reuse, fresh):
        lines.append(f"| {a['turn']} | {a['prompt_tokens']} | "
                     f"{a['prompt_tokens'] - a['cached_tokens']} | {a['ttft_s']:.2f} | "
                     f"{b['ttft_s']:.2f} | {b['ttft_s'] / a['ttft_s']:.1f}x |")
    return "\n".join(lines)


def offload_limits(entry) -> dict:
    """({budget: the disk's limit in ms/token}, the GB/s it assumes: the higher
    of the sequential read of the layout and the fastest rate a run read its
    units at)."""
    bandwidth = max([entry["disk_read_gbs"]] + [r["read_gbs"] for r in entry["runs"]
                                                if r.get("read_gbs")])
    return {r["budget"]: r["streamed_bytes_per_pass"] / (bandwidth * 1e9) * 1e3
            for r in entry["runs"] if r["budget"] != "resident"}, bandwidth


def offload_prepare_table(result) -> str:
    lines = [f"Writing the offload layout once, each way in a fresh process: streamed from the "
             f"GGUF tensor by tensor (what `prepare` does), and the model loaded whole, then "
             f"written (what it did before). Peak RSS includes the interpreter with MLX and "
             f"numpy imported (the baseline column). {where(result)}", "",
             "| model | GGUF MiB | layout MiB (float32) | largest unit MiB | way | seconds "
             "| peak RSS MiB | baseline RSS MiB |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['model']} | {r['source_bytes'] / 2**20:.0f} | "
                     f"{r['layout_bytes'] / 2**20:.0f} | {r['largest_unit_bytes'] / 2**20:.0f} | "
                     f"{r['how']} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | "
                     f"{r['baseline_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def offload_table(result) -> str:
    lines = [f"Exact weight offloading (`--offload layers`): greedy decoding of "
             f"{result['decode_tokens']} tokens after a chat prompt, each configuration in a "
             f"fresh process with the layout dropped from the page cache before it and after "
             f"every unit read. Limit: the bytes the budget leaves out per token over the "
             f"disk's read bandwidth (the higher of a sequential read of the same file and the "
             f"fastest rate a run achieved reading its units); floor: the larger "
             f"of the limit and the resident model's own ms/token (reading can at best hide "
             f"behind the compute). {where(result)}"
             + (f" Exact-mode rows kept from {where({'provenance': result['exact_mode_from']})}"
                if "exact_mode_from" in result else ""), ""]
    for entry in result["models"]:
        compute = entry["runs"][0]["decode_ms_per_token"]  # the resident run
        limits, bandwidth = offload_limits(entry)
        lines += [f"**{entry['model']}**: layout {entry['layout_bytes'] / 2**20:.0f} MiB (float32),"
                  f" disk read {entry['disk_read_gbs']:.2f} GB/s sequential, {bandwidth:.2f} "
                  f"GB/s the limit's.", "",
                  "| weights | ms/token | MiB read/token | read GB/s | limit ms/token "
                  "| vs limit | vs floor | peak RSS MiB | MLX peak MiB | tokens as resident |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for run in entry["runs"]:
            if run["budget"] == "resident":
                lines.append(f"| resident | {run['decode_ms_per_token']:.0f} | 0 | — | — | — | — | "
                             f"{run['peak_rss_bytes'] / 2**20:.0f} | "
                             f"{run['peak_mlx_bytes'] / 2**20:.0f} | — |")
                continue
            name = ("naive (all re-read)" if run["budget"] == "naive"
                    else f"budget {run['budget']}")
            gbs = f"{run['read_gbs']:.2f}" if run.get("read_gbs") else "—"
            limit = limits[run["budget"]]
            lines.append(
                f"| {name} | {run['decode_ms_per_token']:.0f} | "
                f"{run['bytes_read_per_token'] / 2**20:.0f} | {gbs} | "
                f"{limit:.0f} | {run['decode_ms_per_token'] / limit:.2f}x | "
                f"{run['decode_ms_per_token'] / max(limit, compute):.2f}x | "
                f"{run['peak_rss_bytes'] / 2**20:.0f} | {run['peak_mlx_bytes'] / 2**20:.0f} | "
                f"{'yes' if run['identical_to_resident'] else 'NO'} |")
        lines.append("")
        if entry.get("neuron_runs"):
            lines += neurons_rows(entry, bandwidth, compute)
    return "\n".join(lines).rstrip()


def neurons_rows(entry, bandwidth: float, compute: float) -> list:
    exact = {r["budget"]: r["bytes_read_per_token"] for r in entry["runs"]
             if r["budget"].endswith("%")}
    lines = [f"Neurons mode (`--offload neurons`), FFN sparsity {entry['ffn_sparsity']} "
             f"(thresholds calibrated on Python's documentation); perplexity on "
             f"{entry['ppl_tokens']} tokens of {Path(entry['ppl_text']).name}: dense "
             f"{entry['dense_ppl']:.2f}, neurons mode {entry['neurons_ppl']:.2f} "
             f"({100 * (entry['ppl_ratio'] - 1):+.1f}%). Limit: the bytes it did read over "
             f"{bandwidth:.2f} GB/s.", "",
             "| weights | neuron window | ms/token | MiB read/token | bytes vs exact mode "
             "| limit ms/token | vs limit | vs floor | peak RSS MiB | MLX peak MiB "
             "| tokens as resident |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for run in entry["neuron_runs"]:
        limit = run["limit_ms_per_token"]
        lines.append(
            f"| budget {run['budget']} | {run['window']} | {run['decode_ms_per_token']:.0f} | "
            f"{run['bytes_read_per_token'] / 2**20:.0f} | "
            f"{run['bytes_read_per_token'] / exact[run['budget']]:.2f} | {limit:.0f} | "
            f"{run['decode_ms_per_token'] / limit:.2f}x | "
            f"{run['decode_ms_per_token'] / max(limit, compute):.2f}x | "
            f"{run['peak_rss_bytes'] / 2**20:.0f} | {run['peak_mlx_bytes'] / 2**20:.0f} | "
            f"{'yes' if run['identical_to_resident'] else 'no'} |")
    return lines + [""]


def ffn_sparsity_table(result) -> str:
    windows = [w["window"] for w in result["models"][0]["rows"][0]["windows"]]
    lines = ["FFN activation sparsity (CATS-style per-layer thresholds on |silu(gate)|, "
             "calibrated on 512 tokens of coreutils, perplexity scored on gettext, every "
             "token thresholded). Bytes: what a neuron reader would fetch per token and layer "
             "(attention + the whole gate projection + up row and down column of each neuron "
             "not used by the last W tokens), as a share of the layer's bytes, which exact mode "
             f"reads whole. {where(result)}", ""]
    for entry in result["models"]:
        floor = (entry["attention_bytes"] + entry["gate_bytes"]) / entry["layer_bytes"]
        lines += [f"**{entry['model']}**: dense perplexity {entry['dense_ppl']:.2f} over "
                  f"{entry['scored_tokens']} tokens; attention + gate are {floor:.0%} of a "
                  f"layer's bytes, the least a token can read with them streamed.", "",
                  "| sparsity (achieved) | ppl vs dense | "
                  + " | ".join(f"bytes vs exact, W={w}" for w in windows)
                  + " | up/down read, W=0 | resident neurons MiB, W=4 |",
                  "|---|---:|" + "---:|" * len(windows) + "---:|---:|"]
        for row in entry["rows"]:
            by_window = {w["window"]: w for w in row["windows"]}
            lines.append(
                f"| {row['sparsity']:.1f} ({row['achieved_sparsity']:.2f}) | "
                f"{row['ppl_ratio']:.3f} | "
                + " | ".join(f"{by_window[w]['vs_exact']:.2f}" for w in windows)
                + f" | {by_window[0]['up_down_read_share']:.2f} | "
                f"{by_window.get(4, by_window[windows[-1]])['resident_bytes'] / 2**20:.0f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def distributed_table(result) -> str:
    lines = [f"{result['model']} sharded over the ring backend, ranks as local processes on "
             f"this 2-core machine (they share it: no speed-up is possible here), "
             f"{result['context']} prompt tokens then {result['decode_tokens']} decoded; "
             f"per rank: KV bytes and MLX peak memory (weights included; the embedding table is "
             f"not sharded); collectives: the model's two all-sums per layer of one token, timed "
             f"alone. {where(result)}", "",
             "| policy | ranks | decode ms/token | collectives ms/token | KV MiB per rank | "
             "peak MiB per rank |", "|---|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        collectives = run.get("collectives_ms_per_token")
        lines.append(f"| {run['policy']} | {run['ranks']} | {run['decode_ms_per_token']:.0f} | "
                     f"{'—' if collectives is None else f'{collectives:.1f}'} | "
                     f"{run['kv_bytes'] / 2**20:.1f} | {run['peak_mlx_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def long_generation_table(result, *more) -> str:
    """Per policy and context: needle hits (and which depths missed), long-form
    agreement with full; `more`: runs of other settings (their own provenance)
    merged into the same table."""
    results = [result, *(r for r in more if r)]
    runs = [run for r in results for run in r["runs"]]
    columns = sorted({(r["task"], r["context"]) for r in runs}, key=lambda c: (c[0] != "needle", c[1]))
    labels = list(dict.fromkeys(long_label(e) for r in runs for e in r["results"]))
    texts = sorted({r["text"] for r in runs})
    header = []
    for task, context in columns:
        # A 32K needle prompt stops 8 tokens short, so the key fits the context.
        header.append(f"{round(context / 1024)}K needle" if task == "needle"
                      else f"{round(context / 1024)}K long-form agreement / ROUGE-L")
    tasks = {task for task, _ in columns}
    described = []
    if "needle" in tasks:
        depths = sorted({str(r["depth"]) for r in runs if r["depth"] is not None})
        described.append(
            f"needle, a pass key at depths {', '.join(depths)} of each haystack "
            f"({', '.join(texts)}), found in {result['needle_tokens']} greedy tokens (the "
            "misses in brackets, by the haystack's initial and the depth)")
    if "longform" in tasks:
        described.append(f"long-form, {result['max_tokens']} greedy tokens after a window of "
                         "each text, the share equal to full's and ROUGE-L against them")
    provenance = where(result)
    if len(results) > 1:
        def contexts(r):
            return ", ".join(sorted({f"{round(run['context'] / 1024)}K {run['task']}"
                                     for run in r["runs"]}))
        provenance = where_each([(f"{contexts(r)}: ", r) for r in results])
    lines = [f"{result['model'].split('/')[-1]}: {'; '.join(described)}. Full, SnapKV and "
             "RefreshKV continue one full prefill of each prompt; the others prefill their "
             f"own. {provenance}", "",
             "| policy | " + " | ".join(header) + " |",
             "|---|" + "---:|" * len(columns)]
    for label in labels:
        cells = []
        for task, context in columns:
            entries = [(r, e) for r in runs if (r["task"], r["context"]) == (task, context)
                       for e in r["results"] if long_label(e) == label]
            if not entries:
                cells.append("—")
            elif task == "needle":
                missed = sorted({f"{r['text'][0]}{r['depth']}" for r, e in entries
                                 if not e["correct"]})
                hits = sum(e["correct"] for _, e in entries)
                cells.append(f"{hits}/{len(entries)}" + (f" ({' '.join(missed)})" if missed else ""))
            else:
                agreement = sum(e["agreement"] for _, e in entries) / len(entries)
                rouge = sum(e["rouge_l"] for _, e in entries) / len(entries)
                cells.append(f"{agreement:.2f} / {rouge:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_attention_table(result) -> str:
    paths = ("mlx one op", "cpu streams", "numpy softmax")
    lines = [f"{result['model'].split('/')[-1]} prefill of the coreutils manual, the whole "
             f"cache (`full`), best of {result['repeats']}: attention as MLX's one op on one "
             "thread, split by KV heads over one CPU stream per core, and with numpy's "
             "softmax (the default for float32). Exponentials per second on one core: "
             f"`mx.exp` {result['mx_exp_per_s'] / 1e6:.0f} M, MLX's softmax "
             f"{result['mx_softmax_per_s'] / 1e6:.0f} M, numpy's `exp` "
             f"{result['numpy_exp_per_s'] / 1e6:.0f} M. {where(result)}", "",
             "| prompt tokens | " + " | ".join(f"{p} s" for p in paths)
             + " | numpy vs one op |", "|---:|---:|---:|---:|---:|"]
    for row in result["prefill"]:
        lines.append(f"| {row['tokens']} | " + " | ".join(f"{row[p]:.1f}" for p in paths)
                     + f" | {row['mlx one op'] / row['numpy softmax']:.1f}x |")
    return "\n".join(lines)


def h2o_prefill_table(result) -> str:
    with_mixed = "mixed" in result["prefill"][0]  # runs before mixed precision's paths lack it
    lines = [f"{result['model'].split('/')[-1]} prefill of the coreutils manual, best of "
             f"{result['repeats']}: the whole cache (`full`), and H2O with its scores taken "
             "from the attention's own exponentials (one pass, the default on the CPU) or "
             f"scored again over every key (two passes, the path elsewhere)"
             + ("; mixed precision (L/8, 4-bit rest), its scores summed block by block by "
                "numpy or handed to MLX to sum" if with_mixed else "")
             + f". {where(result)}",
             "", "| prompt tokens | full s | h2o one pass s | h2o two passes s "
             "| two passes vs one | one pass vs full |", "|---:|---:|---:|---:|---:|---:|"]
    for row in result["prefill"]:
        one, two, full = row["h2o one pass"], row["h2o two passes"], row["full"]
        lines.append(f"| {row['tokens']} | {full:.1f} | {one:.1f} | {two:.1f} | "
                     f"{two / one:.2f}x | {one / full:.2f}x |")
    if not with_mixed:
        return "\n".join(lines)
    lines += ["", "| prompt tokens | mixed, numpy's sums s | mixed, MLX's sums s "
              "| MLX's vs numpy's | numpy's vs full |", "|---:|---:|---:|---:|---:|"]
    for row in result["prefill"]:
        numpy_sums, mlx_sums = row["mixed"], row["mixed, sums by MLX"]
        lines.append(f"| {row['tokens']} | {numpy_sums:.1f} | {mlx_sums:.1f} | "
                     f"{mlx_sums / numpy_sums:.2f}x | {numpy_sums / row['full']:.2f}x |")
    return "\n".join(lines)


def save_plot(fig, ax, name, *, xlabel, ylabel, title, legend=True) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=120)
    return name


def plots(speed, fidelity, growing, long_context=None, tradeoff=None, timing=None,
          multi_turn=None, offload=None, ffn_sparsity=None, speed_qwen=None) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if speed:
        fig, ax = plt.subplots(figsize=(8, 5))
        caches = list(dict.fromkeys(r["cache"] for r in speed["rows"]))
        for cache in caches:
            rows = [r for r in speed["rows"] if r["cache"] == cache]
            ax.plot([r["context"] for r in rows], [r["decode_ms_per_token"] for r in rows],
                    marker="o", label=cache)
        made.append(save_plot(fig, ax, "speed.png", xlabel="context (tokens)",
                              ylabel="decode ms/token",
                              title=f"SmolLM2-135M decode, {speed['provenance']['device']}"))
    if speed_qwen:
        fig, ax = plt.subplots(figsize=(10, 5.5))
        rows = speed_qwen["rows"]
        full = {r["context"]: r["decode_ms_per_token"] for r in rows if r["cache"] == "full"}
        caches = [c for c in dict.fromkeys(r["cache"] for r in rows) if c != "full"]
        colors = plt.get_cmap("tab20").colors
        for i, cache in enumerate(caches):
            mine = [r for r in rows if r["cache"] == cache]
            ax.plot([r["context"] for r in mine],
                    [r["decode_ms_per_token"] / full[r["context"]] for r in mine],
                    marker="o", label=cache, color=colors[i % len(colors)],
                    linestyle="--" if "mlx-lm" in cache else "-")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(full), [f"{c // 1024}K" for c in sorted(full)])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode ms/token / full's (below 1: faster than full)")
        ax.set_title(f"{model_name(speed_qwen)} decode against full, "
                     f"{speed_qwen['provenance']['device']}")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(RESULTS / "speed_qwen.png", dpi=120)
        made.append("speed_qwen.png")
    if fidelity:
        ppl = next(t for t in fidelity["tasks"] if t["task"] == "ppl")
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in ppl["results"]:
            if r["policy"] != "full" and r["args"].get("budget_ratio") != 0.125:
                continue
            color = "tab:blue" if r["policy"] == "refreshkv" else (
                "black" if r["policy"] == "full" else "tab:red")
            ax.scatter(r["decode_ms_per_token"], r["ratio_to_full"], color=color)
            ax.annotate(label(r).replace("refreshkv", "R").replace(", L/8", ""),
                        (r["decode_ms_per_token"], r["ratio_to_full"]), fontsize=6)
        made.append(save_plot(
            fig, ax, "tradeoff.png", xlabel="decode ms/token (measured on the scored tokens)",
            ylabel="perplexity / full", legend=False,
            title="RefreshKV settings (blue) vs other policies (red), budget L/8"))
    if growing:
        # The swept text: every floor of RefreshKV and streaming, and H2O.
        run = next((r for r in growing if r.get("swept")), growing[0])
        full = run["results"][0]["block_ppl"]
        ends = [run["prompt_tokens"] + run["block"] * (i + 1) for i in range(len(full))]
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in run["results"][1:]:
            if r["policy"] not in ("refreshkv", "streaming", "h2o") or "refresh" in r["args"]:
                continue
            floor = r["args"].get("min_budget")
            name = f"{r['policy']} floor {floor}" if floor is not None else growing_label(r)
            ax.plot(ends, [b / f for b, f in zip(r["block_ppl"], full)], marker="o",
                    label=name, linestyle="-" if r["policy"] == "refreshkv" else "--")
        ax.set_yscale("log")
        made.append(save_plot(fig, ax, "growing_context.png",
                              xlabel="context at the end of the block (tokens)",
                              ylabel="block perplexity / full's",
                              title=f"A short prompt whose context grows ({run['text']})"))
    if long_context:
        # Where a policy's decode step becomes cheaper than full's: its ms/token
        # over full's, against the context.
        rows = long_context_rows(long_context)
        contexts = list(rows)
        fig, ax = plt.subplots(figsize=(8, 5))
        for policy in dict.fromkeys(name for c in contexts for name in rows[c]):
            if policy == "full":
                continue
            points = [(c, rows[c][policy].decode_ms / rows[c]["full"].decode_ms) for c in contexts
                      if policy in rows[c]]
            ax.plot([c for c, _ in points], [r for _, r in points], marker="o", label=policy)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        made.append(save_plot(fig, ax, "long_context_speed.png", xlabel="context (tokens)",
                              ylabel="decode ms/token / full's",
                              title="Below 1: the policy's decode step is cheaper than full's"))
    if offload:
        # ms/token against the budget, beside the limit and the resident model.
        fig, ax = plt.subplots(figsize=(8, 5))
        for k, entry in enumerate(offload["models"]):
            color = f"C{k}"
            runs = [r for r in entry["runs"] if r["budget"].endswith("%")]
            shares = [float(r["budget"][:-1]) for r in runs]
            ax.plot(shares, [r["decode_ms_per_token"] for r in runs], marker="o", color=color,
                    label=f"{entry['model']}, exact mode")
            limits, _ = offload_limits(entry)
            ax.plot(shares, [limits[r["budget"]] for r in runs], linestyle=":",
                    color=color, label=f"{entry['model']}, the disk's limit")
            ax.axhline(entry["runs"][0]["decode_ms_per_token"], color=color, linewidth=0.8,
                       linestyle="--", label=f"{entry['model']}, resident")
            neurons = [r for r in entry.get("neuron_runs", []) if r["window"] == 0]
            if neurons:
                ax.plot([float(r["budget"][:-1]) for r in neurons],
                        [r["decode_ms_per_token"] for r in neurons], marker="s",
                        linestyle="-.", color=color, label=f"{entry['model']}, neurons mode")
            naive = next(r for r in entry["runs"] if r["budget"] == "naive")
            ax.scatter([0], [naive["decode_ms_per_token"]], marker="x", color=color,
                       label=f"{entry['model']}, naive (all re-read)")
        ax.set_yscale("log")
        made.append(save_plot(fig, ax, "offload.png", xlabel="weights budget (% of weight bytes)",
                              ylabel="decode ms/token",
                              title="Weight offloading, the page cache dropped"))
    if ffn_sparsity:
        # Quality against what a token reads: one curve per window.
        fig, ax = plt.subplots(figsize=(8, 5))
        for k, entry in enumerate(ffn_sparsity["models"]):
            for window, style in ((0, "-"), (4, "--")):
                points = [(w["vs_exact"], row["ppl_ratio"]) for row in entry["rows"]
                          for w in row["windows"] if w["window"] == window]
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        linestyle=style, color=f"C{k}", label=f"{entry['model']}, W={window}")
        ax.axhline(1.03, color="black", linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
        made.append(save_plot(fig, ax, "ffn_sparsity.png",
                              xlabel="bytes read per token and layer / exact mode's",
                              ylabel="perplexity / dense (dotted: +3%)",
                              title="FFN sparsity: quality against bytes read"))
    if multi_turn:
        # Per turn: which policies still find the fact, and what the turn waits
        # for its first token, beside full re-reading the whole conversation.
        fig, ax = plt.subplots(figsize=(8, 5))
        results = multi_turn["results"]
        for k, r in enumerate(results):
            turns = range(1, len(r["turns"]) + 1)
            ax.plot(turns, [t["ttft_s"] for t in r["turns"]], marker="o", label=r["policy"])
            for i, t in enumerate(r["turns"]):
                ax.annotate("y" if t["correct"] else "n", (i + 1, t["ttft_s"]),
                            xytext=(4, 4 - 10 * (k % 2)), textcoords="offset points",
                            fontsize=7)
        reread = results[0].get("reread_ttft_s", {})
        if reread:
            ax.scatter([int(t) + 1 for t in reread], list(reread.values()), marker="x",
                       color="black", label="full, re-reading the conversation")
        ax.set_yscale("log")
        ax.set_xticks(range(1, len(results[0]["turns"]) + 1))
        made.append(save_plot(
            fig, ax, "multi_turn.png", xlabel="turn (y/n: the planted fact was found)",
            ylabel="time to first token (s)",
            title=f"Chat over a {multi_turn['document_tokens']}-token document, "
                  f"{multi_turn['model'].split('/')[-1]}"))
    if tradeoff:
        # RefreshKV's settings at one context: quality against cost.
        context = tradeoff["lengths"][0]
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, ratio, ms, _ in tradeoff_rows(tradeoff, timing):
            if ms is None:
                continue
            color = ("black" if name in ("full", "mlx-lm KVCache") else
                     "tab:blue" if name.startswith("refreshkv") else "tab:red")
            ax.scatter(ms, ratio, color=color)
            if name == "refreshkv L/8":
                name += " (old defaults)"
            ax.annotate(name.replace("refreshkv", "R").replace("refresh=", "")
                        .replace("refresh_every=", "every ").replace("refresh_mode=", ""),
                        (ms, ratio), fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        made.append(save_plot(
            fig, ax, "long_context_tradeoff.png", xlabel="decode ms/token (a quiet run)",
            ylabel="perplexity / full", legend=False,
            title=f"RefreshKV's settings at {context // 1024}K tokens on Qwen2.5-Coder-0.5B"))
    return made


# The runs merged into long_generation's table after its first, in the order
# they landed: a row keeps the place of the run that first had it.
LONG_GENERATION_MORE = (
    "long_generation_20k",
    "long_generation_longform_8k",
    "long_generation_longform_8k_gettext",
    "long_generation_needle_16k",
    "long_generation_longform_16k",
    "long_generation_needle_8k_quantized",
    "long_generation_needle_16k_streaming",
    "long_generation_needle_32k",
    "long_generation_longform_32k",
    "long_generation_needle_16k_kivi",
    "long_generation_needle_16k_kivi_gettext",
    "long_generation_needle_16k_mixed",
    "long_generation_needle_32k_depths",
    "long_generation_needle_16k_quantized",
    "long_generation_needle_8k_l16",
    "long_generation_needle_16k_quantized_gettext",
    "long_generation_needle_32k_l16",
    "long_generation_needle_16k_streaming_l16",
    "long_generation_needle_16k_h2o",
    "long_generation_needle_32k_streaming",
    "long_generation_needle_32k_streaming_l16",
    "long_generation_longform_32k_mixed",
    "long_generation_longform_32k_kivi",
    "long_generation_longform_32k_quantized",
    "long_generation_longform_32k_h2o",
    "long_generation_needle_16k_mixed_l16",
    "long_generation_needle_16k_mixed_l16_gettext",
    "long_generation_needle_32k_kivi",
    "long_generation_needle_32k_kivi_gettext",
    "long_generation_needle_32k_quantized",
    "long_generation_needle_32k_quantized_gettext",
    "long_generation_needle_32k_h2o_coreutils_shallow",
    "long_generation_needle_32k_h2o_coreutils_deep",
    "long_generation_needle_32k_h2o_gettext_shallow",
    "long_generation_needle_32k_h2o_gettext_deep",
    "long_generation_needle_32k_mixed",
    "long_generation_needle_32k_mixed_gettext",
    "long_generation_needle_32k_mixed_l16",
    "long_generation_needle_32k_mixed_l16_gettext",
)


# Section <- (result file, its table, what follows the table there)
TABLES = {
    **{f"sparse_attention_{backend}": (f"sparse_attention_{backend}", sparse_attention_table, "")
       for backend in ("cpu", "cuda", "metal")},
    "speed": ("speed_cpu", speed_table, "\n\n![decode ms/token]({results}/speed.png)"),
    "speed_quantized": ("speed_quantized_cpu", speed_table, ""),
    "speed_qwen_crossover": ("speed_qwen_cpu", crossover_table,
                             "\n\n![decode against full]({results}/speed_qwen.png)"),
    # After the crossover: speed_qwen_cpu.md holds both tables.
    "speed_qwen": ("speed_qwen_cpu", lambda r: speed_table(r) + "\n\n" + crossover_table(r), ""),
    "quantized_decode_cpu": ("quantized_decode_cpu", quantized_decode_table, ""),
    "fidelity": ("fidelity", fidelity_tables, "\n\n![trade-off]({results}/tradeoff.png)"),
    "fidelity_quantized": ("fidelity_quantized", fidelity_tables, ""),
    "gguf_load": ("gguf_load", gguf_load_table, ""),
    "long_context": ("long_context", long_context_table,
                     "\n\n![decode vs full]({results}/long_context_speed.png)"),
    "long_context_quick": ("long_context_quick", long_context_table, ""),
    "long_context_32k": ("long_context_32k",
                         lambda r: long_context_table(r, load("long_context_32k_timing")), ""),
    "long_context_32k_l16": ("long_context_32k_l16", long_context_table, ""),
    # The later 32K runs, one a window and kind of prefill: the policies that
    # continue the shared prefill, then those that read the window themselves.
    **{name: (name, long_context_table, "")
       for name in ("long_context_32k_gettext_more", "long_context_32k_coreutils_more",
                    "long_context_32k_coreutils_w1", "long_context_32k_coreutils_w1_more")},
    "long_context_32k_windows": ("long_context_32k_gettext",
                                 lambda r: long_context_every_policy(
                                     r, load("long_context_32k_l16"), load("long_context_32k"),
                                     load("long_context_32k_gettext_more"),
                                     load("long_context_32k_coreutils_more"),
                                     load("long_context_32k_coreutils_w1"),
                                     load("long_context_32k_coreutils_w1_more"),
                                     speed_from_first=True), ""),
    "long_context_8k": ("long_context_8k",
                        lambda r: long_context_every_policy(r, load("long_context_8k_more")), ""),
    "long_context_16k": ("long_context_16k",
                         lambda r: long_context_every_policy(r, load("long_context_16k_coreutils"),
                                                               load("long_context_16k_coreutils_2")),
                         ""),
    "long_context_tradeoff": ("long_context_tradeoff",
                              lambda r: tradeoff_table(r, load("long_context_tradeoff_timing")),
                              "\n\n![RefreshKV trade-off at 8K]({results}/long_context_tradeoff.png)"),
    "offload": ("offload", offload_table, "\n\n![offloading]({results}/offload.png)"),
    "offload_prepare": ("offload_prepare", offload_prepare_table, ""),
    "server_ttft": ("server_ttft", server_ttft_table, ""),
    "server_ttft_quick": ("server_ttft_quick", server_ttft_table, ""),
    "offload_quick": ("offload_quick", offload_table, ""),
    "ffn_sparsity": ("ffn_sparsity", ffn_sparsity_table,
                     "\n\n![FFN sparsity]({results}/ffn_sparsity.png)"),
    "ffn_sparsity_quick": ("ffn_sparsity_quick", ffn_sparsity_table, ""),
    "cpu_attention": ("cpu_attention", cpu_attention_table, ""),
    "h2o_prefill": ("h2o_prefill", h2o_prefill_table, ""),
    "long_generation": ("long_generation",
                        lambda r: long_generation_table(r, *map(load, LONG_GENERATION_MORE)), ""),
    "long_generation_quick": ("long_generation_quick", long_generation_table, ""),
    "distributed": ("distributed", distributed_table, ""),
    "distributed_quick": ("distributed_quick", distributed_table, ""),
    "multi_turn": ("multi_turn", multi_turn_table,
                   "\n\n![chat turn after turn]({results}/multi_turn.png)"),
    "multi_turn_quick": ("multi_turn_quick", multi_turn_table, ""),
}


def sections() -> dict:
    """Section name -> its text, with {results} standing for the results folder."""
    out = {}
    table = RESULTS / "cpu_setup.md"
    if table.exists():
        out["cpu_setup"] = table.read_text().strip()
    for section, (name, render, after) in TABLES.items():
        result = load(name)
        if result:
            table = render(result)
            (RESULTS / f"{name}.md").write_text(table + "\n")
            out[section] = table + after
    streaming = [r for r in (load("streaming_past_context_cache"),
                             load("streaming_past_context_original")) if r]
    if streaming:
        out["streaming"] = streaming_table(streaming)
    growing = [load(p.stem) for p in sorted(RESULTS.glob("growing_context_*.json"))]
    if growing:
        table = growing_table(growing)
        (RESULTS / "growing_context.md").write_text(table + "\n")
        out["growing_context"] = (table + "\n\n![growing context]"
                                  "({results}/growing_context.png)")
    if importlib.util.find_spec("matplotlib") is None:  # the bench extra: tables need only json
        print("report: matplotlib is not installed (pip install -e '.[bench]'): "
              "writing the tables only, the plots left as they are", file=sys.stderr)
        return out
    plots(load("speed_cpu"), load("fidelity"), growing, load("long_context"),
          load("long_context_tradeoff"), load("long_context_tradeoff_timing"),
          load("multi_turn"), load("offload"), load("ffn_sparsity"), load("speed_qwen_cpu"))
    return out


def main():
    bodies = sections()
    # The README links the docs pages; each page holds the sections it quotes.
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        results = "benchmarks/results" if page == README else "../benchmarks/results"
        text = original = page.read_text()
        for name, body in bodies.items():
            text = replace_section(text, name, body.replace("{results}", results))
        if text != original:
            page.write_text(text)


if __name__ == "__main__":
    main()
