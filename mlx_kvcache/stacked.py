"""Several caches stepped by one forward pass: batch row b is cache b's sequence.

A decode step of a small model reads every weight once, and that read is most
of the step on a CPU (Qwen2.5-Coder-0.5B as float32: 2 GB a step). Policies
compared on the same text see the same tokens, so a benchmark can feed them
together: the projections and the MLP run once over N rows, and each layer
hands row b's queries, keys and values to cache b's own `attend`. What each
policy keeps, selects or refreshes is unchanged; only the matmuls' summation
order over the batch may differ from N separate runs (tests/test_stacked.py
bounds the difference).
"""

from typing import List, Sequence

import mlx.core as mx


class StackedLayer:
    """One layer of N caches that hold the same number of tokens."""

    def __init__(self, layers: Sequence):
        self.layers = list(layers)

    @property
    def offset(self) -> int:
        return self.layers[0].offset

    def attend(self, queries, keys, values, *, rope, scale, mask):
        if queries.shape[0] != len(self.layers):
            raise ValueError(f"a batch of {queries.shape[0]} rows for {len(self.layers)} caches")
        return mx.concatenate(
            [layer.attend(queries[b : b + 1], keys[b : b + 1], values[b : b + 1],
                          rope=rope, scale=scale, mask=mask)
             for b, layer in enumerate(self.layers)], axis=0)


def stack(caches: Sequence[list]) -> List[StackedLayer]:
    """The per-layer stacks of `caches` (each a model's list of layer caches),
    to pass as one cache with a batch of len(caches) rows. They must hold the
    same number of tokens, so that one position serves every row."""
    offsets = {cache[0].offset for cache in caches}
    if len(offsets) != 1:
        raise ValueError(f"caches at different offsets {sorted(offsets)} cannot step together")
    return [StackedLayer(layers) for layers in zip(*caches)]
