"""The throughput bench's transformers reference is the same model as ours: its family's class, our
weights (a Qwen3 keeps its head norms, a Qwen2 its biases), so the timing compares like with like."""

import pytest
import torch

from cachedattention.bench.throughput import _hf_model
from cachedattention.model.loader import load_model


@pytest.mark.parametrize("kind", ["llama-tied", "qwen2", "qwen3", "mistral"])
def test_the_reference_computes_what_the_checkpoint_does(kind, tiny_dirs):
    path, hf = tiny_dirs[kind]
    reference = _hf_model(load_model(str(path), "cpu", "float32"), "cpu", "float32")
    ids = torch.tensor([[5, 9, 13, 200, 17, 3]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("kind", ["mixtral", "gemma3", "mistral-window"])
def test_a_model_without_a_reference_gets_a_clear_refusal(kind, tiny_dirs):
    path, _ = tiny_dirs[kind]
    with pytest.raises(ValueError, match="takes dense Llama, Mistral and Qwen models"):
        _hf_model(load_model(str(path), "cpu", "float32"), "cpu", "float32")
