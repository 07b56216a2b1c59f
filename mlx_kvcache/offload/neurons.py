"""Sparse weight offloading (`--offload neurons`), after "LLM in a flash"
(Alizadeh et al., 2023) with CATS-style thresholds (Lee et al., 2024).

Each layer's attention and gate projection are handled as exact mode handles
whole layers (pinned or streamed, runtime.py); its up rows and down columns
live apart, bundled neuron by neuron (layout.split_ffn). A token computes
silu(gate(x)) first; only the neurons whose magnitude passes the layer's
threshold are read and used, the rest contribute nothing, which is what
sparsity.thresholded computes densely (tested equal). Neurons used by the last
`window` calls of a layer stay in memory (windowing), so a token reads only the
ones it newly needs; the window holds at most what the budget leaves after the
planned units and one layer's neurons, and forgets its oldest calls beyond that.

Thresholds are calibrated once per model and sparsity (the `sparsity`-quantile
of |silu(gate)| per layer over CALIBRATION_TOKENS tokens of Python's own
documentation, which every Python installation carries) and kept beside the
layout.
"""

import json
from collections import deque
from pathlib import Path
from typing import List

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_kvcache.errors import UserError
from mlx_kvcache.files import replaced_atomically
from mlx_kvcache.loading import load_tokenizer
from mlx_kvcache.offload import layout as layout_file
from mlx_kvcache.offload.sparsity import quantile_thresholds

CALIBRATION_TOKENS = 512


class WindowPool:
    """The bytes all layers' windows may hold together: a layer whose
    neurons do not fit keeps none until others have let go of theirs."""

    def __init__(self, nbytes: int):
        self.free = nbytes


class NeuronCache:
    """One layer's neurons of the last `window` calls, as numpy rows."""

    def __init__(self, store, unit: str, window: int, pool: WindowPool):
        self.store, self.unit = store, unit
        self.window, self.pool = window, pool
        (table,) = store.layout.units[unit].tensors
        self.row_shape = table.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape)) * 4
        self.recent = deque()
        self.resident = None  # pinned: (up, down), contiguous, nothing to read
        self.forget()

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def forget(self) -> None:
        self.pool.free += getattr(self, "rows", np.empty(0)).nbytes
        self.ids = np.empty(0, np.int64)
        self.rows = np.empty((0, *self.row_shape), np.float32)

    def fetch(self, needed: np.ndarray) -> np.ndarray:
        """Rows of the `needed` neurons (sorted): those held, and the rest read."""
        self.recent.append(needed)
        while len(self.recent) > self.window + 1:
            self.recent.popleft()
        room = self.pool.free + self.nbytes
        keep = self._kept()
        while len(self.recent) > 1 and len(keep) * self.row_bytes > room:
            self.recent.popleft()  # the window's oldest call no longer fits
            keep = self._kept()
        held = np.isin(keep, self.ids, assume_unique=True)
        rows = np.empty((len(keep), *self.row_shape), np.float32)
        rows[held] = self.rows[np.searchsorted(self.ids, keep[held])]
        rows[~held] = self.store.read_neurons(self.unit, keep[~held])
        self.forget()
        if self.window > 0 and rows.nbytes <= self.pool.free:
            # A prefill's neurons (nearly all of them) rarely fit: not kept.
            self.ids, self.rows = keep, rows
            self.pool.free -= rows.nbytes
        return rows[np.searchsorted(keep, needed)] if len(keep) != len(needed) else rows

    def _kept(self) -> np.ndarray:
        """The neurons needed now, and those of the window's earlier calls still held."""
        *earlier, now = self.recent
        if not earlier:
            return now
        held = np.intersect1d(np.unique(np.concatenate(earlier)), self.ids, assume_unique=True)
        return np.union1d(now, held)


class NeuronFFN(nn.Module):
    """A SwiGLU FFN whose up and down weights are read per neuron, for the
    neurons whose |silu(gate)| passes `threshold`."""

    def __init__(self, gate_proj: nn.Module, cache: NeuronCache, threshold: float):
        super().__init__()
        self.gate_proj = gate_proj  # filled from the layer's unit for each call
        self._cache, self._threshold = cache, threshold
        self._record = None  # calibration: every |silu(gate)| computed

    def __call__(self, x: mx.array) -> mx.array:
        gate = nn.silu(self.gate_proj(x))
        if self._record is not None:
            self._record.append(np.array(mx.abs(gate).reshape(-1)))
        active = mx.abs(gate) > self._threshold
        if self._cache.resident is not None:
            # Pinned: the dense product with the skipped neurons zeroed costs
            # less than gathering the used ones every call.
            up, down = self._cache.resident
            return mx.where(active, gate * (x @ up.T), 0.0) @ down
        needed = np.flatnonzero(np.array(active.reshape(-1, active.shape[-1])).any(axis=0))
        if len(needed) == 0:
            return mx.zeros_like(x)
        rows = mx.array(self._cache.fetch(needed))
        ids = mx.array(needed)
        up, down = rows[:, 0], rows[:, 1]
        hidden = mx.where(mx.take(active, ids, axis=-1),
                          mx.take(gate, ids, axis=-1) * (x @ up.T), 0.0)
        return hidden @ down


def attach(model: nn.Module, store, sparsity: float, window: int, room: int,
           window_bytes: int, in_use: int) -> List[NeuronCache]:
    """Give each offloaded layer of `model` a NeuronFFN. Of `room` (what the
    budget leaves after the planned units), whole neuron units are pinned in
    order of use while `window_bytes` stay for the window and, unless every
    unit is pinned, `in_use` for the neurons of the layer computing; the window
    gets the rest. Thresholds for `sparsity` calibrated (once, then read from
    beside the layout). Returns the layers' neuron caches."""
    if not 0 <= sparsity < 1:
        raise UserError(f"--ffn-sparsity {sparsity}: a share in [0, 1)")
    if window < 0:
        raise UserError(f"--neuron-window {window}: a number of tokens, 0 or more")
    pool = WindowPool(0)
    ffns = []
    layers = model.model.layers
    for i, layer in enumerate(layers):
        cache = NeuronCache(store, f"neurons.{i}", window, pool)
        unit = store.layout.units[cache.unit]
        streamed_after = in_use if i < len(layers) - 1 else 0
        if (i == 0 or ffns[-1]._cache.resident is not None) and \
                unit.nbytes + streamed_after <= room - window_bytes:
            # Pinned: the attention and gate units were pinned first (a byte
            # of them saves a byte read; a neuron byte, 1 - sparsity of one).
            (bundle,) = store.read_numpy(cache.unit).values()
            cache.resident = tuple(mx.array(np.ascontiguousarray(bundle[:, k])) for k in (0, 1))
            mx.eval(cache.resident)
            room -= unit.nbytes
        ffn = NeuronFFN(layer.block.mlp.gate_proj, cache, -1.0)
        layer.block.mlp = ffn
        ffns.append(ffn)
    pinned_all = all(ffn._cache.resident is not None for ffn in ffns)
    pool.free = room - (0 if pinned_all else in_use)
    for ffn, threshold in zip(ffns, _thresholds(model, ffns, store.layout, sparsity)):
        ffn._threshold = threshold
    return [ffn._cache for ffn in ffns]


def thresholds_path(layout_path: Path) -> Path:
    """Where the thresholds calibrated for a neurons layout are kept."""
    return Path(str(layout_path)[: -len(".safetensors")] + ".thresholds.json")


def _thresholds(model, ffns: List[NeuronFFN], layout: layout_file.Layout,
                sparsity: float) -> List[float]:
    path = thresholds_path(layout.path)
    known = json.loads(path.read_text()) if path.exists() else {}
    key = f"{sparsity:g}"
    if key not in known:
        if sparsity == 0:
            known[key] = [0.0] * len(ffns)
        else:
            known[key] = _calibrate(model, ffns, layout, sparsity)
        with replaced_atomically(path, ".json") as tmp:
            Path(tmp).write_text(json.dumps(known))
    return known[key]


def _calibrate(model, ffns: List[NeuronFFN], layout: layout_file.Layout,
               sparsity: float) -> List[float]:
    """One forward pass over the calibration text, every neuron used."""
    from pydoc_data.topics import topics

    tokenizer = load_tokenizer(Path(layout.source))
    text = "\n\n".join(topics[k] for k in sorted(topics))
    tokens = tokenizer.encode(text)[:CALIBRATION_TOKENS]
    for ffn in ffns:
        ffn._record = []
    try:
        mx.eval(model(mx.array(tokens)[None]))
        return quantile_thresholds([np.concatenate(ffn._record) for ffn in ffns], sparsity)
    finally:
        for ffn in ffns:
            ffn._record = None
            ffn._cache.forget()
            ffn._cache.recent.clear()
