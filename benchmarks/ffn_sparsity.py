"""The curves `--offload neurons` is to read its defaults off: perplexity
against FFN sparsity (CATS-style thresholds, mlx_kvcache/offload/sparsity.py)
on held-out text, and the bytes a windowed neuron reader would fetch per token
against the window.

Thresholds are calibrated on one stretch of the coreutils manual; perplexity is
scored on a stretch of the gettext manual, every token's FFN thresholded (as a
decode step would be). From the neurons each token used, per layer and window
W: a neuron is read when the token needs it and none of the W tokens before it
did (those stay resident: "LLM in a flash"'s windowing). Bytes per token of a
layer = its attention and norm weights + the whole gate projection (computed
first, for every neuron) + 2 x hidden floats (up row, down column) per neuron
read; beside it, the bytes exact mode reads for the same layer (all of it).
Both with nothing pinned (the budget's pinned share comes off both alike).

    python benchmarks/ffn_sparsity.py --quick     # SmolLM2
    python benchmarks/ffn_sparsity.py             # SmolLM2 and Qwen2.5-Coder-0.5B

Writes benchmarks/results/ffn_sparsity.json (ffn_sparsity_quick.json).
"""

import argparse
import math

import mlx.core as mx
import numpy as np
from common import write_result

from mlx_kvcache import load
from mlx_kvcache.evaluate import read_text
from mlx_kvcache.offload.sparsity import calibrate, thresholded

CALIBRATION = "/usr/share/info/coreutils.info.gz"
HELD_OUT = "/usr/share/info/gettext.info.gz"
SPARSITIES = [0.0, 0.3, 0.5, 0.7, 0.8, 0.9]
WINDOWS = [0, 1, 2, 4, 8, 16]


def stretch(tokenizer, path, start_char, tokens):
    return tokenizer.encode(read_text(path)[start_char:start_char + tokens * 8])[:tokens]


def nll(model, tokens):
    logits = model(mx.array(tokens)[None])[0, :-1].astype(mx.float32)
    targets = mx.array(tokens[1:])
    losses = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(
        logits, targets[:, None], axis=-1)[:, 0]
    return mx.mean(losses).item()


def window_reads(active: np.ndarray, window: int):
    """(mean neurons read per token, mean neurons resident) for one layer's
    [tokens, neurons] masks under a window of `window` tokens."""
    # used[t] = how many of tokens 0..t-1 used each neuron; a neuron is held
    # at token t when one of tokens t-W..t-1 used it.
    used = np.concatenate([np.zeros((1, active.shape[1]), np.int32),
                           np.cumsum(active, axis=0, dtype=np.int32)])
    t = np.arange(1, len(active))  # the first token has no history to reuse
    held = (used[t] - used[np.maximum(t - window, 0)]) > 0
    reads = (active[t] & ~held).sum(axis=1)
    return float(reads.mean()), float(held.sum(axis=1).mean())


def measure(model_name, calibration_tokens, scored_tokens, log):
    model, tokenizer = load(model_name)
    args = model.args
    hidden, neurons = args.hidden_size, args.intermediate_size
    calib = stretch(tokenizer, CALIBRATION, 60000, calibration_tokens)
    text = stretch(tokenizer, HELD_OUT, 40000, scored_tokens)
    thresholds = calibrate(model, calib, SPARSITIES)
    bytes_per = 4  # float32 on this CPU
    layer = model.layers[0]
    layer_bytes = sum(v.nbytes for v in _flat(layer.parameters()))
    gate_bytes = hidden * neurons * bytes_per
    neuron_bytes = 2 * hidden * bytes_per
    attention_bytes = layer_bytes - 3 * gate_bytes
    dense = nll(model, text)
    entry = {"model": model_name, "hidden": hidden, "neurons": neurons,
             "layers": len(model.layers), "layer_bytes": layer_bytes,
             "attention_bytes": attention_bytes, "gate_bytes": gate_bytes,
             "calibration_tokens": len(calib), "scored_tokens": len(text) - 1,
             "dense_ppl": math.exp(dense), "rows": []}
    log(f"{model_name}: dense perplexity {entry['dense_ppl']:.3f}")
    for sparsity in SPARSITIES[1:]:
        with thresholded(model, thresholds[sparsity]) as mlps:
            for mlp in mlps:
                mlp.record = []
            loss = nll(model, text)
            masks = [np.array(mlp.record[0]) for mlp in mlps]
        achieved = 1 - float(np.mean([m.mean() for m in masks]))
        row = {"sparsity": sparsity, "achieved_sparsity": achieved, "ppl": math.exp(loss),
               "ppl_ratio": math.exp(loss - dense), "windows": []}
        for window in WINDOWS:
            per_layer = [window_reads(m, window) for m in masks]
            read = float(np.mean([r for r, _ in per_layer]))
            resident = float(np.mean([h for _, h in per_layer]))
            sparse_bytes = attention_bytes + gate_bytes + read * neuron_bytes
            row["windows"].append({
                "window": window, "neurons_read": read, "neurons_resident": resident,
                "layer_bytes_read": sparse_bytes, "vs_exact": sparse_bytes / layer_bytes,
                # With attention and gate resident, the share of up/down read.
                "up_down_read_share": read / neurons,
                "resident_bytes": resident * neuron_bytes * len(model.layers)})
        entry["rows"].append(row)
        best = min(row["windows"], key=lambda w: w["vs_exact"])
        log(f"  sparsity {sparsity}: achieved {achieved:.3f}, ppl x{row['ppl_ratio']:.4f}, "
            f"layer bytes vs exact {row['windows'][0]['vs_exact']:.3f} (no window) .. "
            f"{best['vs_exact']:.3f} (window {best['window']})")
    entry["thresholds"] = {str(s): t for s, t in thresholds.items()}
    return entry


def _flat(params):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(params)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=None)
    args = parser.parse_args()
    models = (args.models.split(",") if args.models else
              ["smollm2"] if args.quick else ["smollm2", "qwen2.5-coder-0.5b"])
    report = {"benchmark": "ffn_sparsity", "quick": args.quick, "calibration": CALIBRATION,
              "held_out": HELD_OUT, "models": []}
    for name in models:
        report["models"].append(measure(name, 512, 512 if args.quick else 2048, print))
        write_result("ffn_sparsity_quick" if args.quick else "ffn_sparsity", report)


if __name__ == "__main__":
    main()
