"""Flash-style weight offloading: run a model whose weights do not fit the
memory you give it (`--weights-budget`, `load(..., weights_budget=...)`).

- layout.py: the storage layout (one safetensors file, units in order of use,
  FFN row-column bundled), written once per model by `prepare`.
- from_gguf.py: that layout written from a GGUF file tensor by tensor, never
  holding the model whole.
- runtime.py: exact mode (`--offload layers`): pinned units plus streamed
  ones, a background reader prefetching the next.
- neurons.py: sparse mode (`--offload neurons`): only the FFN neurons a token
  activates are read (sparsity.py: the thresholds' model and calibration).

    python -m mlx_kvcache.offload prepare --model qwen2.5-coder-0.5b
"""

import dataclasses
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Optional, Union

from mlx_kvcache import loading
from mlx_kvcache.errors import UserError
from mlx_kvcache.models import build_model
from mlx_kvcache.offload import from_gguf, layout as layout_file
from mlx_kvcache.offload.runtime import attach
from mlx_kvcache.packaged_models import cache_dir

MODES = layout_file.MODES
LAYOUT_DIR = "MLX_KVCACHE_OFFLOAD_DIR"
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(%|[KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(text: Union[str, int], weight_bytes: int) -> int:
    """'2GB', '1.5GiB', '40%' (of the model's weight bytes), or bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"--weights-budget {text!r}: give a size (2GB, 1.5GiB, 800MB) or a "
                        "share of the weights (40%)")
    value, unit = float(match.group(1)), (match.group(2) or "B").lower()
    if unit == "%":
        if not 0 < value <= 100:
            raise UserError(f"--weights-budget {text!r}: a share is between 0% and 100%")
        return int(weight_bytes * value / 100)
    return int(value * _UNITS[unit])


def layout_path(source: Path, mode: str = "layers") -> Path:
    """Where `source`'s layout for `mode` lives ($MLX_KVCACHE_OFFLOAD_DIR, else
    under huggingface-hub's cache), keyed by the file's path, size and time."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    folder = Path(os.environ.get(LAYOUT_DIR) or cache_dir() / "offload")
    suffix = "" if mode == "layers" else f"-{mode}"
    return folder / f"{source.stem}-{key.hexdigest()[:12]}{suffix}.safetensors"


def prepare(name: Optional[str], progress=None, mode: str = "layers") -> Path:
    """Write the layout of model `name` for `mode` (once). A GGUF file is read
    tensor by tensor (from_gguf.py); a Hugging Face directory is loaded whole
    first."""
    check_mode(mode)
    source = loading.resolve(name)
    target = layout_path(source, mode)
    if target.exists():
        return target
    if source.suffix == ".gguf":
        from_gguf.write_layout(source, target, progress, mode)
    else:
        model, _ = loading.load(name, dequantize=True)
        layout_file.write(model, dataclasses.asdict(model.args), target, str(source), progress,
                          mode)
    return target


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"--offload {mode!r}: one of {', '.join(MODES)}")


def _progress_bar(done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    print(f"\rpreparing the offload layout [{'#' * filled}{' ' * (width - filled)}] "
          f"{done >> 20}/{total >> 20} MiB", end="" if done < total else "\n",
          file=sys.stderr, flush=True)


def load_offloaded(name: Optional[str], weights_budget, mode: str = "layers",
                   ffn_sparsity: float = 0.3, neuron_window: int = 0):
    """(model, tokenizer) with at most `weights_budget` of weights resident;
    the layout is prepared on first use, with a progress bar. `ffn_sparsity`
    and `neuron_window`: neurons mode's (neurons.py)."""
    check_mode(mode)
    source = loading.resolve(name)
    path = layout_path(source, mode)
    if not path.exists():
        def progress(done: int, total: int) -> None:
            if done == 0:  # said once the model is known to have a layout
                print(f"no offload layout for {source.name} yet: writing it to {path.parent} "
                      "(once)", file=sys.stderr)
            _progress_bar(done, total)

        prepare(name, progress=progress, mode=mode)
    layout = layout_file.read(path)
    budget = parse_budget(weights_budget, layout.weight_bytes)
    model = build_model(layout.config)  # lazy: its initial weights are never computed
    if layout.tied and "lm_head" in model:
        model.pop("lm_head")
        model.tie_word_embeddings = True
    model = attach(model, layout, budget, mode, ffn_sparsity, neuron_window)
    model.eval()
    model.source = str(source)
    model.context_length = layout.config.get("max_position_embeddings")
    return model, loading.load_tokenizer(source)
