"""What this machine runs, and whether the fused kernels can be trusted on it:
the report to paste into a bug report.

    python -m mlx_kvcache.doctor [--json]

Prints the platform, MLX and mlx-lm versions, the backend and device, whether
the CPU BLAS preload is active (Linux), the probe of every kernel variant the
package can build here (kernel_probe; probed afresh, and remembered for later
runs), the references checked against numpy, one timing of fused against
reference attention over retained indices at a long-context shape, the models
installed offline, and a one-line verdict. Exits 1 when something is broken.
"""

import argparse
import ctypes
import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_kvcache import attention, kernel_probe, kernels
from mlx_kvcache.packaged_models import PARTED_GGUF, WHOLE_GGUF, cache_dir, packaged_gguf
from mlx_kvcache.process import exit_now

# One decode step of one layer at Llama-3.1-8B's attention shape (32 query
# heads, 8 KV heads, head dim 128), 32K tokens held, 2K retained.
TIMING_SHAPE = {"query_heads": 32, "kv_heads": 8, "head_dim": 128, "context": 32768,
                "retained": 2048}


def doctor_variants():
    """Every dtype and head dim the kernels take, at the GQA groups of common
    models, one decode query and a few (speculative) ones; refresh scores over
    exact keys and each quantized width."""
    variants = []
    for dtype in kernels.DTYPES:
        name = kernel_probe.dtype_name(dtype)
        for head_dim in kernels.HEAD_DIMS:
            for group in (1, 4, 7, 8):
                variants.append(kernel_probe.Variant("sparse_attention", name, head_dim, group, 1))
            variants.append(kernel_probe.Variant("sparse_attention", name, head_dim, 4, 4))
            variants.append(kernel_probe.Variant("refresh_scores", name, head_dim, 4, 1))
            # Quantization groups must divide the head dim (none does 80).
            group_size = next((g for g in (64, 32) if head_dim % g == 0), None)
            for bits in kernels.QUANTIZED_BITS if group_size else ():
                variants.append(kernel_probe.Variant("refresh_scores", name, head_dim, 4, 1,
                                                     bits, group_size))
    return variants


def versions() -> dict:
    found = {}
    for package in ("mlx", "mlx-lm", "mlx-kvcache", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    found["mlx (imported)"] = mx.__version__
    return found


def backend() -> dict:
    try:
        info = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except Exception as e:  # an MLX without device_info, or a broken device
        info = {"error": str(e)}
    return {"default_device": str(mx.default_device()),
            "metal_available": mx.metal.is_available(),
            "cuda_available": mx.cuda.is_available(),
            "kernel_backend": kernels.gpu_backend(),
            "device_info": info}


def blas() -> dict:
    """On Linux, which BLAS the process mapped: MLX's CPU matmuls are ~10x
    slower on the reference BLAS than on OpenBLAS (docs/cpu.md)."""
    if platform.system() != "Linux":
        return {"applies": False}
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    libraries = sorted({line.split()[-1] for line in maps.splitlines()
                        if "blas" in line.rsplit("/", 1)[-1].lower()})
    # numpy's own OpenBLAS (scipy_openblas) is mapped too, but serves only numpy.
    openblas = [p for p in libraries if "openblas" in p and "scipy_openblas" not in p]
    return {"applies": True, "openblas_loaded": bool(openblas),
            "openblas_core": openblas_core() if openblas else None,
            "suggested_coretype": suggested_coretype(),
            "ld_preload": os.environ.get("LD_PRELOAD", ""), "libraries": libraries}


def openblas_core():
    """The kernel family the preloaded OpenBLAS chose for this CPU, or None."""
    try:
        corename = ctypes.CDLL(None).openblas_get_corename
    except (OSError, AttributeError):
        return None
    corename.restype = ctypes.c_char_p
    return corename().decode()


# OpenBLAS's generic x86-64 kernels: what an OpenBLAS too old for the CPU picks.
GENERIC_CORES = {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom"}


def suggested_coretype():
    """OPENBLAS_CORETYPE for this CPU's vector units (the Makefile's rule), or None."""
    try:
        flags = next((line.split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return None
    return "SkylakeX" if "avx512bw" in flags else "Haswell" if "avx2" in flags else None


def generic_openblas(blas_report: dict) -> bool:
    """OpenBLAS runs its generic kernels on a CPU with wider vector units:
    float32 matmul ~5x slower (docs/cpu.md)."""
    return (blas_report.get("openblas_core") in GENERIC_CORES
            and blas_report.get("suggested_coretype") is not None)


def probes() -> dict:
    if not kernels.use_kernels():
        why = ("forced off by " + kernels.FORCE_REFERENCE if kernels.KERNELS
               else "no GPU backend" if kernels.gpu_backend() is None
               else "the default device is not the GPU")
        return {"used": False, "why": why, "variants": []}
    results = []
    for variant in doctor_variants():
        verdict = kernel_probe.verdict_for(variant, attention.REFERENCES, fresh=True)
        results.append({"variant": variant.describe(), "ok": verdict.ok,
                        "error": verdict.error, "max_error": verdict.max_error})
    return {"used": True, "file": str(kernel_probe.probes_path()), "variants": results}


def reference_check() -> dict:
    """The pure-MLX paths against numpy in float64: they are what serves every
    shape without a trusted kernel."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 8, 1, 64))
    k = rng.standard_normal((1, 2, 300, 64))
    v = rng.standard_normal((1, 2, 300, 64))
    idx = np.sort(rng.permutation(300)[:100])
    indices = np.stack([idx, idx])[None]
    got = attention.sparse_reference(mx.array(q, mx.float32), mx.array(k, mx.float32),
                                     mx.array(v, mx.float32), mx.array(indices, mx.uint32),
                                     0.125)
    kk = np.repeat(k[:, :, idx], 4, axis=1)
    vv = np.repeat(v[:, :, idx], 4, axis=1)
    logits = q @ kk.swapaxes(-1, -2) * 0.125
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ vv
    error = float(np.abs(np.array(got, np.float64) - want).max())
    return {"ok": error < 1e-4, "max_error": error}


def timing() -> dict:
    """Median ms of one layer's decode step: dense over all tokens, the
    reference gather over the retained ones, and the kernel where trusted."""
    s = TIMING_SHAPE
    dtype = mx.float16 if mx.default_device().type == mx.gpu else mx.float32
    q = mx.random.normal((1, s["query_heads"], 1, s["head_dim"])).astype(dtype)
    keys = mx.random.normal((1, s["kv_heads"], s["context"], s["head_dim"])).astype(dtype)
    values = mx.random.normal(keys.shape).astype(dtype)
    indices = mx.sort(mx.random.randint(0, s["context"], (1, s["kv_heads"], s["retained"])),
                      axis=-1).astype(mx.uint32)
    mx.eval(q, keys, values, indices)
    scale = s["head_dim"] ** -0.5

    def median_ms(fn):
        for _ in range(2):
            mx.eval(fn())
        times = []
        for _ in range(5):
            start = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    result = {"shape": s, "dtype": kernel_probe.dtype_name(dtype),
              "dense_ms": median_ms(lambda: attention.dense(q, keys, values, scale=scale)),
              "reference_ms": median_ms(lambda: attention.sparse_reference(
                  q, keys, values, indices, scale)),
              "fused_ms": None}
    if kernels.sparse_supported(q, keys, indices, None) and kernel_probe.trusted(
            kernel_probe.sparse_variant(q, keys), attention.REFERENCES):
        result["fused_ms"] = median_ms(lambda: kernels.sparse_attention(
            q, keys, values, indices, scale))
    return result


def models() -> dict:
    """The offline models, without assembling parts (that is a first use's job)."""
    found = {}
    for alias in WHOLE_GGUF:
        path = packaged_gguf(alias)
        found[alias] = str(path) if path else "not installed"
    for alias, parted in PARTED_GGUF.items():
        if parted.parts() is None:
            found[alias] = "not installed"
            continue
        target = cache_dir() / parted.filename
        found[alias] = (str(target) if target.exists() and target.stat().st_size == parted.size
                        else "installed; assembled on first use")
    return found


def verdict(report: dict):
    """(ok, one line)."""
    kernel_report = report["kernels"]
    failed = [v for v in kernel_report["variants"] if not v["ok"]]
    if not report["references"]["ok"]:
        return False, ("BROKEN: the pure-MLX reference attention disagrees with numpy "
                       f"(max error {report['references']['max_error']:.3g})")
    if failed:
        return False, (f"BROKEN: {len(failed)} of {len(kernel_report['variants'])} kernel "
                       "variants disabled (the references serve them, output stays correct); "
                       "please send this report")
    blas_report = report["blas"]
    cpu_note = ""
    if blas_report.get("applies") and not blas_report["openblas_loaded"]:
        cpu_note = " (OpenBLAS not loaded: CPU matmuls run slow, see docs/cpu.md)"
    elif blas_report.get("applies") and generic_openblas(blas_report):
        cpu_note = (f" (OpenBLAS runs its generic {blas_report['openblas_core']} kernels: "
                    f"start Python with OPENBLAS_CORETYPE={blas_report['suggested_coretype']}, "
                    "see docs/cpu.md)")
    if not kernel_report["used"]:
        return True, (f"OK: no fused kernels here ({kernel_report['why']}); the pure-MLX "
                      f"references serve every shape{cpu_note}")
    return True, (f"OK: {len(kernel_report['variants'])} {report['backend']['kernel_backend'] or 'GPU'} "
                  "kernel variants probed, all agree with their references")


def collect() -> dict:
    report = {"platform": {"system": platform.platform(), "machine": platform.machine(),
                           "python": platform.python_version(), "cores": os.cpu_count()},
              "versions": versions(), "backend": backend(), "blas": blas(),
              "kernels": probes(), "references": reference_check(), "timing": timing(),
              "models": models()}
    report["ok"], report["verdict"] = verdict(report)
    return report


def print_report(report: dict) -> None:
    p, b = report["platform"], report["backend"]
    print(f"platform   {p['system']} ({p['machine']}, {p['cores']} cores), Python {p['python']}")
    print("versions   " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()
                                    if k != "mlx (imported)"))
    name = b["device_info"].get("device_name", "")
    print(f"device     {b['default_device']} {name}; Metal "
          f"{'yes' if b['metal_available'] else 'no'}, CUDA {'yes' if b['cuda_available'] else 'no'}")
    if report["blas"]["applies"]:
        blas_report = report["blas"]
        state = ("OpenBLAS NOT loaded" if not blas_report["openblas_loaded"]
                 else f"OpenBLAS loaded ({blas_report['openblas_core']} kernels"
                 + (", generic: slow" if generic_openblas(blas_report) else "") + ")")
        print(f"blas       {state}: {', '.join(blas_report['libraries']) or 'no BLAS mapped'}")
    k = report["kernels"]
    if not k["used"]:
        print(f"kernels    not used: {k['why']}")
    else:
        passed = sum(v["ok"] for v in k["variants"])
        print(f"kernels    {passed} of {len(k['variants'])} variants agree with their "
              f"references (verdicts kept in {k['file']})")
        for v in k["variants"]:
            if not v["ok"]:
                print(f"  disabled {v['variant']}: {v['error']}")
    r = report["references"]
    print(f"references {'agree' if r['ok'] else 'DISAGREE'} with numpy "
          f"(max error {r['max_error']:.2g})")
    t = report["timing"]
    s = t["shape"]
    fused = f"{t['fused_ms']:.2f} ms" if t["fused_ms"] is not None else "not used here"
    print(f"timing     one decode step of one layer, {s['query_heads']}/{s['kv_heads']} heads, "
          f"head dim {s['head_dim']}, {t['dtype']}, {s['retained']} of {s['context']} tokens: "
          f"dense {t['dense_ms']:.2f} ms, reference {t['reference_ms']:.2f} ms, fused {fused}")
    for alias, where in report["models"].items():
        print(f"model      {alias}: {where}")
    print(f"verdict    {report['verdict']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_kvcache.doctor",
        description="Report this machine's setup and whether mlx-kvcache's kernels can be "
                    "trusted on it; paste the output into a bug report.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = collect()
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    exit_now(main())
