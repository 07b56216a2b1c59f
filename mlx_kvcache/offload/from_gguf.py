"""The offload layout written straight from a GGUF file, tensor by tensor: the
model is never loaded whole, so preparing a model that does not fit in memory
works. Peak memory is about one layer's three FFN projections in float32 (the
bundle interleaves them) plus a chunk of embedding rows, where loading first
held the whole model dequantized (benchmarks/offload.py measures both).

The bytes are those `load()` then layout.write would give (the same float32
values, tested equal file for file): the shapes and order come from the port
itself, built lazily (its own weights are never computed), and each tensor is
dequantized by the gguf package, as loading dequantizes.
"""

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
from mlx.utils import tree_flatten

from mlx_kvcache import gguf, gguf_package
from mlx_kvcache.errors import UserError
from mlx_kvcache.models import build_model
from mlx_kvcache.offload import layout as layout_file

# Rows of a matrix dequantized at a time (the embedding table, the head).
CHUNK_BYTES = 16 << 20
# A bundle -> the projections it interleaves, neuron by neuron (down last: its columns).
BUNDLED = {layout_file.BUNDLE: (layout_file.GATE, layout_file.UP, layout_file.DOWN),
           layout_file.UPDOWN: (layout_file.UP, layout_file.DOWN)}
ROPE_FREQS = "offloading a GGUF with rope_freqs (Llama 3.1) is not supported yet"


def write_layout(source: Path, target: Path,
                 progress: Optional[Callable[[int, int], None]] = None,
                 mode: str = "layers") -> None:
    """Write the layout of GGUF file `source` for `mode` to `target`; one line
    (UserError) on a file whose tensors do not make the model it describes."""
    metadata, tensors = gguf.read_header(source)
    gemma = gguf.is_gemma(metadata)
    by_name = {gguf.hf_name(t.name, gemma): t for t in tensors}
    if "rope_freqs.weight" in by_name:
        raise UserError(ROPE_FREQS)
    try:
        model = build_model(gguf.model_config(metadata, by_name))
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: config does not describe a model we can build ({e})") from None
    if "lm_head.weight" not in by_name and "lm_head" in model:
        model.pop("lm_head")  # tied: as the ports' sanitize does
    _check_shapes(source, model, by_name)
    plan = layout_file.plan_of(layout_file.model_units(model, mode))
    entries = dict(plan)
    fd = os.open(source, os.O_RDONLY)
    try:
        def pieces(unit: str) -> Iterator[Tuple[str, np.ndarray]]:
            for key, _, _ in entries[unit]:
                if key in BUNDLED:
                    yield from _bundle_pieces(fd, unit, key, by_name)
                else:
                    tensor = by_name[layout_file.parameter_name(unit, key)]
                    for rows in _row_chunks(fd, tensor, gemma):
                        yield key, rows

        layout_file.write_pieces(plan, pieces, dataclasses.asdict(model.args), target,
                                 str(source), progress, mode)
    finally:
        os.close(fd)


def _check_shapes(source: Path, model, by_name: Dict[str, gguf.TensorInfo]) -> None:
    """What load_weights would refuse, refused before writing anything."""
    wanted = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    missing = sorted(set(wanted) - set(by_name))
    extra = sorted(set(by_name) - set(wanted))
    wrong = [n for n in wanted if n in by_name and by_name[n].shape != wanted[n]]
    for problem, names in (("missing", missing), ("unexpected", extra), ("misshapen", wrong)):
        if names:
            raise UserError(f"{source}: weights do not match the config ({problem}: "
                            f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''})")


def _read(fd: int, tensor: gguf.TensorInfo, first_row: int, n_rows: int) -> np.ndarray:
    """Rows [first_row, first_row + n_rows) of `tensor` as float32, the
    tensor seen as a matrix of its last dimension."""
    width = tensor.shape[-1]
    row_bytes = tensor.nbytes // (math.prod(tensor.shape) // width)
    want = n_rows * row_bytes
    raw = os.pread(fd, want, tensor.offset + first_row * row_bytes)
    if len(raw) != want:
        raise UserError(f"{tensor.name}: GGUF file shorter than its header says")
    return gguf_package.dequantize(np.frombuffer(raw, np.uint8), tensor.type_name,
                                   (n_rows, width))


def _row_chunks(fd: int, tensor: gguf.TensorInfo, gemma: bool) -> Iterator[np.ndarray]:
    width = tensor.shape[-1]
    rows = math.prod(tensor.shape) // width
    step = max(1, CHUNK_BYTES // (4 * width))
    for first in range(0, rows, step):
        values = _read(fd, tensor, first, min(step, rows - first))
        yield values - 1 if gguf.stores_one_plus(tensor.name, gemma) else values


def _bundle_pieces(fd: int, unit: str, key: str, by_name: Dict[str, gguf.TensorInfo]):
    """A layer's FFN bundle (layout.bundle_ffn, layout.split_ffn) in chunks of
    neurons: rows of the projections in BUNDLED[key], the down projection's
    columns."""
    matrices = [_read(fd, t, 0, math.prod(t.shape) // t.shape[-1]).reshape(t.shape)
                for t in (by_name[layout_file.parameter_name(unit, name)]
                          for name in BUNDLED[key])]
    *rows, down = matrices
    step = max(1, CHUNK_BYTES // (4 * len(matrices) * down.shape[0]))
    for first in range(0, down.shape[1], step):
        neurons = slice(first, first + step)
        yield key, np.stack([m[neurons] for m in rows] + [down[:, neurons].T], axis=1)
