"""python -m mlx_kvcache.doctor: as a user runs it here (CPU, no kernels), and
in-process on a faked GPU with a broken kernel variant."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_kvcache import attention, doctor, kernels
from tests.test_kernel_probe import wrong


def run_doctor(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mlx_kvcache.doctor", *args],
                          capture_output=True, text=True, env=env or os.environ, timeout=300)


def test_the_doctor_on_this_cpu_reports_and_exits_0():
    done = run_doctor()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    heads = [line.split()[0] for line in lines]
    for head in ("platform", "versions", "device", "kernels", "references", "timing", "model",
                 "verdict"):
        assert head in heads, done.stdout
    assert f"mlx {mx.__version__}" in done.stdout
    assert "kernels    not used: no GPU backend" in done.stdout
    assert lines[-1].startswith("verdict    OK: no fused kernels here")
    assert "model      smollm2: " in done.stdout and done.stderr == ""


def test_the_doctor_speaks_json():
    done = run_doctor("--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["references"]["ok"]
    assert report["kernels"] == {"used": False, "why": "no GPU backend", "variants": []}
    assert report["timing"]["reference_ms"] > 0 and report["timing"]["fused_ms"] is None
    assert report["versions"]["mlx"] == mx.__version__


@pytest.mark.skipif(not doctor.blas().get("openblas_loaded") or not doctor.suggested_coretype(),
                    reason="needs the preloaded OpenBLAS on an AVX2 CPU (make test)")
def test_the_doctor_names_openblas_generic_kernels_and_the_fix():
    # What an OpenBLAS too old for the CPU picks by itself (Debian 12's on newer Xeons).
    done = run_doctor("--json", env={**os.environ, "OPENBLAS_CORETYPE": "Prescott"})
    report = json.loads(done.stdout)
    assert report["blas"]["openblas_core"] == "Prescott"
    suggested = report["blas"]["suggested_coretype"]
    assert f"start Python with OPENBLAS_CORETYPE={suggested}" in report["verdict"]
    fixed = json.loads(run_doctor("--json", env={**os.environ,
                                                 "OPENBLAS_CORETYPE": suggested}).stdout)
    assert fixed["blas"]["openblas_core"] == suggested
    assert "OPENBLAS_CORETYPE" not in fixed["verdict"]


def test_a_broken_variant_makes_the_doctor_fail(fake_gpu, capsys):
    fake_gpu("refresh_scores", wrong(attention.refresh_scores_reference))
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    variants = doctor.doctor_variants()
    refresh = [v for v in variants if v.kernel == "refresh_scores"]
    assert f"kernels    {len(variants) - len(refresh)} of {len(variants)} variants agree" in out
    assert out.count("  disabled refresh_scores (") == len(refresh)
    assert f"BROKEN: {len(refresh)} of {len(variants)} kernel variants disabled" in out
    # The honest sparse kernel was timed at the long-context shape.
    assert "fused not used here" not in out


def test_every_kernel_variant_passes_when_the_kernels_are_honest(fake_gpu, capsys):
    assert doctor.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kernels"]["used"] and all(v["ok"] for v in report["kernels"]["variants"])
    assert {v["variant"].split()[0] for v in report["kernels"]["variants"]} == {
        "sparse_attention", "refresh_scores"}
    assert report["timing"]["fused_ms"] > 0
    assert report["verdict"].startswith("OK: ")


def test_forcing_the_references_is_reported(monkeypatch):
    monkeypatch.setattr(kernels, "KERNELS", {"sparse_attention_partials": None})
    monkeypatch.setattr(kernels.mx, "default_device", lambda: mx.Device(mx.gpu))
    monkeypatch.setenv(kernels.FORCE_REFERENCE, "1")
    assert doctor.probes() == {"used": False, "why": "forced off by MLX_KVCACHE_REFERENCE",
                               "variants": []}
