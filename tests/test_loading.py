"""Loading: aliases, Hugging Face / mlx-community directories, GGUF files and
their tokenizers, and the errors for files we cannot use."""

import json
import struct

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_lm_load

from mlx_kvcache import UserError, load, make_cache
from mlx_kvcache.gguf_tokenizer import load_tokenizer
from mlx_kvcache.loading import dequantized_weight, resolve
from mlx_kvcache.packaged_models import packaged_gguf
from tests.helpers import TINY_CONFIGS, tiny_model, write_gguf

PROMPT = "Long documents make the KV cache the largest thing in memory."


def logits(model, ids):
    return model(mx.array(ids)[None], cache=make_cache(model))


def save_directory(path, model, tokenizer, config, quantization=None):
    """An mlx-community style directory: config.json, safetensors, tokenizer."""
    path.mkdir()
    if quantization:
        nn.quantize(model, **quantization)
        config = dict(config, quantization=quantization)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(path))
    return path


def smollm2_config(model):
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}


def test_smollm2_alias_resolves_offline_to_the_packaged_gguf():
    path = resolve("smollm2")
    assert path == packaged_gguf("smollm2") and path.suffix == ".gguf"
    assert resolve(None) == path


def test_directory_matches_gguf(tmp_path, smollm2):
    model, tokenizer = smollm2
    directory = save_directory(tmp_path / "smollm2", model, tokenizer, smollm2_config(model))
    model2, tokenizer2 = load(str(directory))
    ids = tokenizer.encode(PROMPT)
    assert tokenizer2.encode(PROMPT) == ids
    assert mx.array_equal(logits(model2, ids), logits(model, ids))
    assert tokenizer2.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    ) == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                       add_generation_prompt=True)


def test_mlx_4bit_directory_matches_mlx_lm_load(tmp_path, smollm2):
    model, tokenizer = smollm2
    float_model, _ = load("smollm2")
    directory = save_directory(tmp_path / "smollm2-4bit", float_model, tokenizer,
                               smollm2_config(model), {"group_size": 64, "bits": 4})
    ours, _ = load(str(directory), dequantize=False)
    assert isinstance(ours.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    theirs, _ = mlx_lm_load(str(directory))
    ids = tokenizer.encode(PROMPT)
    expected = theirs(mx.array(ids)[None])
    assert mx.allclose(logits(ours, ids), expected, atol=1e-4)
    # Dequantized (the CPU default) computes the same function in float32.
    dequantized, _ = load(str(directory))
    assert dequantized.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    assert mx.allclose(logits(dequantized, ids), expected, atol=2e-2)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_dequantized_weights_are_mlx_dequantize_in_float32(bits):
    # numpy unpacks 2/4/8 bits (MLX's CPU dequantize is slow there); 3, 5 and 6
    # (packed across words) go to MLX with float32 scales: either way the same
    # float32 weights as scale * q + bias computed in float32.
    layer = nn.QuantizedLinear(256, 48, bias=True, group_size=32, bits=bits)
    layer.scales, layer.biases = (x.astype(mx.float16) for x in (layer.scales, layer.biases))
    expected = mx.dequantize(layer.weight, layer.scales.astype(mx.float32),
                             layer.biases.astype(mx.float32), 32, bits)
    weight = dequantized_weight(layer)
    assert weight.dtype == mx.float32 and weight.shape == (48, 256)
    assert mx.array_equal(weight, expected)
    # MLX's own dequantize works in the scales' float16 (GGUF's): within its rounding.
    float16 = mx.dequantize(layer.weight, layer.scales, layer.biases, 32, bits)
    assert float16.dtype == mx.float16
    assert mx.allclose(weight, float16.astype(mx.float32), rtol=1e-3, atol=1e-3)


def test_multimodal_gemma3_directory_loads_its_language_model(tmp_path, smollm2):
    # mlx-community's Gemma 3 conversions are the multimodal model: the text
    # config nested under text_config, weights under language_model., a
    # vision tower beside them, quantized.
    _, tokenizer = smollm2
    model = tiny_model("gemma3")
    nn.quantize(model, group_size=32, bits=4)
    weights = {f"language_model.{k}": v for k, v in tree_flatten(model.parameters())}
    weights["vision_tower.patch_embedding.weight"] = mx.zeros((8, 8))
    directory = tmp_path / "gemma-3-4bit"
    directory.mkdir()
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "gemma3", "text_config": TINY_CONFIGS["gemma3"], "vocab_size": 320,
        "quantization": {"group_size": 32, "bits": 4}}))
    tokenizer.save_pretrained(str(directory))
    ours, _ = load(str(directory), dequantize=False)
    theirs, _ = mlx_lm_load(str(directory))
    ids = [(7 * i + 3) % 320 for i in range(30)]
    assert ours.sliding_windows == [8, None, 8, None]
    assert mx.allclose(logits(ours, ids), theirs(mx.array(ids)[None]), atol=1e-4)


@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_gguf_matches_the_model_it_was_written_from(tmp_path, name, dtype):
    model = tiny_model(name)
    path = write_gguf(tmp_path / f"{name}.gguf", model, dtype=dtype)
    loaded, tokenizer = load(str(path))
    text = "hello world, " * 30  # long enough for RoPE scaling to matter
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    tol = 1e-4 if dtype == mx.float32 else 5e-2
    assert mx.allclose(logits(loaded, ids), logits(model, ids), atol=tol)


def test_gguf_byte_level_tokenizer_merges_and_specials(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", tiny_model("qwen3"))
    _, tokenizer = load(str(path))
    hello = tokenizer.encode("hello")
    assert len(hello) == 1  # h e -> he, l l -> ll, he ll -> hell, hell o -> hello
    assert tokenizer.encode("<|im_end|>") == [tokenizer.eos_token_id]
    assert tokenizer.eos_token_ids == {tokenizer.eos_token_id}


def test_gguf_sentencepiece_tokenizer_round_trips():
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello",
              "\u2581hello", "or", "wor", "worl", "world", "\u2581world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))][::-1]
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": mx.array(scores),
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.unknown_token_id": mx.array(0, dtype=mx.uint32),
    }
    tokenizer = load_tokenizer(metadata)
    ids = tokenizer.encode("hello world")
    assert ids == [1, tokens.index("\u2581hello"), tokens.index("\u2581world")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
    # Characters outside the vocabulary fall back to their UTF-8 bytes.
    ids = tokenizer.encode("hé", add_special_tokens=False)
    assert tokens.index("<0xC3>") in ids and tokens.index("<0xA9>") in ids
    assert tokenizer.decode(ids) == "hé"
    detokenizer = tokenizer.detokenizer
    for token in tokenizer.encode("hello world", add_special_tokens=False):
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == "hello world"


def _tensor_type_offset(data: bytes, name: str) -> int:
    """Byte offset of a tensor's ggml type field in a GGUF header."""
    at = data.index(name.encode()) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims


def test_gguf_unsupported_quant_type_is_named(tmp_path):
    # IQ4_XS (type 23): an importance-matrix type nobody here reads.
    path = write_gguf(tmp_path / "iq4.gguf", tiny_model("qwen3"))
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, _tensor_type_offset(data, "blk.0.attn_q.weight"), 23)
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="'blk.0.attn_q.weight' is IQ4_XS"):
        load(str(path))


def test_gguf_truncated_or_corrupt(tmp_path):
    path = write_gguf(tmp_path / "whole.gguf", tiny_model("qwen3"))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated GGUF"):
        load(str(truncated))
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(data[:200])
    with pytest.raises(UserError, match="corrupt GGUF"):
        load(str(header_cut))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"\x00" * 4096)
    with pytest.raises(UserError, match="not a GGUF file"):
        load(str(garbage))


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", tiny_model("qwen3"), architecture="gpt2")
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        load(str(path))
    directory = tmp_path / "neox"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(dict(TINY_CONFIGS["qwen3"], model_type="gpt_neox")))
    mx.save_safetensors(str(directory / "model.safetensors"), {"x": mx.zeros(1)})
    with pytest.raises(UserError, match="unsupported architecture 'gpt_neox'"):
        load(str(directory))


def test_unknown_names_and_missing_paths():
    with pytest.raises(UserError, match="unknown model 'lama3'"):
        resolve("lama3")
    with pytest.raises(UserError, match="no such file or directory"):
        resolve("/nonexistent/model.gguf")
