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
from mlx_kvcache.loading import load  # noqa: E402
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
