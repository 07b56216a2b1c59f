# A port of mlx_lm/models/gemma3_text.py (Gemma 3 text models). As in llama.py,
# each layer hands its attention step to its cache policy (`cache.attend`) with
# queries and keys before RoPE. Gemma 3 interleaves local layers (attention
# over the last `sliding_window` tokens, RoPE base 10,000) with a global layer
# every `sliding_window_pattern`-th (whole context, RoPE base 1e6): the chosen
# policy runs on the global layers, and each local layer keeps its own window
# (`sliding_windows`, read by make_cache).

from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask
from mlx_lm.models.rope_utils import initialize_rope

from mlx_kvcache.attention import dense


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int = 1152
    num_hidden_layers: int = 26
    intermediate_size: int = 6912
    num_attention_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1.0e-6
    vocab_size: int = 262144
    num_key_value_heads: int = 1
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    query_pre_attn_scalar: float = 256
    sliding_window: int = 512
    sliding_window_pattern: int = 6
    max_position_embeddings: int = 32768
    rope_scaling: Optional[Dict] = None

    @classmethod
    def from_dict(cls, params):
        # The multimodal repos (model_type "gemma3", most mlx-community Gemma 3
        # conversions) nest the text model's config, with mlx-lm's defaults.
        if "text_config" in params:
            params = {"num_attention_heads": 8, "num_key_value_heads": 4,
                      **params["text_config"], "model_type": "gemma3_text",
                      "vocab_size": params.get("vocab_size", 262208)}
        return super().from_dict(params)


def is_global(args: ModelArgs, layer_idx: int) -> bool:
    return (layer_idx + 1) % args.sliding_window_pattern == 0


class RMSNorm(nn.Module):
    # Gemma scales by 1 + weight (checkpoints store weight - 1).
    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()

        dim = args.hidden_size
        self.n_heads = n_heads = args.num_attention_heads
        self.n_kv_heads = n_kv_heads = args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim

        self.scale = args.query_pre_attn_scalar**-0.5

        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

        self.q_norm = RMSNorm(dims=head_dim, eps=args.rms_norm_eps)
        self.k_norm = RMSNorm(dims=head_dim, eps=args.rms_norm_eps)

        if is_global(args, layer_idx):
            self.rope = initialize_rope(
                dims=head_dim,
                base=args.rope_theta,
                traditional=False,
                max_position_embeddings=args.max_position_embeddings,
                scaling_config=args.rope_scaling,
            )
        else:
            self.rope = initialize_rope(
                dims=head_dim, base=args.rope_local_base_freq, traditional=False
            )

    def __call__(
        self,
        x: mx.array,
        mask: Optional[mx.array] = None,
        cache: Optional[Any] = None,
    ) -> mx.array:
        B, L, _ = x.shape
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = self.q_norm(queries.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        keys = self.k_norm(keys.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        if cache is not None:
            output = cache.attend(
                queries, keys, values, rope=self.rope, scale=self.scale, mask=mask
            )
        else:
            queries = self.rope(queries)
            keys = self.rope(keys)
            output = dense(queries, keys, values, scale=self.scale, mask=mask)

        output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(output)


class MLP(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)

    def __call__(self, x) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


@partial(mx.compile, shapeless=True)
def clip_residual(x, y):
    # float16 overflows in Gemma's residual stream; other dtypes add plainly.
    if x.dtype != mx.float16:
        return x + y
    bound = mx.finfo(mx.float16).max
    return mx.clip(x.astype(mx.float32) + y.astype(mx.float32), -bound, bound).astype(
        mx.float16
    )


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self,
        x: mx.array,
        mask: Optional[mx.array] = None,
        cache: Optional[Any] = None,
    ) -> mx.array:
        r = self.self_attn(self.input_layernorm(x), mask, cache)
        h = clip_residual(x, self.post_attention_layernorm(r))
        r = self.mlp(self.pre_feedforward_layernorm(h))
        return clip_residual(h, self.post_feedforward_layernorm(r))


class Gemma3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        assert self.vocab_size > 0
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            TransformerBlock(args=args, layer_idx=layer_idx)
            for layer_idx in range(args.num_hidden_layers)
        ]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        input_embeddings: Optional[mx.array] = None,
    ):
        if input_embeddings is not None:
            h = input_embeddings
        else:
            h = self.embed_tokens(inputs)
        # The scale is rounded to bfloat16, as in Gemma's reference code.
        h *= mx.array(self.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)

        global_mask = create_attention_mask(h, None)
        if cache is None:
            cache = [None] * len(self.layers)
            # Without a cache the local layers need their window as a mask; with
            # one, each local layer's policy keeps only its window and builds its
            # own mask from the causal request.
            local_mask = create_attention_mask(h, None, window_size=self.args.sliding_window)
        else:
            local_mask = global_mask

        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            h = layer(h, global_mask if is_global(self.args, i) else local_mask, c)

        return self.norm(h)


class Model(nn.Module):
    shard_group = None  # no shard() yet

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Gemma3Model(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_word_embeddings = False

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        input_embeddings: Optional[mx.array] = None,
    ):
        out = self.model(inputs, cache, input_embeddings)
        if self.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def sanitize(self, weights):
        # A multimodal checkpoint: keep the language model, drop the vision tower.
        weights = {
            k.removeprefix("language_model."): v
            for k, v in weights.items()
            if not k.startswith(("vision_tower.", "multi_modal_projector."))
        }
        if "lm_head.weight" not in weights:
            self.tie_word_embeddings = True
            self.pop("lm_head")
        return weights

    @property
    def layers(self):
        return self.model.layers

    @property
    def sliding_windows(self) -> List[Optional[int]]:
        """Per layer: its attention window in tokens, or None for a global layer."""
        return [
            None if is_global(self.args, i) else self.args.sliding_window
            for i in range(self.args.num_hidden_layers)
        ]
