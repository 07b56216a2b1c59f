"""Shared test helpers: tiny random-weight configs of each architecture, and
mlx-lm's own model built on the same weights."""

import dataclasses
import importlib

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_kvcache.models import build_model

# Tiny configs in each family's real config.json shape (GQA, rope scaling,
# q/k norm, biases), small enough to run in milliseconds.
TINY_CONFIGS = {
    "llama3": {
        "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2,
        "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "vocab_size": 320, "max_position_embeddings": 2048,
        "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    },
    "mistral": {
        "model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "vocab_size": 320, "max_position_embeddings": 2048,
        "rope_theta": 1000000.0, "tie_word_embeddings": False,
    },
    "qwen2": {
        "model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "vocab_size": 320, "max_position_embeddings": 2048,
        "rope_theta": 1000000.0, "tie_word_embeddings": True,
    },
    "qwen3": {
        "model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "rms_norm_eps": 1e-6, "vocab_size": 320,
        "max_position_embeddings": 2048, "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    # Local layers with an 8-token window, every second layer global.
    "gemma3": {
        "model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 4,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "rms_norm_eps": 1e-6, "vocab_size": 320,
        "max_position_embeddings": 2048, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 32,
        "sliding_window": 8, "sliding_window_pattern": 2,
    },
}


def tiny_model(name: str, seed: int = 0, layers: int = None):
    mx.random.seed(seed)
    config = dict(TINY_CONFIGS[name])
    if layers is not None:
        config["num_hidden_layers"] = layers
    model = build_model(config)
    mx.eval(model.parameters())
    return model


def ours_vs_mlx_lm(model, prompt, n_tokens, prefill_step_size=2048):
    """Greedy tokens of our port with the `full` policy, and of mlx-lm's own
    port of the same weights with its own generation loop and KVCache."""
    from mlx_lm.generate import generate_step as mlx_lm_generate_step
    from mlx_lm.sample_utils import make_sampler

    from mlx_kvcache import make_cache
    from mlx_kvcache.generate import generate_step

    greedy = make_sampler(0.0)
    ours = generate_step(prompt, model, make_cache(model, "full"), greedy,
                         prefill_step_size=prefill_step_size)
    ours = [next(ours) for _ in range(n_tokens)]
    theirs = mlx_lm_generate_step(mx.array(prompt), mlx_lm_twin(model), max_tokens=n_tokens,
                                  sampler=greedy, prefill_step_size=prefill_step_size)
    return ours, [token for token, _ in theirs]


def mlx_lm_twin(model):
    """mlx-lm's own port of `model`'s architecture, holding the same weights."""
    model_type = {"mistral": "llama"}.get(model.model_type, model.model_type)
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    config = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    twin = module.Model(module.ModelArgs.from_dict(config))
    # sanitize: mlx-lm's Gemma 3 drops its lm_head when the embeddings are tied.
    twin.load_weights(list(twin.sanitize(dict(tree_flatten(model.parameters()))).items()))
    mx.eval(twin.parameters())
    return twin


# Hugging Face name -> GGUF name, the inverse of mlx_kvcache.gguf's renames.
_GGUF_NAMES = [
    ("model.embed_tokens.", "token_embd."), ("model.norm.", "output_norm."),
    ("lm_head.", "output."), ("input_layernorm.", "attn_norm."),
    ("post_attention_layernorm.", "ffn_norm."), ("self_attn.q_proj.", "attn_q."),
    ("self_attn.k_proj.", "attn_k."), ("self_attn.v_proj.", "attn_v."),
    ("self_attn.o_proj.", "attn_output."), ("self_attn.q_norm.", "attn_q_norm."),
    ("self_attn.k_norm.", "attn_k_norm."), ("mlp.gate_proj.", "ffn_gate."),
    ("mlp.up_proj.", "ffn_up."), ("mlp.down_proj.", "ffn_down."),
    ("model.layers.", "blk."),
]


def _llama_cpp_permute(w, n_heads):
    # convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half rows to the
    # interleaved order of llama.cpp's "normal" RoPE.
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(
        1, 2
    ).reshape(w.shape)


def byte_level_vocab():
    """A byte-level BPE vocabulary: 256 byte tokens, a few merges, two specials."""
    from mlx_lm.tokenizer_utils import _byte_decoder

    tokens = sorted(_byte_decoder(), key=lambda ch: _byte_decoder()[ch])
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    tokens += ["<|endoftext|>", "<|im_end|>"]
    return tokens, merges


def write_gguf(path, model, *, dtype=mx.float32, architecture=None):
    """Write `model` (a tiny llama/qwen port) as a GGUF file the way llama.cpp's
    converter lays it out, with a byte-level BPE tokenizer in its metadata."""
    args = model.args
    arch = architecture or {"mistral": "llama"}.get(args.model_type, args.model_type)
    weights = {}
    for name, w in tree_flatten(model.parameters()):
        if arch == "llama" and ("q_proj.weight" in name or "k_proj.weight" in name):
            heads = args.num_attention_heads if "q_proj" in name else args.num_key_value_heads
            w = _llama_cpp_permute(w, heads)
        for hf, gg in _GGUF_NAMES:
            name = name.replace(hf, gg)
        weights[name] = w.astype(dtype) if w.ndim > 1 else w
    tokens, merges = byte_level_vocab()
    vocab_size = args.vocab_size
    tokens = (tokens + [f"<extra_{i}>" for i in range(vocab_size)])[:vocab_size]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    metadata = {
        "general.architecture": arch,
        f"{arch}.embedding_length": u32(args.hidden_size),
        f"{arch}.block_count": u32(args.num_hidden_layers),
        f"{arch}.feed_forward_length": u32(args.intermediate_size),
        f"{arch}.attention.head_count": u32(args.num_attention_heads),
        f"{arch}.attention.head_count_kv": u32(args.num_key_value_heads),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(args.rms_norm_eps, dtype=mx.float32),
        f"{arch}.context_length": u32(args.max_position_embeddings),
        f"{arch}.rope.freq_base": mx.array(args.rope_theta, dtype=mx.float32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": u32(tokens.index("<|im_end|>") if "<|im_end|>" in tokens else 0),
    }
    if args.rope_scaling:
        # Llama 3.1 GGUFs carry the scaled RoPE as per-frequency factors.
        rope = model.layers[0].self_attn.rope
        dims = rope.dims
        weights["rope_freqs.weight"] = rope._freqs / (
            args.rope_theta ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        )
    if args.head_dim:
        metadata[f"{arch}.attention.key_length"] = u32(args.head_dim)
    mx.save_gguf(str(path), weights, metadata)
    return path
