"""The storage layout weight offloading reads from: one safetensors file per
model, its tensors in order of use and grouped by unit.

Units: `embed` (the token embedding table, read row by row for the tokens in
use), `layer.0` ... `layer.N-1` (each block's tensors, contiguous), `head`
(the output projection; for tied embeddings the embedding table itself, read
whole), `rest` (norms and the like, small, always resident). Within a layer
the FFN is row-column bundled as in "LLM in a flash" (Alizadeh et al., 2023):
`mlp.bundle` [intermediate, 3, hidden] holds, for neuron i, its gate row, its
up row and its down column together, so one contiguous read brings a neuron.

The neurons layout (`--offload neurons`) keeps the gate projection whole in
`layer.i`, since every token computes it first, and puts each layer's up rows
and down columns in a unit of their own, `neurons.i`: `mlp.updown`
[intermediate, 2, hidden], read a neuron (a run of neurons) at a time.

The header's metadata holds the model config, what the ports need to rebuild
the model without the original weights, and each unit's byte range and CRC-32,
checked on the unit's first read in a process (CRC-32 runs at about the disk's
speed here: checked on every read, it would halve the bandwidth streaming gets).
Written once, atomically, beside nothing the user owns: under huggingface-hub's
cache (packaged_models.cache_dir()).
"""

import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_kvcache.errors import UserError
from mlx_kvcache.files import replaced_atomically
from mlx_kvcache.offload.sparsity import SWIGLU_TYPES

FORMAT = "mlx_kvcache.offload/1"
GATE, UP, DOWN = "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"
BUNDLE = "mlp.bundle"
UPDOWN = "mlp.updown"
PROGRESS_STEP = 32 << 20  # bytes written between progress reports
MODES = ("layers", "neurons")
# safetensors dtype names; bfloat16 travels through numpy as its uint16 bits.
DTYPES = {mx.float32: ("F32", np.float32), mx.float16: ("F16", np.float16),
          mx.bfloat16: ("BF16", np.uint16)}
NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


@dataclass
class Tensor:
    name: str  # the parameter's path inside its unit ("self_attn.q_proj.weight")
    dtype: str
    shape: Tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


@dataclass
class Unit:
    name: str
    tensors: List[Tensor]
    start: int
    end: int
    crc32: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def model_units(model, mode: str = "layers") -> List[Tuple[str, Dict[str, mx.array]]]:
    """[(unit name, {path within the unit: array})] in order of use."""
    if mode == "neurons" and model.args.model_type not in SWIGLU_TYPES:
        raise UserError(f"--offload neurons needs a SwiGLU model ({', '.join(SWIGLU_TYPES)}), "
                        f"not {model.args.model_type}: use --offload layers")
    params = dict(tree_flatten(model.parameters()))
    n_layers = len(model.layers)
    units = [("embed", {"weight": params.pop("model.embed_tokens.weight")})]
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        layer = {k[len(prefix):]: params.pop(k) for k in list(params) if k.startswith(prefix)}
        if mode == "neurons":
            neurons = split_ffn(layer)  # takes up and down out of `layer`
            units += [(f"layer.{i}", layer), (f"neurons.{i}", neurons)]
        else:
            units.append((f"layer.{i}", bundle_ffn(layer)))
    if "lm_head.weight" in params:
        units.append(("head", {"weight": params.pop("lm_head.weight")}))
    units.append(("rest", params))
    for name, tensors in units:
        for path, array in tensors.items():
            if array.dtype not in DTYPES:
                raise UserError(f"cannot offload {name}.{path}: {array.dtype} weights (offload "
                                "a model with float weights: without --keep-quantized on the CPU)")
    return units


def _has_swiglu(layer: Dict[str, mx.array]) -> bool:
    return all(k in layer for k in (GATE, UP, DOWN)) and not any(
        "mlp." in k and "bias" in k for k in layer)


def bundle_ffn(layer: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Gate and up rows and the down column of each neuron side by side."""
    if not _has_swiglu(layer):
        return layer
    gate, up, down = layer.pop(GATE), layer.pop(UP), layer.pop(DOWN)
    layer[BUNDLE] = mx.stack([gate, up, down.T], axis=1)
    return layer


def split_ffn(layer: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """The neurons unit: each neuron's up row and down column side by side,
    taken out of `layer` (which keeps the gate projection)."""
    if not _has_swiglu(layer):
        raise UserError("--offload neurons needs a SwiGLU feed-forward (gate, up and down "
                        "projections without biases): use --offload layers")
    up, down = layer.pop(UP), layer.pop(DOWN)
    return {UPDOWN: mx.stack([up, down.T], axis=1)}


def unbundle_ffn(tensors: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """The three projections, each contiguous: a strided view of the bundle
    would be copied again by every matmul that uses it (measured on the CPU:
    Qwen2.5-Coder at a 75% budget, 2157 ms/token with views, 690 copied once)."""
    bundle = tensors.pop(BUNDLE, None)
    if bundle is not None:
        tensors[GATE] = mx.contiguous(bundle[:, 0])
        tensors[UP] = mx.contiguous(bundle[:, 1])
        tensors[DOWN] = mx.contiguous(bundle[:, 2].T)
    return tensors


# [(unit name, [(path within the unit, safetensors dtype, shape)])], in file order.
Plan = List[Tuple[str, List[Tuple[str, str, Tuple[int, ...]]]]]
# unit name -> its tensors' values in plan order, as (path, numpy chunk) pairs:
# a tensor may come whole or in consecutive row chunks.
Pieces = Callable[[str], Iterator[Tuple[str, np.ndarray]]]


def parameter_name(unit: str, key: str) -> str:
    """The model parameter path `key` of `unit` stands for (model_units' naming
    undone; `mlp.bundle` stands for the three FFN projections)."""
    if unit == "embed":
        return "model.embed_tokens.weight"
    if unit == "head":
        return "lm_head.weight"
    if unit.startswith(("layer.", "neurons.")):
        return f"model.layers.{unit.split('.', 1)[1]}.{key}"
    return key


def plan_of(units: List[Tuple[str, Dict[str, mx.array]]]) -> Plan:
    """model_units' tensors as a plan (their arrays may be lazy, never computed)."""
    return [(name, [(key, DTYPES[a.dtype][0], tuple(a.shape)) for key, a in tensors.items()])
            for name, tensors in units]


def write(model, config: dict, path: Path, source: str,
          progress: Optional[Callable[[int, int], None]] = None, mode: str = "layers") -> None:
    """Write the layout of `model`, loaded whole (see write_pieces)."""
    units = model_units(model, mode)
    arrays = dict(units)

    def pieces(unit):
        for key, array in arrays[unit].items():
            yield key, _to_numpy(array)

    write_pieces(plan_of(units), pieces, config, path, source, progress, mode)


def write_pieces(plan: Plan, pieces: Pieces, config: dict, path: Path, source: str,
                 progress: Optional[Callable[[int, int], None]] = None,
                 mode: str = "layers") -> None:
    """Write the layout `plan` describes, its bytes from `pieces`, to `path`
    (atomically; refused if the disk lacks the space)."""
    header, unit_meta, offset = {}, [], 0
    for name, entries in plan:
        for key, dtype, shape in entries:
            size = int(np.prod(shape)) * np.dtype(NUMPY[dtype]).itemsize
            header[f"{name}/{key}"] = {"dtype": dtype, "shape": list(shape),
                                       "data_offsets": [offset, offset + size]}
            offset += size
        unit_meta.append({"name": name, "tensors": [key for key, _, _ in entries]})
    total = offset
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < total + (64 << 20):
        raise UserError(f"cannot write the offload layout to {path.parent}: "
                        f"{total >> 20} MiB needed, {free >> 20} MiB free")
    crcs = []
    with replaced_atomically(path, ".safetensors") as tmp:
        with open(tmp, "wb") as out:
            # The header is written last, once the CRCs are known; reserve it.
            metadata = {"format": FORMAT, "mode": mode, "config": json.dumps(config),
                        "source": source,
                        "tied": json.dumps("head" not in [n for n, _ in plan]),
                        "units": json.dumps([{**u, "crc32": 0xFFFFFFFF} for u in unit_meta])}
            longest = _header_bytes(header, metadata, pad_to=None)
            out.write(b"\0" * len(longest))
            data_start = out.tell()
            done = shown = 0
            if progress is not None:
                progress(0, total)
            for name, entries in plan:
                crc = 0
                for key, data in _checked(name, entries, pieces(name), header):
                    crc = zlib.crc32(data, crc)
                    out.write(data)
                    done += data.nbytes
                    if progress is not None and (done - shown >= PROGRESS_STEP or done == total):
                        progress(done, total)
                        shown = done
                crcs.append(crc)
            metadata["units"] = json.dumps([{**u, "crc32": c} for u, c in zip(unit_meta, crcs)])
            final = _header_bytes(header, metadata, pad_to=data_start - 8)
            out.seek(0)
            out.write(final)
    return None


def _checked(unit: str, entries, pieces, header) -> Iterator[Tuple[str, np.ndarray]]:
    """`pieces`, each checked to continue the plan: the right tensor, dtype and
    no more bytes than it has; every tensor complete at the end."""
    wanted = [(key, np.dtype(NUMPY[dtype]), header[f"{unit}/{key}"]["data_offsets"])
              for key, dtype, _ in entries]
    index, left = 0, (wanted[0][2][1] - wanted[0][2][0]) if wanted else 0
    for key, chunk in pieces:
        data = np.ascontiguousarray(chunk)
        if (index >= len(wanted) or key != wanted[index][0] or data.dtype != wanted[index][1]
                or data.nbytes > left):
            raise RuntimeError(f"offload layout: {unit}/{key} does not follow its plan")
        yield key, data
        left -= data.nbytes
        while left == 0 and index < len(wanted):
            index += 1
            left = (wanted[index][2][1] - wanted[index][2][0]) if index < len(wanted) else 0
    if index < len(wanted):
        raise RuntimeError(f"offload layout: {unit}/{wanted[index][0]} incomplete")


def _header_bytes(header: dict, metadata: dict, pad_to: Optional[int]) -> bytes:
    body = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
    if pad_to is not None:
        if len(body) > pad_to:
            raise RuntimeError("offload layout header longer than reserved")
        body += b" " * (pad_to - len(body))  # safetensors allows trailing spaces
    return struct.pack("<Q", len(body)) + body


def _to_numpy(array: mx.array) -> np.ndarray:
    if array.dtype == mx.bfloat16:
        return np.array(array.view(mx.uint16))
    return np.array(array)


@dataclass
class Layout:
    path: Path
    config: dict
    source: str
    tied: bool
    units: Dict[str, Unit]
    mode: str = "layers"

    @property
    def weight_bytes(self) -> int:
        return sum(u.nbytes for u in self.units.values())


def read(path: Path) -> Layout:
    """The layout's header, checked: one line on anything wrong with it."""
    damaged = f"{path}: damaged offload layout (delete it, or run `python -m " \
              "mlx_kvcache.offload prepare` again)"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size, 100 << 20):
                raise UserError(damaged)
            header = json.loads(f.read(n))
        metadata = header.pop("__metadata__")
        if metadata.get("format") != FORMAT:
            raise UserError(f"{path}: not an offload layout of this version "
                            f"({metadata.get('format')})")
        data_start = 8 + n
        units = {}
        for meta in json.loads(metadata["units"]):
            tensors = []
            for key in meta["tensors"]:
                entry = header[f"{meta['name']}/{key}"]
                start, end = entry["data_offsets"]
                tensors.append(Tensor(key, entry["dtype"], tuple(entry["shape"]),
                                      data_start + start, data_start + end))
            start = tensors[0].start if tensors else data_start
            end = tensors[-1].end if tensors else data_start
            units[meta["name"]] = Unit(meta["name"], tensors, start, end, meta["crc32"])
        if max(u.end for u in units.values()) != size:
            raise UserError(damaged)
        return Layout(path, json.loads(metadata["config"]), metadata["source"],
                      json.loads(metadata["tied"]), units, metadata.get("mode", "layers"))
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"{path}: cannot read the offload layout ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, struct.error, IndexError):
        raise UserError(damaged) from None


def read_unit(fd: int, unit: Unit, drop_after: bool = True,
              verify: bool = True) -> Dict[str, np.ndarray]:
    """A unit's tensors as numpy arrays, read with pread (the GIL is released:
    a background thread can read while MLX computes) and, with `verify`,
    checked against the unit's CRC. `drop_after` drops the range from the
    page cache, so the next read of it comes from storage, as it would once
    memory is short."""
    buffer = np.empty(unit.nbytes, np.uint8)  # a bytearray would be zeroed first
    view, done = memoryview(buffer), 0
    while done < unit.nbytes:
        n = os.preadv(fd, [view[done:]], unit.start + done)
        if n == 0:
            raise UserError(f"offload layout truncated in {unit.name}")
        done += n
    if drop_after and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, unit.start, unit.nbytes, os.POSIX_FADV_DONTNEED)
    if verify and zlib.crc32(buffer) != unit.crc32:
        raise UserError(f"offload layout damaged: {unit.name} fails its checksum (delete the "
                        "layout, or run `python -m mlx_kvcache.offload prepare` again)")
    arrays = {}
    for t in unit.tensors:
        start = t.start - unit.start
        arrays[t.name] = np.frombuffer(buffer, NUMPY[t.dtype], count=int(np.prod(t.shape)),
                                       offset=start).reshape(t.shape)
    return arrays


def to_mlx(arrays: Dict[str, np.ndarray], dtypes: Dict[str, str]) -> Dict[str, mx.array]:
    out = {}
    for name, a in arrays.items():
        x = mx.array(a)
        out[name] = x.view(mx.bfloat16) if dtypes[name] == "BF16" else x
    return out


def read_rows(fd: int, unit: Unit, rows: List[int]) -> np.ndarray:
    """Rows of a 2-D unit (the embedding table), one pread each: [len(rows), width]."""
    (table,) = unit.tensors
    dtype = np.dtype(NUMPY[table.dtype])
    row_bytes = table.shape[1] * dtype.itemsize
    out = np.empty((len(rows), table.shape[1]), dtype)
    for i, row in enumerate(rows):
        out[i] = np.frombuffer(os.pread(fd, row_bytes, table.start + row * row_bytes), dtype)
    return out


def read_neurons(fd: int, unit: Unit, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` (sorted neuron indices) of a neurons unit's `mlp.updown`:
    [len(ids), 2, hidden], one pread per run of consecutive neurons. (Joining
    runs across gaps of 1-8 unused neurons read 20-45% more bytes and was no
    faster on SmolLM2 at a 75% budget.)"""
    (table,) = unit.tensors
    dtype = np.dtype(NUMPY[table.dtype])
    row_bytes = int(np.prod(table.shape[1:])) * dtype.itemsize
    out = np.empty((len(ids), *table.shape[1:]), dtype)
    if len(ids) == 0:
        return out
    view = memoryview(out.reshape(-1).view(np.uint8))
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    for first, last in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(ids)].tolist()):
        want = (last - first) * row_bytes
        got = os.preadv(fd, [view[first * row_bytes : last * row_bytes]],
                        table.start + int(ids[first]) * row_bytes)
        if got != want:
            raise UserError(f"offload layout truncated in {unit.name}")
    return out
