"""Training-free FFN activation sparsity, the model `--offload neurons` is to
run on (CATS, Lee et al., 2024; TEAL, Liu et al., 2024).

Neuron i of a SwiGLU layer adds silu(g_i) * u_i * down[:, i] to the output,
g = gate_proj(x), u = up_proj(x). Where |silu(g_i)| is below the layer's
threshold the neuron is skipped: its up row and down column need not be read.
A layer's threshold is the `sparsity`-quantile of |silu(g)| over a calibration
text, so that share of neurons is skipped on text like it.

`thresholded(model, thresholds)` computes exactly what the sparse read path
would (the skipped neurons' terms are zeros), densely: perplexity against
sparsity is measured with it, and `record` keeps which neurons each token
used, from which the bytes a windowed reader fetches are counted.
"""

from contextlib import contextmanager
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_kvcache.errors import UserError

SWIGLU_TYPES = ("llama", "qwen2", "qwen3")


class ThresholdedMLP(nn.Module):
    """A SwiGLU MLP whose neurons below `threshold` contribute nothing."""

    def __init__(self, mlp: nn.Module, threshold: float):
        super().__init__()
        self.mlp = mlp
        self.threshold = threshold
        self.record: Optional[list] = None  # [tokens, neurons] masks, when set

    def __call__(self, x: mx.array) -> mx.array:
        gate = nn.silu(self.mlp.gate_proj(x))
        active = mx.abs(gate) > self.threshold
        if self.record is not None:
            self.record.append(active.reshape(-1, active.shape[-1]))
        return self.mlp.down_proj(mx.where(active, gate * self.mlp.up_proj(x), 0.0))


def _swiglu_blocks(model) -> list:
    blocks = list(model.layers)
    if model.args.model_type not in SWIGLU_TYPES:
        raise UserError(f"FFN sparsity needs a SwiGLU model ({', '.join(SWIGLU_TYPES)}), "
                        f"not {model.args.model_type}")
    return blocks


@contextmanager
def _mlps_wrapped(model, wrap):
    """Each block's MLP replaced by `wrap(i, mlp)` while inside; yields them."""
    blocks = _swiglu_blocks(model)
    originals = [block.mlp for block in blocks]
    wrapped = [wrap(i, mlp) for i, mlp in enumerate(originals)]
    for block, mlp in zip(blocks, wrapped):
        block.mlp = mlp
    try:
        yield wrapped
    finally:
        for block, mlp in zip(blocks, originals):
            block.mlp = mlp


@contextmanager
def thresholded(model, thresholds: List[float]):
    """The model's MLPs thresholded while inside; yields the ThresholdedMLPs."""
    if len(thresholds) != len(model.layers):
        raise ValueError(f"{len(thresholds)} thresholds for {len(model.layers)} layers")
    with _mlps_wrapped(model, lambda i, mlp: ThresholdedMLP(mlp, thresholds[i])) as mlps:
        yield mlps


class _Recorder(nn.Module):
    """A SwiGLU MLP, unchanged, that keeps every |silu(gate)| it computes."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp
        self.magnitudes = None

    def __call__(self, x: mx.array) -> mx.array:
        gate = nn.silu(self.mlp.gate_proj(x))
        self.magnitudes = mx.abs(gate).reshape(-1)
        return self.mlp.down_proj(gate * self.mlp.up_proj(x))


def calibrate(model, tokens: List[int], sparsities: List[float]) -> dict:
    """{sparsity: [threshold per layer]}: the quantiles of |silu(gate)| of
    every token of `tokens` (one forward pass, no cache)."""
    for s in sparsities:
        if not 0 <= s < 1:
            raise UserError(f"--ffn-sparsity {s}: a share in [0, 1)")
    with _mlps_wrapped(model, lambda i, mlp: _Recorder(mlp)) as recorders:
        mx.eval(model(mx.array(tokens)[None]))
    layers = [np.array(r.magnitudes.astype(mx.float32)) for r in recorders]
    return {s: quantile_thresholds(layers, s) for s in sparsities}


def quantile_thresholds(magnitudes: List[np.ndarray], sparsity: float) -> List[float]:
    """Per layer, the threshold below which `sparsity` of its |silu(gate)|
    values fall (0 for no sparsity: every neuron with any activation used)."""
    return [float(np.quantile(m, sparsity)) if sparsity > 0 else 0.0 for m in magnitudes]
