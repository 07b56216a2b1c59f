"""Model ports: each layer's attention calls its cache policy's `attend`."""

from mlx_kvcache.errors import UserError

from . import gemma3, llama, qwen2, qwen3

# config.json's model_type -> port. Mistral's dense models are Llama's graph.
ARCHITECTURES = {
    "gemma3": gemma3,
    "gemma3_text": gemma3,
    "llama": llama,
    "mistral": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
}


def build_model(config: dict):
    """An uninitialised model for a Hugging Face style config dict."""
    model_type = config.get("model_type")
    port = ARCHITECTURES.get(model_type)
    if port is None:
        raise UserError(
            f"unsupported architecture {model_type!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return port.Model(port.ModelArgs.from_dict(config))
