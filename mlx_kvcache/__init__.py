"""Swappable KV-cache policies for long-context LLM inference with MLX."""

import warnings

# `python -m mlx_kvcache.generate` runs a module this package imports itself
# (for `from mlx_kvcache import generate`); runpy warns about that, harmlessly.
warnings.filterwarnings(
    "ignore", message="'mlx_kvcache.generate' found in sys.modules", category=RuntimeWarning
)

from mlx_kvcache.chat_session import ChatSession  # noqa: E402
from mlx_kvcache.errors import UserError  # noqa: E402
from mlx_kvcache.generate import GenerationResponse, generate, stream_generate  # noqa: E402
from mlx_kvcache.loading import load as _load_resident  # noqa: E402
from mlx_kvcache.offload import load_offloaded  # noqa: E402
from mlx_kvcache.policies import POLICIES, make_cache  # noqa: E402

__all__ = [
    "ChatSession",
    "POLICIES",
    "GenerationResponse",
    "UserError",
    "generate",
    "load",
    "make_cache",
    "stream_generate",
]


def load(name=None, *, dequantize=None, weights_budget=None, offload="layers",
         ffn_sparsity=0.3, neuron_window=0):
    """`model, tokenizer = load("smollm2")`: an alias, a local directory, a .gguf
    file or a hub repo id. `weights_budget` ("2GB", "1.5GiB", "40%", or bytes)
    keeps at most that much of the weights in memory and reads the rest from
    storage when needed (mlx_kvcache.offload): whole layers (`offload="layers"`,
    exact) or only the FFN neurons a token activates (`"neurons"`, with
    `ffn_sparsity` and `neuron_window`); `dequantize` as in
    mlx_kvcache.loading.load."""
    if weights_budget is None:
        return _load_resident(name, dequantize=dequantize)
    return load_offloaded(name, weights_budget, offload, ffn_sparsity, neuron_window)
