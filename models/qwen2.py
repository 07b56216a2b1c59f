# A port of mlx_lm/models/qwen2.py (Qwen2, Qwen2.5). Qwen2 is Llama with biases on
# the q/k/v projections, so only ModelArgs and Attention live here; the blocks are
# llama.py's, which hand attention to the layer's cache policy.

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    max_position_embeddings: Optional[int] = 32768
    rope_theta: float = 1000000


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        dim, head_dim = args.hidden_size, self.head_dim
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)


class Model(llama.Model):
    attention_class = Attention
