"""Models served offline from packages: the parted Qwen2.5-Coder and Gemma 3
GGUFs are assembled once, verified, and load (K-quants through llama.cpp's
gguf package) into models that match mlx-lm's own ports."""

import hashlib

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_kvcache import UserError, make_cache
from mlx_kvcache.gguf import check_file
from mlx_kvcache.packaged_models import PartedGGUF, assemble, packaged_gguf
from tests.helpers import mlx_lm_twin, ours_vs_mlx_lm

QWEN = "qwen2.5-coder-0.5b"


def parts(tmp_path, chunks):
    paths = []
    for i, chunk in enumerate(chunks):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


def test_assembly_verifies_the_whole_file_before_it_appears(tmp_path):
    chunks = [b"GGUF" + bytes(range(200)), bytes(100), b"tail"]
    whole = b"".join(chunks)
    good = PartedGGUF(packages=["p1", "p2", "p3"], filename="m.gguf", size=len(whole),
                      sha256=hashlib.sha256(whole).hexdigest())
    target = tmp_path / "cache" / "m.gguf"
    assemble(good, parts(tmp_path, chunks), target)
    assert target.read_bytes() == whole

    corrupt = [chunks[0], bytes([1]) + chunks[1][1:], chunks[2]]
    other = tmp_path / "cache" / "n.gguf"
    with pytest.raises(UserError, match="sha256 mismatch"):
        assemble(good, parts(tmp_path, corrupt), other)
    with pytest.raises(UserError, match="hold 304 bytes"):
        assemble(good, parts(tmp_path, chunks[:2]), other)
    # Nothing half-written is left to look like the model.
    assert sorted(p.name for p in other.parent.iterdir()) == ["m.gguf"]


def test_qwen_alias_is_the_verified_32k_k_quant_file(qwen):
    path = packaged_gguf(QWEN)
    assert path.stat().st_size == 491_400_064
    assert check_file(path) == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    model, tokenizer = qwen
    assert model.context_length == 32768 and len(model.layers) == 24
    assert (model.args.num_attention_heads, model.args.num_key_value_heads) == (14, 2)
    assert "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("alias", [QWEN, "gemma3-270m"])
def test_k_quants_dequantize_to_the_packages_own_values(alias):
    """gguf_package.dequantize hands the package BLOCKS_A_CALL blocks a call,
    not its rows: per quantized type, the largest tensor (many calls, the last
    one short) and a slice of rows (as offloading reads them) give exactly what
    the package's own row-wise call gives."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as package_dequantize

    from mlx_kvcache.gguf import read_header
    from mlx_kvcache.gguf_package import BLOCKS_A_CALL, dequantize

    path = packaged_gguf(alias)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    largest = {}
    for tensor in read_header(path)[1]:
        if tensor.type_name not in ("F32", "F16") and tensor.nbytes > getattr(
                largest.get(tensor.type_name), "nbytes", 0):
            largest[tensor.type_name] = tensor
    assert {"Q4_K", "Q6_K"} <= set(largest)
    for kind, tensor in largest.items():
        raw = mapped[tensor.offset : tensor.offset + tensor.nbytes]
        rows = np.asarray(raw).reshape(*tensor.shape[:-1], -1)
        expected = package_dequantize(rows, GGMLQuantizationType[kind]).reshape(tensor.shape)
        got = dequantize(raw, kind, tensor.shape)
        assert got.dtype == np.float32 and np.array_equal(got, expected), (kind, tensor.name)
        some = slice(3, 3 + min(5, tensor.shape[0] - 3))
        assert np.array_equal(dequantize(rows[some].ravel(), kind, expected[some].shape),
                              expected[some]), (kind, tensor.name)
    # Qwen's embedding alone spans hundreds of calls.
    assert max(t.nbytes for t in largest.values()) > 8 * BLOCKS_A_CALL * 34


def test_qwen_matches_mlx_lms_qwen2_port_token_for_token(qwen):
    model, tokenizer = qwen
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that returns the square of x."}],
        add_generation_prompt=True)
    ours, theirs = ours_vs_mlx_lm(model, prompt, 24)
    assert ours == theirs
    assert "def " in tokenizer.decode(ours)


GEMMA = "gemma3-270m"


def test_gemma_alias_is_the_verified_hybrid_model(gemma):
    path = packaged_gguf(GEMMA)
    assert path.stat().st_size == 253_113_024
    model, tokenizer = gemma
    args = model.args
    assert (len(model.layers), args.sliding_window, args.query_pre_attn_scalar) == (18, 512, 256)
    # Five local layers for every global one: 5, 11 and 17 see the whole context.
    assert [i for i, w in enumerate(model.sliding_windows) if w is None] == [5, 11, 17]
    assert tokenizer.encode("Hello")[0] == 2  # <bos>, as the file asks


def test_gemma_completes_like_mlx_lms_gemma3_text_port(gemma):
    # Both ports get the same weights; "Paris" also checks what they were read
    # as (llama.cpp stores Gemma's norms as 1 + w: left in, the text is garbage).
    model, tokenizer = gemma
    prompt = tokenizer.encode("The Eiffel Tower is located in the city of")
    ours, theirs = ours_vs_mlx_lm(model, prompt, 24)
    assert ours == theirs
    assert tokenizer.decode(ours).startswith("Paris")


def test_gemma_past_its_window_matches_mlx_lms_rotating_cache(gemma):
    # 800 tokens, prefilled in 256-token chunks, the last 32 fed one by one: the
    # local layers' 512-token windows slide during prefill and decode, as
    # mlx-lm's RotatingKVCache does. Measured: 3e-5 apart; with no windows at
    # all, 26 apart (a token-only check would pass: the greedy tokens agree).
    model, tokenizer = gemma
    with open("/usr/share/common-licenses/GPL-3") as f:
        prompt = tokenizer.encode(f.read())[:800]

    def logits(m, cache):
        for i in range(0, 768, 256):
            m(mx.array(prompt[i : i + 256])[None], cache=cache)
        return mx.concatenate([m(mx.array([[t]]), cache=cache) for t in prompt[768:]], axis=1)

    twin = mlx_lm_twin(model)
    expected = logits(twin, make_prompt_cache(twin))
    assert mx.allclose(logits(model, make_cache(model, "full")), expected, atol=1e-3)
