"""K-quant GGUF loading: time to load, and what keeping the weights quantized
costs against the dequantized float32 model.

Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0) read through
llama.cpp's gguf package. Dequantized (the CPU default), every weight is the
file's exact value in float32; kept quantized (`--keep-quantized`, the GPU
default) each tensor is re-quantized to MLX affine quantization at the nearest
bit width (Q4_K -> 4, Q5_0 -> 5, Q6_K -> 6, Q8_0 -> 8; groups of 32). Measured:
load time (median of 3 after one warm-up load, so the file is in the page
cache), the logits of a 512-token prompt (max |difference|, KL divergence of
the next-token distributions, top-1 agreement), and greedy agreement.

    python benchmarks/gguf_load.py

Writes benchmarks/results/gguf_load.json.
"""

import statistics
import time

import mlx.core as mx
from common import write_result

from mlx_kvcache import load, make_cache
from mlx_kvcache.evaluate import read_text
from mlx_kvcache.gguf import check_file
from mlx_kvcache.packaged_models import packaged_gguf

MODEL = "qwen2.5-coder-0.5b"
TEXT = "/usr/share/info/coreutils.info.gz"


def load_seconds(dequantize: bool, repeats: int = 3):
    load(MODEL, dequantize=dequantize)  # warm-up: the page cache, imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model, tokenizer = load(MODEL, dequantize=dequantize)
        times.append(time.perf_counter() - start)
    return statistics.median(times), model, tokenizer


def logits(model, tokens):
    return model(mx.array(tokens)[None], cache=make_cache(model, "full"))[0].astype(mx.float32)


def greedy(model, tokens, n):
    cache, out, token = make_cache(model, "full"), [], None
    model(mx.array(tokens[:-1])[None], cache=cache)
    token = tokens[-1]
    for _ in range(n):
        token = model(mx.array([[token]]), cache=cache)[0, -1].argmax().item()
        out.append(token)
    return out


def main():
    exact_s, exact, tokenizer = load_seconds(dequantize=True)
    kept_s, kept, _ = load_seconds(dequantize=False)
    tokens = tokenizer.encode(read_text(TEXT), add_special_tokens=False)[20000:20512]
    a, b = logits(exact, tokens), logits(kept, tokens)
    log_p, log_q = (x - mx.logsumexp(x, axis=-1, keepdims=True) for x in (a, b))
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    n = 64
    greedy_exact, greedy_kept = greedy(exact, tokens[:128], n), greedy(kept, tokens[:128], n)
    same = [x == y for x, y in zip(greedy_exact, greedy_kept)]
    result = {
        "benchmark": "gguf_load", "model": MODEL, "file": str(packaged_gguf(MODEL)),
        "tensor_types": sorted(check_file(packaged_gguf(MODEL))),
        "load_s_dequantized_float32": exact_s, "load_s_kept_quantized": kept_s,
        "prompt_tokens": len(tokens),
        "max_abs_logit_difference": mx.abs(a - b).max().item(),
        "mean_abs_logit_difference": mx.abs(a - b).mean().item(),
        "mean_kl_nats": kl.mean().item(), "max_kl_nats": kl.max().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).astype(mx.float32).mean().item(),
        "greedy_tokens": n, "greedy_agreement": sum(same) / n,
        "greedy_first_divergence": same.index(False) if False in same else n,
    }
    print(result)
    write_result("gguf_load", result)


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
