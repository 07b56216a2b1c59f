"""Weight offloading: the layout (bundled FFN, checksums, atomic, space
checked), the resident-set plan, exact mode token for token against the
resident model on SmolLM2, memory within the budget, and one-line errors."""

import dataclasses
import filecmp
import gc
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler

from mlx_kvcache import UserError, load, make_cache
from mlx_kvcache.generate import generate_step
from mlx_kvcache import loading
from mlx_kvcache.offload import LAYOUT_DIR, from_gguf, layout_path, parse_budget, prepare
from mlx_kvcache.offload import layout as layout_file
from mlx_kvcache.offload.runtime import plan
from mlx_kvcache.offload.sparsity import calibrate, thresholded
from tests.helpers import tiny_model, write_gguf

PROMPT = "The capital of France is"


def greedy(model, prompt_ids, n=16):
    steps = generate_step(prompt_ids, model, make_cache(model, "full"), make_sampler(0.0))
    return [next(steps) for _ in range(n)]


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv(LAYOUT_DIR, str(tmp_path / "layouts"))
    model = tiny_model("qwen2", layers=4)
    return write_gguf(tmp_path / "tiny.gguf", model), model


def test_budget_sizes():
    assert parse_budget("2GB", 0) == 2 * 10**9
    assert parse_budget("1.5GiB", 0) == 3 * 2**29
    assert parse_budget("800 MB", 0) == 800 * 10**6
    assert parse_budget("40%", 1000) == 400
    for bad in ("lots", "0%", "150%", "-1GB", ""):
        with pytest.raises(UserError):
            parse_budget(bad, 1000)


def test_the_layout_holds_the_weights_bundled_and_checked(tiny_gguf):
    path, _ = tiny_gguf
    model, _ = load(str(path))
    written = prepare(str(path))
    layout = layout_file.read(written)
    names = list(layout.units)
    assert names == ["embed"] + [f"layer.{i}" for i in range(4)] + ["rest"]  # tied head
    assert layout.tied and layout.config["model_type"] == "qwen2"
    params = dict(tree_flatten(model.parameters()))
    fd = os.open(written, os.O_RDONLY)
    try:
        unit = layout.units["layer.2"]
        raw = layout_file.read_unit(fd, unit)
        # Neuron i: its gate row, up row and down column, side by side.
        bundle = mx.array(raw["mlp.bundle"])
        assert mx.array_equal(bundle[5, 0], params["model.layers.2.mlp.gate_proj.weight"][5])
        assert mx.array_equal(bundle[5, 2], params["model.layers.2.mlp.down_proj.weight"][:, 5])
        weights = layout_file.unbundle_ffn(layout_file.to_mlx(
            raw, {t.name: t.dtype for t in unit.tensors}))
        for name, array in weights.items():
            assert mx.array_equal(array, params[f"model.layers.2.{name}"]), name
        rows = layout_file.read_rows(fd, layout.units["embed"], [7, 3])
        assert mx.array_equal(mx.array(rows), params["model.embed_tokens.weight"][mx.array([7, 3])])
    finally:
        os.close(fd)


@pytest.mark.parametrize("budget", ["100%", "60%", "30%"])
def test_a_tiny_model_offloaded_is_token_identical(tiny_gguf, budget):
    path, _ = tiny_gguf
    model, tokenizer = load(str(path))
    ids = tokenizer.encode("hello there")
    offloaded, _ = load(str(path), weights_budget=budget)
    assert greedy(offloaded, ids) == greedy(model, ids)
    stats = offloaded.offload.stats()
    assert stats["streamed_units"] == (0 if budget == "100%" else stats["streamed_units"])
    if budget != "100%":
        assert stats["streamed_units"] > 0 and stats["bytes_read"] > stats["weight_bytes"]


def prepared_without_loading(name, monkeypatch):
    """prepare(name), with loading the model whole made impossible."""
    def refuse(*args, **kwargs):
        raise AssertionError("prepare loaded the whole model")

    monkeypatch.setattr(loading, "load", refuse)
    target = prepare(name)
    monkeypatch.undo()
    return target


def loaded_then_written(model, source, path):
    """The layout as writing the loaded model gives it: the reference."""
    layout_file.write(model, dataclasses.asdict(model.args), path, str(source))
    return path


def test_a_gguf_is_prepared_in_chunks_into_the_bytes_loading_gives(tiny_gguf, tmp_path,
                                                                  monkeypatch):
    path, _ = tiny_gguf
    # Chunks of a few rows (and of neurons in the FFN bundle), so every tensor
    # is assembled from several reads.
    monkeypatch.setattr(from_gguf, "CHUNK_BYTES", 1000)
    streamed = prepared_without_loading(str(path), monkeypatch)
    model, _ = load(str(path), dequantize=True)
    assert streamed.read_bytes() == loaded_then_written(model, path, tmp_path / "r").read_bytes()


@pytest.mark.parametrize("fixture, alias", [("smollm2", "smollm2"), ("gemma", "gemma3-270m")])
def test_real_ggufs_are_prepared_into_the_bytes_loading_gives(fixture, alias, request,
                                                             tmp_path, monkeypatch):
    # SmolLM2: Q4_1 and Q8_0, read by MLX when loaded whole. Gemma 3: K-quants
    # read by the gguf package, its norms stored as 1 + weight, a tied head.
    monkeypatch.setenv(LAYOUT_DIR, str(tmp_path / "layouts"))
    model, _ = request.getfixturevalue(fixture)
    streamed = prepared_without_loading(alias, monkeypatch)
    reference = loaded_then_written(model, loading.resolve(alias), tmp_path / "r.safetensors")
    assert filecmp.cmp(streamed, reference, shallow=False)


def test_a_gguf_that_does_not_match_its_config_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(LAYOUT_DIR, str(tmp_path / "layouts"))
    model = tiny_model("qwen2", layers=2)
    model.args.intermediate_size += 8  # the metadata now disagrees with the FFN
    path = write_gguf(tmp_path / "bad.gguf", model)
    with pytest.raises(UserError, match="weights do not match the config .misshapen: "
                       "model.layers.0.mlp.gate_proj.weight"):
        prepare(str(path))
    assert not (tmp_path / "layouts").exists() or not list((tmp_path / "layouts").iterdir())


def sizes_layout(sizes, rest=10, head=None):
    units = {"embed": layout_file.Unit("embed", [], 0, 50, 0)}
    offset = 50
    for i, size in enumerate(sizes):
        units[f"layer.{i}"] = layout_file.Unit(f"layer.{i}", [], offset, offset + size, 0)
        offset += size
    if head:
        units["head"] = layout_file.Unit("head", [], offset, offset + head, 0)
        offset += head
    units["rest"] = layout_file.Unit("rest", [], offset, offset + rest, 0)
    return layout_file.Layout(None, {}, "", head is None, units)


def test_the_plan_pins_the_most_bytes_the_budget_allows():
    layout = sizes_layout([100] * 8, head=400)
    everything = plan(layout, 10 + 800 + 400)
    assert everything.streamed == [] and not everything.prefetch
    # 700 bytes: the head (the largest) pinned, two layers streaming reserve.
    half = plan(layout, 710)
    assert "head" in half.pinned and half.prefetch and half.resident_bytes <= 710
    assert len(half.pinned) == 2 and len(half.streamed) == 7
    # Room for the head and one streamed layer only: no prefetch.
    tight = plan(layout, 10 + 400 + 100)
    assert not tight.prefetch and tight.pinned == ["head"] and tight.resident_bytes == 510
    with pytest.raises(UserError, match="smaller than its output head of this model"):
        plan(layout, 409)
    with pytest.raises(UserError, match="smaller than one layer"):
        plan(sizes_layout([100] * 8, head=50), 100)


def test_smollm2_offloaded_is_token_identical_and_within_budget(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer.encode(PROMPT)
    want = greedy(model, ids)
    # Writing the layout happens once per model, before any budget applies;
    # the bound below is what running under the budget costs.
    prepare("smollm2")
    for budget, mode in (("50%", "layers"), ("25%", "layers"), ("50%", "neurons")):
        gc.collect()
        before = mx.get_active_memory()  # the resident model of the fixture
        mx.reset_peak_memory()
        # Neurons mode at sparsity 0: every neuron with any activation is
        # read, so the tokens are the resident model's here too.
        offloaded, _ = load("smollm2", weights_budget=budget, offload=mode, ffn_sparsity=0.0)
        cache = make_cache(offloaded, "full")
        steps = generate_step(ids, offloaded, cache, make_sampler(0.0))
        got = [next(steps) for _ in range(len(want))]
        assert got == want, (budget, mode)
        stats = offloaded.offload.stats()
        kv = sum(c.nbytes for c in cache)
        # Stated overhead: the streamed unit's unbundled down projection and
        # the step's activations, within 32 MiB here.
        peak = mx.get_peak_memory() - before
        assert peak <= stats["budget_bytes"] + kv + (32 << 20), (budget, mode, peak)
        assert stats["streamed_units"] > 0 or stats.get("neuron_bytes_read")
        offloaded.offload.store.close()
        del offloaded, cache, steps


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mlx_kvcache.generate", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_the_cli_with_a_budget_writes_what_it_writes_without(smollm2):
    args = ["--prompt", PROMPT, "--max-tokens", "12"]
    resident = run_cli(*args)
    offloaded = run_cli(*args, "--weights-budget", "40%", "--offload", "layers")
    assert resident.returncode == 0 and offloaded.returncode == 0, offloaded.stderr
    assert offloaded.stdout == resident.stdout
    assert "weights: budget" in offloaded.stderr and "streamed" in offloaded.stderr


def test_bad_layouts_and_budgets_are_one_line(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    target = prepare(str(path))
    # Too small a budget.
    done = run_cli("--model", str(path), "--prompt", "hi", "--weights-budget", "1KB")
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert "is smaller than" in done.stderr
    # A layer's bytes damaged: the checksum says so when it is read.
    data = bytearray(target.read_bytes())
    layout = layout_file.read(target)
    data[layout.units["layer.1"].start + 11] ^= 0xFF
    target.write_bytes(bytes(data))
    done = run_cli("--model", str(path), "--prompt", "hi", "--weights-budget", "30%")
    assert done.returncode == 1 and "layer.1 fails its checksum" in done.stderr
    assert done.stderr.strip().count("\n") == 0
    # Truncated: refused before any read.
    target.write_bytes(bytes(data[: len(data) // 2]))
    done = run_cli("--model", str(path), "--prompt", "hi", "--weights-budget", "30%")
    assert done.returncode == 1 and "damaged offload layout" in done.stderr
    # Not a layout at all.
    target.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}        ")
    done = run_cli("--model", str(path), "--prompt", "hi", "--weights-budget", "30%")
    assert done.returncode == 1 and "damaged offload layout" in done.stderr


def test_a_full_disk_is_refused_and_leaves_nothing(tiny_gguf, monkeypatch):
    path, _ = tiny_gguf
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6, 1000))
    with pytest.raises(UserError, match="MiB needed"):
        prepare(str(path))
    folder = layout_path(path).parent
    assert not folder.exists() or list(folder.iterdir()) == []


def test_ffn_thresholds_skip_the_share_they_were_calibrated_for():
    model = tiny_model("qwen2", layers=3)
    tokens = list(range(3, 200))
    dense = model(mx.array(tokens)[None])
    thresholds = calibrate(model, tokens, [0.0, 0.5, 0.8])
    assert thresholds[0.0] == [0.0] * 3
    # Threshold 0 skips only neurons whose term is zero: the dense logits.
    with thresholded(model, thresholds[0.0]):
        assert mx.array_equal(model(mx.array(tokens)[None]), dense)
    for sparsity in (0.5, 0.8):
        with thresholded(model, thresholds[sparsity]) as mlps:
            for mlp in mlps:
                mlp.record = []
            sparse = model(mx.array(tokens)[None])
            skipped = [1 - mlp.record[0].astype(mx.float32).mean().item() for mlp in mlps]
        # On the calibration text itself, each layer skips its quantile's share.
        assert all(abs(s - sparsity) < 0.01 for s in skipped), skipped
        assert not mx.allclose(sparse, dense)
    assert mx.array_equal(model(mx.array(tokens)[None]), dense)  # the MLPs are back
    with pytest.raises(UserError, match="a share in"):
        calibrate(model, tokens, [1.0])
    with pytest.raises(UserError, match="needs a SwiGLU model"):
        calibrate(tiny_model("gemma3"), tokens, [0.5])


def thresholds_of(offloaded):
    return [layer.block.mlp._threshold for layer in offloaded.model.layers]


@pytest.mark.parametrize("sparsity, window", [(0.0, 0), (0.5, 0), (0.5, 2)])
def test_neurons_mode_computes_what_thresholding_computes(tiny_gguf, sparsity, window):
    path, _ = tiny_gguf
    model, tokenizer = load(str(path))
    ids = tokenizer.encode("hello there, hello world")
    offloaded, _ = load(str(path), weights_budget="60%", offload="neurons",
                        ffn_sparsity=sparsity, neuron_window=window)
    thresholds = thresholds_of(offloaded)
    assert (max(thresholds) > 0) == (sparsity > 0)
    with thresholded(model, thresholds):
        want = greedy(model, ids)
        # Logits of a prompt and of single steps: the reader's sum over the
        # neurons it read is the dense sum with the others zeroed.
        dense = model(mx.array(ids)[None])
    assert mx.allclose(offloaded(mx.array(ids)[None]), dense, atol=1e-4)
    assert greedy(offloaded, ids) == want
    stats = offloaded.offload.stats()
    assert stats["mode"] == "neurons" and stats["neuron_bytes_read"] > 0
    offloaded.offload.store.close()


def test_the_neuron_window_reads_less_and_stays_in_its_room(tiny_gguf):
    path, _ = tiny_gguf
    _, tokenizer = load(str(path))
    ids = tokenizer.encode("hello there")
    read = {}
    for window in (0, 4):
        offloaded, _ = load(str(path), weights_budget="80%", offload="neurons",
                            ffn_sparsity=0.5, neuron_window=window)
        caches = offloaded.offload.neuron_caches
        steps = generate_step(ids, offloaded, make_cache(offloaded, "full"), make_sampler(0.0))
        next(steps)
        before = offloaded.offload.stats()["neuron_bytes_read"]
        for _ in range(8):
            next(steps)
            assert caches[0].pool.free >= 0
        read[window] = offloaded.offload.stats()["neuron_bytes_read"] - before
        held = offloaded.offload.stats()["neuron_window_bytes"]
        assert (held > 0) == (window > 0)
        offloaded.offload.store.close()
    assert read[4] < read[0]


def test_neurons_mode_refuses_what_it_cannot_run_in_one_line(gemma, tmp_path, monkeypatch):
    monkeypatch.setenv(LAYOUT_DIR, str(tmp_path / "layouts"))
    # Gemma's FFN is GeGLU: no layout is written for it.
    done = run_cli("--model", "gemma3-270m", "--prompt", "hi", "--weights-budget", "50%",
                   "--offload", "neurons", env={LAYOUT_DIR: str(tmp_path / "layouts")})
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert "needs a SwiGLU model" in done.stderr
    assert not list((tmp_path / "layouts").glob("*.safetensors"))
    done = run_cli("--prompt", "hi", "--weights-budget", "50%", "--offload", "neurons",
                   "--ffn-sparsity", "1.5")
    assert done.returncode == 2 and "--ffn-sparsity" in done.stderr


def test_the_cli_runs_neurons_mode_and_says_what_it_read(smollm2, tmp_path):
    done = run_cli("--prompt", PROMPT, "--max-tokens", "8", "--weights-budget", "50%",
                   "--offload", "neurons", env={LAYOUT_DIR: str(tmp_path / "layouts")})
    assert done.returncode == 0, done.stderr
    assert "MiB of FFN neurons read" in done.stderr and done.stdout.strip()
    # The thresholds were calibrated once and kept beside the layout.
    assert list((tmp_path / "layouts").glob("*-neurons.thresholds.json"))


def test_neurons_mode_pins_whole_neuron_units_where_the_budget_allows(tiny_gguf):
    path, _ = tiny_gguf
    model, tokenizer = load(str(path))
    ids = tokenizer.encode("hello there")
    offloaded, _ = load(str(path), weights_budget="100%", offload="neurons", ffn_sparsity=0.5)
    with thresholded(model, thresholds_of(offloaded)):
        want = greedy(model, ids)
    assert greedy(offloaded, ids) == want
    stats = offloaded.offload.stats()
    assert stats["pinned_neuron_units"] == 4 and stats["neuron_bytes_read"] == 0
    assert stats["streamed_units"] == 0
    offloaded.offload.store.close()
