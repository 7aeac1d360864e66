import os

import pytest
import torch

# keep converted weights of the embedded model out of the user's home during tests
os.environ.setdefault("CACHEDATTENTION_HOME", os.path.join(os.path.expanduser("~"), ".cache", "cachedattention-test"))
torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny model per family, with its transformers reference."""
    from tests.tiny_models import make_tiny_model

    out = {}
    for kind in ("llama", "llama-tied", "qwen2", "mistral"):
        path = tmp_path_factory.mktemp(kind)
        out[kind] = (path, make_tiny_model(kind, path))
    return out


@pytest.fixture(scope="session")
def embedded_llm():
    from cachedattention import LLM

    return LLM()
