"""A fused kernel is trusted only after it has run once on this machine and
agreed with its pure-MLX reference.

The kernels in `kernels` have never run on most GPUs they will meet. The
first time a variant is needed in a process (kernel x dtype x head dim x GQA
group x query rows x quantization), it runs on a small input of the same
signature beside its reference. A compile or launch error, a non-finite value
or a difference past the dtype's tolerance disables that variant: one line on
stderr names it, the device and the error, and the reference serves it from
then on, so generation goes on with correct output.

Verdicts are remembered per machine in `kernel_probes.json` under the user's
cache directory ($MLX_KVCACHE_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache,
then mlx-kvcache/), keyed by MLX
version, device name and a hash of the kernel sources: a new MLX, another GPU
or edited kernels are probed again. MLX_KVCACHE_REPROBE=1 ignores what is
remembered; MLX_KVCACHE_REFERENCE=1 (kernels.FORCE_REFERENCE) skips kernels
altogether.
"""

import hashlib
import json
import os
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx

from mlx_kvcache import kernels
from mlx_kvcache.files import replaced_atomically

REPROBE = "MLX_KVCACHE_REPROBE"
CACHE_DIR = "MLX_KVCACHE_CACHE_DIR"  # where the file lives, if not the default
FILE_NAME = "kernel_probes.json"
# fp32: accumulation order only; fp16/bf16: inputs rounded, sums in fp32.
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
# Probe sizes: past one tile / one block of keys and ragged, so every code path
# of the kernels (several splits, a partial last block) runs.
PROBE_KEYS = 700
PROBE_RETAINED = 300
PROBE_KV_HEADS = 2


@dataclass(frozen=True)
class Variant:
    """One compiled instance of a kernel family, as its template sees it."""

    kernel: str  # "sparse_attention" or "refresh_scores"
    dtype: str
    head_dim: int
    group: int  # query heads per KV head
    queries: int  # query rows per head (decode steps)
    bits: Optional[int] = None  # refresh_scores over quantized keys
    group_size: Optional[int] = None

    def describe(self) -> str:
        parts = [self.dtype, f"head dim {self.head_dim}", f"GQA group {self.group}",
                 f"{self.queries} quer{'y' if self.queries == 1 else 'ies'}"]
        if self.bits is not None:
            parts.append(f"{self.bits}-bit keys (groups of {self.group_size})")
        return f"{self.kernel} ({', '.join(parts)})"

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def sparse_variant(queries: mx.array, keys: mx.array) -> Variant:
    _, n_q_heads, L, D = queries.shape
    return Variant("sparse_attention", dtype_name(queries.dtype), D,
                   n_q_heads // keys.shape[1], L)


def refresh_variant(queries: mx.array, n_kv_heads: int,
                    quantization: Optional[Tuple[int, int]]) -> Variant:
    _, n_q_heads, L, D = queries.shape
    bits, group_size = quantization if quantization is not None else (None, None)
    return Variant("refresh_scores", dtype_name(queries.dtype), D, n_q_heads // n_kv_heads, L,
                   bits, group_size)


def dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


@dataclass
class Verdict:
    ok: bool
    error: Optional[str] = None  # why it was disabled
    max_error: Optional[float] = None  # largest difference from the reference
    remembered: bool = False  # read from the file, not probed in this process


References = Dict[str, Callable]  # kernel family -> its pure-MLX reference

_lock = threading.Lock()
_verdicts: Dict[Variant, Verdict] = {}
_warned = set()


def trusted(variant: Variant, references: References) -> bool:
    """Whether `variant`'s kernel may be used: probed (or remembered) and
    agreeing with its reference. Warns once per process for a disabled one."""
    verdict = _verdicts.get(variant)
    if verdict is None:
        verdict = verdict_for(variant, references)
    if not verdict.ok and variant not in _warned:
        _warned.add(variant)
        remembered = (f" (remembered; {REPROBE}=1 probes again)" if verdict.remembered else "")
        print(f"mlx-kvcache: kernel {variant.describe()} disabled on {device_name()}: "
              f"{verdict.error}; using the pure-MLX reference{remembered}", file=sys.stderr)
    return verdict.ok


def verdict_for(variant: Variant, references: References, fresh: bool = False) -> Verdict:
    """The variant's verdict: from this process, else the file, else probed
    now (and written to the file). `fresh` probes again regardless."""
    with _lock:
        if not fresh and variant in _verdicts:
            return _verdicts[variant]
        remembered = None if fresh or _reprobe() else _read_file().get(variant.key())
        if remembered is not None:
            verdict = Verdict(**{**remembered, "remembered": True})
        else:
            verdict = probe(variant, references[variant.kernel])
            _remember(variant, verdict)
        _verdicts[variant] = verdict
        return verdict


def probe(variant: Variant, reference: Callable) -> Verdict:
    """Run the kernel once on a small input of the variant's signature and
    compare it with the reference."""
    try:
        inputs = _probe_inputs(variant)
        if variant.kernel == "sparse_attention":
            got = kernels.sparse_attention(*inputs)
        else:
            got = kernels.refresh_scores(*inputs)
        want = reference(*inputs)
        mx.eval(got, want)
    except Exception as e:  # compile and launch errors surface here, at eval
        first_line = (str(e).strip().splitlines() or [""])[0]
        return Verdict(False, f"{type(e).__name__}: {first_line}"[:300])
    if got.shape != want.shape:
        return Verdict(False, f"output shape {tuple(got.shape)}, reference {tuple(want.shape)}")
    got, want = got.astype(mx.float32), want.astype(mx.float32)
    if not mx.all(mx.isfinite(got)).item():
        return Verdict(False, "non-finite values in the output")
    if variant.kernel == "refresh_scores":
        # Probabilities: compared relative to the largest of each head's row.
        row_max = want.max(axis=-1, keepdims=True)
        got, want = got / row_max, want / row_max
    max_error = mx.abs(got - want).max().item()
    tolerance = TOLERANCE[variant.dtype]
    if not max_error <= tolerance:
        return Verdict(False, f"differs from the reference by {max_error:.3g} "
                       f"(tolerance {tolerance:g})", max_error)
    return Verdict(True, None, max_error)


def _probe_inputs(v: Variant):
    """Arguments of kernels.sparse_attention / kernels.refresh_scores (and of
    their references) for a variant, from a fixed seed."""
    key = mx.random.key(v.head_dim * 131 + v.group * 17 + v.queries)
    k1, k2, k3, k4 = mx.random.split(key, 4)
    dtype = getattr(mx, v.dtype)
    n_q_heads = PROBE_KV_HEADS * v.group
    queries = mx.random.normal((1, n_q_heads, v.queries, v.head_dim), key=k1).astype(dtype)
    # A buffer longer than the valid rows, as a cache's is.
    shape = (1, PROBE_KV_HEADS, PROBE_KEYS + 64, v.head_dim)
    keys = mx.random.normal(shape, key=k2).astype(dtype)
    scale = v.head_dim ** -0.5
    if v.kernel == "sparse_attention":
        values = mx.random.normal(shape, key=k3).astype(dtype)
        order = mx.argsort(mx.random.uniform(shape=(1, PROBE_KV_HEADS, PROBE_KEYS), key=k4),
                           axis=-1)
        indices = mx.sort(order[..., :PROBE_RETAINED], axis=-1).astype(mx.uint32)
        return queries, keys, values, indices, scale
    quantization = None
    if v.bits is not None:
        keys = mx.quantize(keys, group_size=v.group_size, bits=v.bits)
        quantization = (v.bits, v.group_size)
    return queries, keys, PROBE_KEYS, scale, 7, quantization


def device_name() -> str:
    """"gpu (Apple M2 Pro)", "cpu (Intel(R) Xeon(R) ...)"."""
    kind = "gpu" if mx.default_device().type == mx.gpu else "cpu"
    try:
        name = mx.device_info().get("device_name", "")
    except Exception:  # an MLX without device_info
        name = ""
    return f"{kind} ({name})" if name else kind


def context() -> str:
    """What a remembered verdict holds for: MLX, the device, the sources."""
    digest = hashlib.sha256()
    for family in kernels.FAMILIES:
        for backend in ("metal", "cuda"):
            digest.update(kernels.source_path(family, backend).read_bytes())
    return f"mlx {mx.__version__} | {device_name()} | sources {digest.hexdigest()[:16]}"


def probes_path() -> Path:
    if os.environ.get(CACHE_DIR):
        return Path(os.environ[CACHE_DIR]) / FILE_NAME
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mlx-kvcache" / FILE_NAME


def _reprobe() -> bool:
    return os.environ.get(REPROBE, "") not in ("", "0")


def _read_all() -> dict:
    try:
        data = json.loads(probes_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # absent or damaged: probe again
        return {}


def _read_file() -> Dict[str, dict]:
    entries = _read_all().get(context(), {})
    return entries if isinstance(entries, dict) else {}


def _remember(variant: Variant, verdict: Verdict) -> None:
    """Add one verdict to the file; a read-only home only costs a re-probe."""
    data = _read_all()
    entry = {k: v for k, v in asdict(verdict).items() if k != "remembered"}
    data.setdefault(context(), {})[variant.key()] = entry
    path = probes_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path, ".json") as tmp:
            Path(tmp).write_text(json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass


def forget() -> None:
    """Drop this process's verdicts and warnings (the file stays)."""
    with _lock:
        _verdicts.clear()
        _warned.clear()
