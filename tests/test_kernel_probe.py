"""The probe that stands between the fused kernels and the user, on a faked
GPU backend: a kernel that raises, one that returns wrong values and one that
returns NaN are each disabled with one warning, and generation matches the
reference path token for token; verdicts are remembered across processes and
forgotten when the kernel sources change."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_sampler

from mlx_kvcache import attention, kernel_probe, kernels, make_cache
from mlx_kvcache.generate import generate_step
from mlx_kvcache.models import build_model
from tests.helpers import TINY_CONFIGS

# Head dim 64, GQA group 2: shapes both kernels take.
CONFIG = dict(TINY_CONFIGS["llama3"], hidden_size=256, num_attention_heads=4,
              num_key_value_heads=2)
PROMPT = [(7 * i) % 300 + 10 for i in range(40)]


def raises(*args):
    raise RuntimeError("[metal_kernel] Unable to build kernel: error: use of undeclared "
                       "identifier 'simd_sum'\nmore compiler output")


def wrong(reference):
    return lambda *args: reference(*args) * 1.5 + 0.25


def nan(reference):
    return lambda *args: reference(*args) * mx.nan


FAULTS = {"raises": lambda reference: raises, "wrong": wrong, "nan": nan}


def greedy_tokens(n=24):
    mx.random.seed(3)
    model = build_model(CONFIG)
    mx.eval(model.parameters())
    cache = make_cache(model, "refreshkv", budget=12, refresh="stride", refresh_every=3)
    steps = generate_step(PROMPT, model, cache, make_sampler(0.0))
    return [next(steps) for _ in range(n)]


def reference_tokens(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setenv(kernels.FORCE_REFERENCE, "1")
        patch.setattr(kernels, "use_kernels", lambda: False)
        return greedy_tokens()


def warnings(captured: str):
    return [line for line in captured.splitlines() if "disabled" in line]


def test_honest_kernels_pass_their_probes_and_are_used(fake_gpu, capfd):
    sparse = fake_gpu("sparse_attention", attention.sparse_reference)
    refresh = fake_gpu("refresh_scores", attention.refresh_scores_reference)
    greedy_tokens()
    # One probe each, then every decode step (partial steps: sparse; refresh
    # steps: scores).
    assert sparse.calls > 10 and refresh.calls > 3
    assert warnings(capfd.readouterr().err) == []


@pytest.mark.parametrize("family", ["sparse_attention", "refresh_scores"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_faulty_kernel_is_disabled_with_one_warning_and_output_stays_correct(
        fake_gpu, monkeypatch, capfd, family, fault):
    want = reference_tokens(monkeypatch)
    faulty = fake_gpu(family, FAULTS[fault](attention.REFERENCES[family]))
    got = greedy_tokens()
    assert got == want
    assert faulty.calls == 1  # the probe; the reference served every step
    lines = warnings(capfd.readouterr().err)
    assert len(lines) == 1, lines
    assert family in lines[0] and "cpu" in lines[0] and "reference" in lines[0]
    expected = {"raises": "RuntimeError: [metal_kernel] Unable to build kernel",
                "wrong": "differs from the reference", "nan": "non-finite"}[fault]
    assert expected in lines[0] and "more compiler output" not in lines[0]


def test_a_wrong_kernel_would_have_changed_the_output(fake_gpu, monkeypatch):
    """The test above can fail: trusted blindly, the wrong kernel changes the tokens."""
    want = reference_tokens(monkeypatch)
    fake_gpu("sparse_attention", wrong(attention.sparse_reference))
    monkeypatch.setattr(kernel_probe, "trusted", lambda variant, references: True)
    assert greedy_tokens() != want


def sparse_variant():
    return kernel_probe.Variant("sparse_attention", "float32", 64, 2, 1)


def test_the_verdict_is_remembered_by_the_next_process(fake_gpu, capfd):
    faulty = fake_gpu("sparse_attention", wrong(attention.sparse_reference))
    assert not kernel_probe.trusted(sparse_variant(), attention.REFERENCES)
    assert faulty.calls == 1
    saved = json.loads(kernel_probe.probes_path().read_text())
    assert list(saved) == [kernel_probe.context()]

    # Another process: with no references to probe against, only the
    # remembered verdict can answer.
    code = ("from mlx_kvcache import kernel_probe as p\n"
            "v = p.Variant('sparse_attention', 'float32', 64, 2, 1)\n"
            "print(p.verdict_for(v, {}).ok, p.verdict_for(v, {}).remembered)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=os.environ, check=True).stdout
    assert out.split() == ["False", "True"]

    # This process, started afresh: remembered, not probed, warned once.
    kernel_probe.forget()
    capfd.readouterr()
    assert not kernel_probe.trusted(sparse_variant(), attention.REFERENCES)
    assert not kernel_probe.trusted(sparse_variant(), attention.REFERENCES)
    assert faulty.calls == 1
    lines = warnings(capfd.readouterr().err)
    assert len(lines) == 1 and "remembered" in lines[0]


def test_edited_sources_are_probed_again(fake_gpu, monkeypatch, tmp_path):
    faulty = fake_gpu("sparse_attention", wrong(attention.sparse_reference))
    assert not kernel_probe.trusted(sparse_variant(), attention.REFERENCES)
    # The kernel is fixed: its source changes.
    edited = tmp_path / "sources"
    edited.mkdir()
    for family in kernels.FAMILIES:
        for backend in ("metal", "cuda"):
            original = kernels.source_path(family, backend)
            (edited / original.name).write_text(original.read_text() + "\n// fixed\n")
    monkeypatch.setattr(kernels, "source_path", lambda family, backend: edited / (
        family + (".metal" if backend == "metal" else ".cu")))
    fixed = fake_gpu("sparse_attention", attention.sparse_reference)
    kernel_probe.forget()
    assert kernel_probe.trusted(sparse_variant(), attention.REFERENCES)
    assert fixed.calls == 1 and faulty.calls == 1
    assert len(json.loads(kernel_probe.probes_path().read_text())) == 2


def test_reprobe_ignores_what_is_remembered(fake_gpu, monkeypatch):
    fake_gpu("sparse_attention", wrong(attention.sparse_reference))
    assert not kernel_probe.trusted(sparse_variant(), attention.REFERENCES)
    fixed = fake_gpu("sparse_attention", attention.sparse_reference)
    kernel_probe.forget()
    monkeypatch.setenv(kernel_probe.REPROBE, "1")
    assert kernel_probe.trusted(sparse_variant(), attention.REFERENCES)
    assert fixed.calls == 1


@pytest.mark.parametrize("damage", ["not json {", "[1, 2]", '{"x": 3}'])
def test_a_damaged_file_is_probed_over(fake_gpu, damage):
    path = kernel_probe.probes_path()
    path.parent.mkdir(parents=True)
    path.write_text(damage)
    honest = fake_gpu("sparse_attention", attention.sparse_reference)
    assert kernel_probe.trusted(sparse_variant(), attention.REFERENCES)
    assert honest.calls == 1
    assert kernel_probe.context() in json.loads(path.read_text())


def test_an_unwritable_cache_directory_costs_only_a_probe(fake_gpu, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(kernel_probe.CACHE_DIR, str(blocker / "below"))
    honest = fake_gpu("sparse_attention", attention.sparse_reference)
    assert kernel_probe.trusted(sparse_variant(), attention.REFERENCES)
    assert honest.calls == 1


@pytest.mark.parametrize("variant", [
    kernel_probe.Variant("sparse_attention", "float16", 128, 4, 1),
    kernel_probe.Variant("sparse_attention", "bfloat16", 64, 7, 4),
    kernel_probe.Variant("refresh_scores", "float32", 80, 8, 1),
    kernel_probe.Variant("refresh_scores", "float16", 64, 4, 1, 4, 64),
])
def test_the_probe_inputs_fit_each_signature(fake_gpu, variant):
    """On the CPU the references stand in for both sides: they must agree
    exactly, at every dtype, with and without quantized keys."""
    reference = attention.REFERENCES[variant.kernel]
    inputs = kernel_probe._probe_inputs(variant)
    assert inputs[0].shape[1] == kernel_probe.PROBE_KV_HEADS * variant.group
    assert inputs[0].dtype == getattr(mx, variant.dtype)
    verdict = kernel_probe.probe(variant, reference)
    assert verdict.ok and verdict.max_error == 0.0
