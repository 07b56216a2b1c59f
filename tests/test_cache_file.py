"""Saving and restoring a whole cache: generation continues exactly as if it
had never stopped, and a cache is never restored onto another model or policy."""

import mlx.core as mx
import pytest

from mlx_kvcache import UserError, make_cache
from mlx_kvcache.cache_file import load_cache, save_cache
from tests.helpers import tiny_model

SETTINGS = [
    ("full", {}),
    ("streaming", {"budget": 24}),
    ("streaming", {"budget": 24, "positions": "cache"}),
    ("snapkv", {"budget": 30, "window": 8}),
    ("h2o", {"budget": 20}),
    ("refreshkv", {"budget": 12, "qc": 2}),
    ("refreshkv", {"budget_ratio": 0.2, "refresh": "stride", "refresh_every": 3,
                   "refresh_mode": "score"}),
    ("refreshkv", {"budget": 12, "full_cache_bits": 4, "kv_group_size": 32}),
    ("quantized", {"kv_bits": 4, "kv_group_size": 32}),
    ("quantized", {"kv_bits": 8, "kv_group_size": 32, "quantized_kv_start": 64}),
    ("kivi", {"kv_bits": 2, "residual": 16}),
    ("mixed", {"budget": 20, "kv_group_size": 32, "high_bits": 8}),
    ("mixed", {"budget": 20, "kv_group_size": 32, "importance": "refreshkv", "refresh_every": 3}),
    ("streaming", {"budget": 24, "kv_bits": 4, "kv_group_size": 32}),
]
PROMPT = [(7 * i + 3) % 256 for i in range(60)]
TOKENS = [(13 * i + 40) % 256 for i in range(16)]


def feed(model, cache, tokens, chunk=16):
    out = []
    for i in range(0, len(tokens), chunk):
        out.append(model(mx.array(tokens[i : i + chunk])[None], cache=cache))
    return mx.concatenate(out, axis=1)


def step_by_step(model, cache, tokens):
    return mx.concatenate([model(mx.array([[t]]), cache=cache) for t in tokens], axis=1)


@pytest.mark.parametrize("policy, args", SETTINGS, ids=lambda x: str(x))
@pytest.mark.parametrize("arch", ["llama3", "gemma3"])
def test_restore_continues_exactly(tmp_path, arch, policy, args):
    # gemma3: the policy on its global layers, an 8-token window on the others.
    model = tiny_model(arch)
    uninterrupted = make_cache(model, policy, **args)
    feed(model, uninterrupted, PROMPT[:-1])
    expected = step_by_step(model, uninterrupted, [PROMPT[-1]] + TOKENS)

    first = make_cache(model, policy, **args)
    feed(model, first, PROMPT[:-1])
    step_by_step(model, first, [PROMPT[-1]] + TOKENS[:7])
    path = tmp_path / "cache.safetensors"
    save_cache(path, first, model)
    restored = load_cache(path, model, policy=policy)
    got = step_by_step(model, restored, TOKENS[7:])
    assert mx.array_equal(got, expected[:, 8:])
    assert [c.stats() for c in restored] == [c.stats() for c in uninterrupted]
    assert [c.nbytes for c in restored] == [c.nbytes for c in uninterrupted]


def test_restore_onto_another_model_or_policy_is_refused(tmp_path):
    model = tiny_model("llama3")
    cache = make_cache(model, "refreshkv", budget=8)
    feed(model, cache, PROMPT)
    path = tmp_path / "cache.safetensors"
    save_cache(path, cache, model)
    with pytest.raises(UserError, match="saved from another model"):
        load_cache(path, tiny_model("qwen3"))
    with pytest.raises(UserError, match="saved from another model"):
        load_cache(path, tiny_model("llama3", seed=1))  # same shape, other weights
    with pytest.raises(UserError, match="holds a 'refreshkv' cache, not 'h2o'"):
        load_cache(path, model, policy="h2o")


def test_save_is_atomic_and_errors_are_user_errors(tmp_path):
    model = tiny_model("qwen3")
    cache = make_cache(model, "full")
    feed(model, cache, PROMPT)
    path = tmp_path / "cache.safetensors"
    save_cache(path, cache, model)
    before = path.read_bytes()
    feed(model, cache, TOKENS)
    save_cache(path, cache, model)  # replaces the file whole
    assert path.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.safetensors"]
    with pytest.raises(UserError, match="cannot write"):
        save_cache(tmp_path / "missing" / "c.safetensors", cache, model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(UserError, match="not a saved mlx-kvcache cache"):
        load_cache(tmp_path / "junk.safetensors", model)


def test_a_version_1_file_still_restores(tmp_path):
    # Version 1 had one policy for all layers and each layer's scalars alone.
    import json

    model = tiny_model("llama3")
    cache = make_cache(model, "h2o", budget=20)
    feed(model, cache, PROMPT)
    path = tmp_path / "cache.safetensors"
    save_cache(path, cache, model)
    arrays, metadata = mx.load(str(path), return_metadata=True)
    header = json.loads(metadata["mlx_kvcache"])
    header["format"] = "mlx_kvcache.cache/1"
    header["layers"] = [layer["scalars"] for layer in header["layers"]]
    mx.save_safetensors(str(path), arrays, metadata={"mlx_kvcache": json.dumps(header)})
    restored = load_cache(path, model, policy="h2o")
    assert mx.array_equal(step_by_step(model, restored, TOKENS),
                          step_by_step(model, cache, TOKENS))
