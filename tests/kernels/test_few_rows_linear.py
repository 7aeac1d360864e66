"""The few-rows linear kernel equals torch's linear, and the model's linear layers use it only where
it applies."""

import pytest
import torch
from torch.nn import functional as F

from cachedattention import LLM
from cachedattention.kernels.few_rows_linear import MAX_ROWS, FewRowsLinearKernel
from cachedattention.model.layers import Linear
from tests.util import rel_err


@pytest.fixture(scope="module")
def kernel() -> FewRowsLinearKernel:
    loaded = FewRowsLinearKernel.load()
    assert loaded is not None, "this machine has a C compiler and AVX-512: the kernel must build"
    return loaded


@pytest.mark.parametrize(
    "in_features, out_features",
    [(576, 1536), (1536, 576), (64, 4), (7, 5), (100, 3), (33, 1), (16, 1000)],  # tails of 16 and of 4
)
def test_matches_torch_linear(kernel, in_features, out_features):
    gen = torch.Generator().manual_seed(in_features * 7 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    for rows in (1, 2, 3, 4, 5, 8, 13, MAX_ROWS):  # whole tiles of 4 rows and every remainder
        x = torch.randn(rows, in_features, generator=gen)
        assert rel_err(kernel(x, weight), F.linear(x, weight)) <= 1e-5, f"{rows} rows"
        assert rel_err(kernel(x, weight, bias), F.linear(x, weight, bias)) <= 1e-5, f"{rows} rows, bias"


def test_takes_strided_rows(kernel):
    weight = torch.randn(40, 24)
    x = torch.randn(6, 48)[:, ::2]  # every other column: not contiguous
    assert rel_err(kernel(x, weight), F.linear(x, weight)) <= 1e-5
    rows = torch.randn(10, 24)[::3]  # rows further apart than their length
    assert rel_err(kernel(rows, weight), F.linear(rows, weight)) <= 1e-5


def test_refuses_bad_inputs_with_a_clear_error(kernel):
    weight = torch.randn(8, 16)
    with pytest.raises(ValueError, match="few-rows linear"):
        kernel(torch.randn(2, 15), weight)  # in_features differ
    with pytest.raises(ValueError, match="few-rows linear"):
        kernel(torch.randn(MAX_ROWS + 1, 16), weight)  # too many rows
    with pytest.raises(ValueError, match="few-rows linear"):
        kernel(torch.randn(2, 16, dtype=torch.float64), weight)
    with pytest.raises(ValueError, match="few-rows linear"):
        kernel(torch.randn(2, 16), torch.randn(16, 8).t())  # a weight that is not contiguous
    with pytest.raises(ValueError, match="bias"):
        kernel(torch.randn(2, 16), weight, torch.randn(7))


def test_linear_layer_calls_the_kernel_only_for_a_few_rows(kernel, monkeypatch):
    layer = Linear(24, 40, bias=True)
    layer.few_rows = kernel
    calls = []
    real_call = FewRowsLinearKernel.__call__
    monkeypatch.setattr(FewRowsLinearKernel, "__call__", lambda self, *a: calls.append(1) or real_call(self, *a))
    with torch.inference_mode():
        for rows in (1, MAX_ROWS, MAX_ROWS + 1, 200):
            x = torch.randn(rows, 24)
            assert rel_err(layer(x), F.linear(x, layer.weight, layer.bias)) <= 1e-5
    assert len(calls) == 2  # 1 and MAX_ROWS rows; larger calls keep torch's GEMM
    x = torch.randn(3, 24)
    layer(x).sum().backward()  # outside inference mode, with grads wanted: torch, which has a backward
    assert len(calls) == 2 and layer.weight.grad is not None


def test_the_engine_hands_few_row_calls_to_the_kernels(tiny_dirs):
    path, _ = tiny_dirs["qwen2"]
    model = LLM(model=str(path)).engine.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 3 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    assert all(m.few_rows is not None and m.packed is None for m in linears) and model.row_ops is not None
    model.use_few_row_kernels(None, None)  # no kernel: the head falls back to a oneDNN-packed copy
    assert model.lm_head.packed is not None and all(m.few_rows is None for m in linears)
