"""Fused kernels: the sources and their Metal/CUDA twinship, the CUDA twins
compiled by NVRTC where it is installed, the dispatch and the references on the
CPU; on a GPU (skipped elsewhere) every kernel against its reference."""

import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context

import mlx.core as mx
import pytest

from mlx_kvcache import attention, kernel_probe, kernels
from mlx_kvcache.attention import group_max, pool_max, scores
from tests import nvrtc

# CUDA -> Metal: the whole difference between the twins' kernel bodies.
TO_METAL = [
    ("__syncthreads();", "threadgroup_barrier(mem_flags::mem_threadgroup);"),
    ("__shared__ ", "threadgroup "),
    ("fmaxf(", "fmax("),
    ("expf(", "fast::exp("),
    ("blockIdx.", "threadgroup_position_in_grid."),
    ("gridDim.", "threadgroups_per_grid."),
    ("threadIdx.", "thread_position_in_threadgroup."),
    ("blockDim.", "threads_per_threadgroup."),
    ("const T* ", "const device T* "),
    ("const uint32_t* ", "const device uint32_t* "),
    ("const float* ", "const device float* "),
]


def sources(family, backend):
    return kernels.read_sources(kernels.source_path(family, backend))


@pytest.mark.parametrize("family", kernels.FAMILIES)
def test_metal_kernels_are_line_by_line_translations_of_the_cuda_twins(family):
    _, cuda = sources(family, "cuda")
    _, metal = sources(family, "metal")
    assert sorted(cuda) == sorted(metal)
    for name, body in cuda.items():
        assert name in kernels.SIGNATURES
        for before, after in TO_METAL:
            body = body.replace(before, after)
        assert body.splitlines() == metal[name].splitlines(), name


def test_every_signature_has_a_kernel():
    names = [name for family in kernels.FAMILIES for name in sources(family, "cuda")[1]]
    assert sorted(names) == sorted(kernels.SIGNATURES)


# Input and output dtypes as the wrappers in kernels.py pass them; "T" is the
# model's dtype.
KERNEL_DTYPES = {
    "sparse_attention_partials": (["T", "T", "T", "uint32", "int32", "float32"],
                                  ["float32"] * 3),
    "sparse_attention_reduce": (["float32"] * 3 + ["int32"], ["T"]),
    "score_logits": (["T", "T", "int32", "float32"], ["float32"] * 3),
    "score_logits_quantized": (["T", "uint32", "T", "T", "int32", "float32"], ["float32"] * 3),
    "refresh_scores": (["float32"] * 3 + ["int32"], ["float32"]),
}


def templates(name, dtype, head_dim):
    if name.startswith("sparse_attention"):
        base = [("T", dtype), ("D", head_dim), ("QR", kernels.MAX_QUERY_ROWS)]
        if name.endswith("partials"):
            base += [("TILE_ROWS", kernels.TILE_ROWS), ("WARPS", kernels.WARPS)]
        return [base]
    if name == "refresh_scores":
        return [[("GROUP", 8), ("BLOCK_KEYS", kernels.BLOCK_KEYS), ("POOL", 7)]]
    base = [("T", dtype), ("D", head_dim), ("GROUP", 8), ("BLOCK_KEYS", kernels.BLOCK_KEYS)]
    if name == "score_logits":
        return [base]
    return [base + [("BITS", bits), ("GROUP_SIZE", 32)] for bits in kernels.QUANTIZED_BITS
            if head_dim % 32 == 0]


NVIDIA = nvrtc.nvidia_dir()


@pytest.mark.skipif(NVIDIA is None, reason="NVRTC not installed (see tests/nvrtc.py)")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("head_dim", kernels.HEAD_DIMS)
def test_cuda_kernels_compile_for_sm90_without_spills(dtype, head_dim):
    sources_ = []
    for family in kernels.FAMILIES:
        header, bodies = sources(family, "cuda")
        for name, body in bodies.items():
            in_types, out_types = KERNEL_DTYPES[name]
            ins, outs = kernels.SIGNATURES[name]
            typed = lambda names, types: [(n, dtype if t == "T" else t)  # noqa: E731
                                          for n, t in zip(names, types)]
            for template in templates(name, dtype, head_dim):
                sources_.append((f"{name} {template}", nvrtc.kernel_source(
                    name, header, body, typed(ins, in_types), typed(outs, out_types), template)))
    # NVRTC serialises compiles within a process: one process a core.
    with ProcessPoolExecutor(os.cpu_count(), mp_context=get_context("fork")) as pool:
        results = pool.map(partial(nvrtc.compile_ptx, root=NVIDIA, arch="sm_90",
                                   extra_options=["--ptxas-options=-v"]),
                           [source for _, source in sources_])
        for (what, _), (compiled, log) in zip(sources_, results):
            assert compiled, f"{what}:\n{log}"
            # Register arrays sized by templates: none may spill to local memory.
            spills = [line for line in log.splitlines() if "spill stores" in line]
            assert spills and all(" 0 bytes spill stores" in x for x in spills), log


def test_the_cpu_has_no_kernels_and_uses_the_references():
    if kernels.gpu_backend() is not None:
        pytest.skip("a GPU backend is present")
    assert kernels.KERNELS == {} and not kernels.use_kernels()


def test_the_environment_variable_forces_the_references(monkeypatch):
    monkeypatch.setattr(kernels, "KERNELS", {"sparse_attention_partials": None})
    monkeypatch.setattr(kernels.mx, "default_device", lambda: mx.Device(mx.gpu))
    assert kernels.use_kernels()
    monkeypatch.setenv(kernels.FORCE_REFERENCE, "1")
    assert not kernels.use_kernels()


@pytest.fixture
def fake_kernels(monkeypatch):
    """Kernels 'present': record which calls reach them."""
    calls = []
    monkeypatch.setattr(kernels, "use_kernels", lambda: True)
    monkeypatch.setattr(kernel_probe, "trusted", lambda variant, references: True)
    monkeypatch.setattr(kernels, "sparse_attention",
                        lambda q, *args: calls.append("sparse") or mx.zeros(q.shape, q.dtype))
    monkeypatch.setattr(kernels, "refresh_scores",
                        lambda q, keys, n, *args: calls.append("refresh") or mx.zeros((1, 2, n)))
    return calls


@pytest.mark.parametrize("head_dim, L, mask, used", [
    (64, 1, None, True), (128, 8, None, True), (80, 1, None, True),
    (32, 1, None, False),  # head dim without a kernel
    (64, 9, None, False),  # more queries than the kernel holds
    (64, 2, mx.ones((2, 16), dtype=mx.bool_), False),  # a mask: the reference applies it
])
def test_sparse_dispatch(fake_kernels, head_dim, L, mask, used):
    q = mx.zeros((1, 8, L, head_dim))
    k = mx.zeros((1, 2, 64, head_dim))
    attention.sparse(q, k, k, mx.zeros((1, 2, 16), mx.uint32), 0.1, mask=mask)
    assert fake_kernels == (["sparse"] if used else [])


@pytest.mark.parametrize("L, quantization, used", [
    (1, None, True), (1, (4, 32), True), (1, (8, 64), True),
    (2, None, False),  # the kernel scores one query
    (1, (3, 32), False),  # 3-bit codes straddle words
])
def test_refresh_scores_dispatch(fake_kernels, L, quantization, used):
    q = mx.random.normal((1, 8, L, 64))
    keys = mx.random.normal((1, 2, 64, 64))
    if quantization:
        keys = mx.quantize(keys, group_size=quantization[1], bits=quantization[0])
    attention.refresh_scores(q, keys, 40, 0.1, 7, quantization)
    assert fake_kernels == (["refresh"] if used else [])


def test_refresh_scores_read_only_the_first_n_keys_of_the_buffer():
    mx.random.seed(0)
    q = mx.random.normal((1, 8, 1, 64))
    keys = mx.random.normal((1, 2, 300, 64))
    buffer = mx.concatenate([keys, 1e4 * mx.ones((1, 2, 212, 64))], axis=2)
    want = group_max(pool_max(scores(q, keys, 0.125).sum(axis=2), 7), 2)
    assert mx.array_equal(attention.refresh_scores(q, buffer, 300, 0.125, 7), want)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_refresh_scores_are_those_of_the_dequantized_keys(bits):
    mx.random.seed(bits)
    q = mx.random.normal((1, 8, 1, 64))
    packed = mx.quantize(mx.random.normal((1, 2, 512, 64)), group_size=32, bits=bits)
    dequantized = mx.dequantize(*packed, group_size=32, bits=bits)
    got = attention.refresh_scores(q, packed, 300, 0.125, 7, quantization=(bits, 32))
    want = attention.refresh_scores(q, dequantized, 300, 0.125, 7)
    assert mx.allclose(got, want, atol=1e-6)


# ---- On a GPU: each kernel against its reference --------------------------------

ON_GPU = kernels.use_kernels()
GPU = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (Metal or MLX CUDA)")


def grid(values):
    """Every value on a GPU; elsewhere only the first, so a skipped grid shows as
    one skip per test instead of hundreds."""
    return list(values) if ON_GPU else list(values)[:1]


def tolerance(dtype):
    return kernel_probe.TOLERANCE[kernel_probe.dtype_name(dtype)]


@GPU
@pytest.mark.parametrize("dtype", grid([mx.float16, mx.bfloat16, mx.float32]))
@pytest.mark.parametrize("head_dim", grid(kernels.HEAD_DIMS))
@pytest.mark.parametrize("group", grid([1, 4, 8]))
@pytest.mark.parametrize("n, k", grid([(1024, 16), (1024, 1000), (8192, 512), (8192, 8192),
                                       (65536, 4096), (65536, 16)]))
@pytest.mark.parametrize("L", grid([1, 4]))
def test_sparse_kernel_matches_the_reference(dtype, head_dim, group, n, k, L):
    mx.random.seed(n + k)
    q = mx.random.normal((1, 2 * group, L, head_dim)).astype(dtype)
    keys = mx.random.normal((1, 2, n + 64, head_dim)).astype(dtype)
    values = mx.random.normal((1, 2, n + 64, head_dim)).astype(dtype)
    indices = mx.sort(mx.stack([mx.random.permutation(n)[:k] for _ in range(2)])[None], axis=-1)
    # The kernel itself, not attention.sparse: a variant that failed its probe
    # would be served by the reference there, and the test could not fail.
    got = kernels.sparse_attention(q, keys, values, indices, head_dim**-0.5)
    want = attention.sparse_reference(q, keys, values, indices, head_dim**-0.5)
    assert mx.allclose(got.astype(mx.float32), want.astype(mx.float32), atol=tolerance(dtype))


@GPU
@pytest.mark.parametrize("dtype", grid([mx.float16, mx.bfloat16, mx.float32]))
@pytest.mark.parametrize("head_dim", grid([64, 128]))
@pytest.mark.parametrize("group", grid([1, 4, 8]))
@pytest.mark.parametrize("n", grid([300, 8192, 65536]))
@pytest.mark.parametrize("quantization", grid([None, (4, 64), (8, 32)]))
def test_refresh_scores_kernels_match_the_reference(dtype, head_dim, group, n,
                                                    quantization):
    mx.random.seed(n)
    q = mx.random.normal((1, 2 * group, 1, head_dim)).astype(dtype)
    keys = mx.random.normal((1, 2, n + 100, head_dim)).astype(dtype)
    if quantization:
        keys = mx.quantize(keys, group_size=quantization[1], bits=quantization[0])
    got = kernels.refresh_scores(q, keys, n, head_dim**-0.5, 7, quantization)
    want = attention.refresh_scores_reference(q, keys, n, head_dim**-0.5, 7, quantization)
    # Probabilities: compared relative to the largest of each head's row.
    scale = want.max(axis=-1, keepdims=True)
    assert mx.allclose(got / scale, want / scale, atol=tolerance(dtype))
