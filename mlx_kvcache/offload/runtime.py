"""Exact weight offloading (`--offload layers`): at most a budget of weight
bytes resident, the rest read from the layout when a layer needs it.

A forward pass visits the units in one fixed cycle (layer 0..N-1, then the
output head), token after token. Under a cyclic scan an LRU evicts exactly
the unit needed next, and re-reads everything once the budget is below the
whole model. So the resident set is planned instead: units are pinned in
order of use while they fit, the rest stream through a reserve of one unit
(two with prefetching: the next streamed unit is read by a background thread
while the current one and the pinned ones before the next compute). That
reads the least a budget allows per token, (weights - pinned) bytes, the
physical limit's numerator.

Each streamed layer is evaluated before its weights are dropped (MLX is lazy:
a graph holding them would keep them alive), so memory stays within budget
at the price of one synchronisation per layer. The embedding table is never
resident: the rows of the tokens in use are read. Greedy output is token for
token that of the resident model (tests/test_offload.py).
"""

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from mlx_kvcache.errors import UserError
from mlx_kvcache.offload import layout as layout_file
from mlx_kvcache.offload import neurons

EMPTY = mx.zeros((0,))


@dataclass
class Counters:
    bytes_read: int = 0
    unit_reads: int = 0
    row_bytes_read: int = 0
    neuron_bytes_read: int = 0
    neuron_reads: int = 0  # calls that read neurons (a layer of a token, in neurons mode)
    read_seconds: float = 0.0


@dataclass
class Plan:
    pinned: List[str]
    streamed: List[str]
    prefetch: bool
    resident_bytes: int  # the most the plan holds at once


def plan(layout: layout_file.Layout, budget: int) -> Plan:
    """Which units stay resident under `budget` bytes. Bytes read per token
    are the streamed units' sum, so as many bytes as possible are pinned,
    largest first (a tied output head is often the largest unit: pinned, it
    no longer sets the size of the streaming reserve)."""
    cycle = [n for n in layout.units if n.startswith("layer.")] + ["head" if "head" in
                                                                   layout.units else "embed"]
    sizes = {n: layout.units[n].nbytes for n in cycle}
    always = layout.units["rest"].nbytes
    if always + sum(sizes.values()) <= budget:
        return Plan(cycle, [], False, always + sum(sizes.values()))
    for prefetch in (True, False):
        slots = 2 if prefetch else 1
        pinned, held = [], always
        for name in sorted(cycle, key=lambda n: -sizes[n]):
            others = [sizes[n] for n in cycle if n != name and n not in pinned]
            if held + sizes[name] + slots * max(others, default=0) <= budget:
                pinned.append(name)
                held += sizes[name]
        streamed = [n for n in cycle if n not in pinned]
        reserve = slots * max(sizes[n] for n in streamed)
        if held + reserve <= budget:
            return Plan([n for n in cycle if n in pinned], streamed, prefetch, held + reserve)
    largest = max(cycle, key=lambda n: sizes[n])
    what = "its output head" if largest in ("head", "embed") else "one layer"
    raise UserError(f"a weights budget of {_mib(budget)} is smaller than {what} of this model "
                    f"({_mib(always + sizes[largest])} with its norms)")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


class WeightStore:
    """The units' weights: pinned ones read once, streamed ones per use."""

    def __init__(self, layout: layout_file.Layout, budget: int):
        self.layout = layout
        self.plan = plan(layout, budget)
        self.budget = budget
        self.fd = os.open(layout.path, os.O_RDONLY)
        self.counters = Counters()
        self.resident: Dict[str, Dict[str, mx.array]] = {}
        self.pending: Dict[str, Future] = {}
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="offload-reader")
        self.lock = threading.Lock()
        self.verified = set()
        # Each unit -> the next streamed unit after it in the cycle: its read
        # starts as soon as the reserve has room, so it overlaps the compute of
        # every pinned unit in between.
        order = [n for n in self.layout.units if n in self.plan.pinned + self.plan.streamed]
        self.next_streamed = {}
        for i, name in enumerate(order):
            after = order[i + 1:] + order[:i + 1]
            self.next_streamed[name] = next((n for n in after if n in self.plan.streamed), None)
        self.resident["rest"] = self._read("rest")
        for name in self.plan.pinned:
            self.resident[name] = self._read(name)

    def read_numpy(self, name: str):
        start = time.perf_counter()
        # Checked on its first read; a unit that failed has ended the run.
        arrays = layout_file.read_unit(self.fd, self.layout.units[name],
                                       verify=name not in self.verified)
        with self.lock:
            self.verified.add(name)
            self.counters.bytes_read += self.layout.units[name].nbytes
            self.counters.unit_reads += 1
            self.counters.read_seconds += time.perf_counter() - start
        return arrays

    def _read(self, name: str) -> Dict[str, mx.array]:
        return self._to_mlx(name, self.read_numpy(name))

    def _to_mlx(self, name, arrays):
        dtypes = {t.name: t.dtype for t in self.layout.units[name].tensors}
        weights = layout_file.to_mlx(arrays, dtypes)
        mx.eval(weights)
        return layout_file.unbundle_ffn(weights)

    def acquire(self, name: str) -> Dict[str, mx.array]:
        """The unit's weights; a streamed unit is read now unless prefetched."""
        if name in self.resident:
            weights = self.resident[name]
        elif name in self.pending:
            weights = self._to_mlx(name, self.pending.pop(name).result())
        else:
            weights = self._read(name)
        if self.plan.prefetch:
            # The reserve holds two streamed units: this one and the next.
            following = self.next_streamed.get(name)
            if following is not None and following != name and following not in self.pending:
                self.pending[following] = self.reader.submit(self.read_numpy, following)
        return weights

    def rows(self, tokens: List[int]) -> mx.array:
        """Embedding rows of `tokens`, read from the layout (never resident)."""
        unique = sorted(set(tokens))
        table = layout_file.read_rows(self.fd, self.layout.units["embed"], unique)
        self.counters.row_bytes_read += table.nbytes
        (tensor,) = self.layout.units["embed"].tensors
        rows = layout_file.to_mlx({"weight": table}, {"weight": tensor.dtype})["weight"]
        where = {t: i for i, t in enumerate(unique)}
        return rows[mx.array([where[t] for t in tokens])]

    def read_neurons(self, unit: str, ids: np.ndarray) -> np.ndarray:
        """Neurons `ids` of a neurons unit (neurons mode), read now."""
        start = time.perf_counter()
        rows = layout_file.read_neurons(self.fd, self.layout.units[unit], ids)
        if hasattr(os, "posix_fadvise"):  # as read_unit: the next read comes from storage
            os.posix_fadvise(self.fd, self.layout.units[unit].start,
                             self.layout.units[unit].nbytes, os.POSIX_FADV_DONTNEED)
        with self.lock:
            self.counters.neuron_bytes_read += rows.nbytes
            self.counters.neuron_reads += 1
            self.counters.read_seconds += time.perf_counter() - start
        return rows

    def close(self) -> None:
        self.reader.shutdown(wait=True)
        os.close(self.fd)


class OffloadedLayer(nn.Module):
    """A transformer block whose weights come from the store for each call."""

    def __init__(self, block: nn.Module, store: WeightStore, unit: str):
        super().__init__()
        self.block = block
        self._store, self._unit = store, unit
        _drop(block)

    def __call__(self, x, mask=None, cache=None):
        weights = self._store.acquire(self._unit)
        self.block.update(tree_unflatten(list(weights.items())))
        out = self.block(x, mask, cache)
        if self._unit not in self._store.resident:
            mx.eval(out)
            _drop(self.block)
        return out


class OffloadedEmbedding(nn.Module):
    """Embedding rows read per call; as the tied output head, the whole table."""

    def __init__(self, store: WeightStore):
        super().__init__()
        self._store = store

    def __call__(self, tokens: mx.array) -> mx.array:
        flat = tokens.reshape(-1).tolist()
        return self._store.rows(flat).reshape(*tokens.shape, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        return _head(self._store, x)


class OffloadedHead(nn.Module):
    def __init__(self, store: WeightStore):
        super().__init__()
        self._store = store

    def __call__(self, x: mx.array) -> mx.array:
        return _head(self._store, x)


def _head(store: WeightStore, x: mx.array) -> mx.array:
    name = "head" if "head" in store.layout.units else "embed"
    weight = store.acquire(name)["weight"]
    out = x @ weight.T
    if name not in store.resident:
        mx.eval(out)
    return out


def _drop(module: nn.Module) -> None:
    module.update(tree_map(lambda _: EMPTY, module.parameters()))


@dataclass
class OffloadInfo:
    """What `load(..., weights_budget=...)` attaches to the model as `offload`."""

    store: WeightStore
    mode: str = "layers"
    notes: List[str] = field(default_factory=list)
    neuron_caches: list = field(default_factory=list)

    def stats(self) -> dict:
        c, p = self.store.counters, self.store.plan
        neurons = {}
        if self.mode == "neurons":
            neurons = {"neuron_bytes_read": c.neuron_bytes_read,
                       "neuron_reads": c.neuron_reads,
                       "pinned_neuron_units": sum(n.resident is not None
                                                  for n in self.neuron_caches),
                       "neuron_window_bytes": sum(n.nbytes for n in self.neuron_caches)}
        return {**neurons, "mode": self.mode, "budget_bytes": self.store.budget,
                "weight_bytes": self.store.layout.weight_bytes,
                "pinned_units": len(p.pinned), "streamed_units": len(p.streamed),
                "prefetch": p.prefetch, "planned_resident_bytes": p.resident_bytes,
                "streamed_bytes_per_pass": sum(self.store.layout.units[n].nbytes
                                               for n in p.streamed),
                "bytes_read": c.bytes_read, "unit_reads": c.unit_reads,
                "embedding_row_bytes_read": c.row_bytes_read, "read_seconds": c.read_seconds}


def attach(model: nn.Module, layout: layout_file.Layout, budget: int, mode: str = "layers",
           ffn_sparsity: float = 0.3, neuron_window: int = 0) -> nn.Module:
    """Replace the model's weights with offloaded units under `budget`. In
    neurons mode the budget also holds one layer's neurons being used and the
    neuron window, in what the planned units leave (neurons.py)."""
    neuron_units = [u for name, u in layout.units.items() if name.startswith("neurons.")]
    in_use = max((u.nbytes for u in neuron_units), default=0)
    window_bytes = 0
    if mode == "neurons":
        if budget <= in_use:
            raise UserError(f"a weights budget of {_mib(budget)} is smaller than one layer's "
                            f"FFN neurons ({_mib(in_use)})")
        # What a window of `neuron_window` tokens holds at most if the tokens
        # used disjoint neurons, capped at half of the rest: bytes it keeps
        # are bytes the plan could have pinned instead.
        window_bytes = int(min(neuron_window * (1 - ffn_sparsity)
                               * sum(u.nbytes for u in neuron_units), (budget - in_use) // 2))
    store = WeightStore(layout, budget - in_use - window_bytes)
    store.budget = budget
    inner = model.model
    for i, block in enumerate(inner.layers):
        inner.layers[i] = OffloadedLayer(block, store, f"layer.{i}")
    rest = store.resident["rest"]
    model.update(tree_unflatten([(k, v) for k, v in rest.items()]))
    inner.embed_tokens = OffloadedEmbedding(store)
    if "head" in layout.units:
        model.lm_head = OffloadedHead(store)
    # MLX keeps freed buffers for reuse; beyond one streamed unit that would
    # hold memory the budget does not allow.
    mx.set_cache_limit(max((u.nbytes for u in layout.units.values()), default=0))
    model.offload = OffloadInfo(store, mode)
    if mode == "neurons":
        room = budget - store.plan.resident_bytes
        model.offload.neuron_caches = neurons.attach(model, store, ffn_sparsity, neuron_window,
                                                     room, window_bytes, in_use)
        store.counters = Counters()  # calibration's reads are not the run's
    return model
