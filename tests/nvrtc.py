"""Compile the CUDA kernel sources with NVRTC, as MLX's `cuda_kernel` would
(same generated signature, template constants and default header), without a
GPU: the check that the CUDA twins at least build, wherever NVRTC is installed
(`pip install --no-deps nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12
nvidia-cuda-cccl-cu12`)."""

import ctypes
import importlib.util
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float",
              "int32": "int32_t", "uint32": "uint32_t"}

# MLX's default header includes its device utilities; the kernels only need
# the half/bfloat16 types and numeric_limits from them.
MLX_UTILS_STUB = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cuda/std/limits>\n"
DEFAULT_HEADER = """
#include "mlx/backend/cuda/device/utils.cuh"

#include <cooperative_groups.h>

#define inf cuda::std::numeric_limits<float>::infinity()

"""


def nvidia_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    needed = [root / "cuda_nvrtc" / "lib" / "libnvrtc.so.12",
              root / "cuda_runtime" / "include" / "cooperative_groups.h",
              root / "cuda_cccl" / "include" / "cuda" / "std" / "limits"]
    return root if all(p.exists() for p in needed) else None


def kernel_source(name: str, header: str, body: str, inputs: Sequence[Tuple[str, str]],
                  outputs: Sequence[Tuple[str, str]], template: Sequence[Tuple[str, object]]) -> str:
    """The translation unit MLX builds for `mx.fast.cuda_kernel` (its
    build_kernel): default header, the kernel's header, then a __global__
    function with `const T* name` inputs, `T* name` outputs, and the template
    arguments as constexpr ints and type aliases at the top of the body."""
    params = [f"    const {CUDA_TYPES[dtype]}* {n}" for n, dtype in inputs]
    params += [f"    {CUDA_TYPES[dtype]}* {n}" for n, dtype in outputs]
    constants = []
    for key, value in template:
        if isinstance(value, str):
            constants.append(f"  using {key} = {CUDA_TYPES[value]};")
        else:
            constants.append(f"  constexpr int {key} = {value};")
    return (DEFAULT_HEADER + header + "namespace mlx::core::cu {\n\n"
            "namespace cg = cooperative_groups;\n\n"
            f"__global__ void {name}(\n" + ",\n".join(params) + ") {\n"
            + "\n".join(constants) + "\n\n" + body + "\n}\n\n} // namespace mlx::core::cu\n")


def compile_ptx(source: str, root: Path, arch: str = "compute_90",
                extra_options: Sequence[str] = ()) -> Tuple[bool, str]:
    """(compiled, log) for one translation unit; arch sm_90 with
    extra_options ["--ptxas-options=-v"] reports registers and spills."""
    lib = ctypes.CDLL(str(root / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"))
    program = ctypes.c_void_p()
    headers = [MLX_UTILS_STUB.encode()]
    names = [b"mlx/backend/cuda/device/utils.cuh"]
    status = lib.nvrtcCreateProgram(
        ctypes.byref(program), source.encode(), b"kernel.cu", 1,
        (ctypes.c_char_p * 1)(*headers), (ctypes.c_char_p * 1)(*names))
    if status:
        return False, f"nvrtcCreateProgram failed ({status})"
    options: List[bytes] = [f"--gpu-architecture={arch}".encode(), b"--std=c++17",
                            f"-I{root / 'cuda_runtime' / 'include'}".encode(),
                            f"-I{root / 'cuda_cccl' / 'include'}".encode()]
    options += [o.encode() for o in extra_options]
    status = lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    return status == 0, log.value.decode(errors="replace")
