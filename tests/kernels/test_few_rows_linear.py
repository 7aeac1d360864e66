"""The few-rows linear kernel equals torch's linear, and the model's linear layers use it only where
it applies."""

import threading

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cachedattention import LLM, SamplingParams
from cachedattention.kernels.few_rows_linear import MAX_ROWS, MAX_ROWS_GGUF, FewRowsLinearKernel, QuantizedWeight
from cachedattention.model.gguf_iquants import IQ_BYTES
from cachedattention.model.gguf_kquants import (
    IQ4_BLOCKS,
    K_QUANT_BYTES,
    LEGACY_BYTES,
    kquant_weight,
    random_rows,
    reexpressed_weight,
)
from cachedattention.model.layers import Linear
from tests.tiny_models import hf_greedy
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
    one = torch.randn(24, 1).t()  # one row torch calls contiguous, with a row stride of 1
    assert one.is_contiguous() and one.stride(0) == 1
    assert rel_err(kernel(one, weight), F.linear(one, weight)) <= 1e-5


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
    real_run = FewRowsLinearKernel.run
    monkeypatch.setattr(FewRowsLinearKernel, "run", lambda self, *a: calls.append(1) or real_run(self, *a))
    with torch.inference_mode():
        for rows in (1, MAX_ROWS, MAX_ROWS + 1, 200):
            x = torch.randn(rows, 24)
            assert rel_err(layer(x), F.linear(x, layer.weight, layer.bias)) <= 1e-5
    assert len(calls) == 2  # 1 and MAX_ROWS rows; larger calls keep torch's GEMM
    x = torch.randn(3, 24)
    layer(x).sum().backward()  # outside inference mode, with grads wanted: torch, which has a backward
    assert len(calls) == 2 and layer.weight.grad is not None
    # with GGUF blocks attached, it reads them, for up to MAX_ROWS_GGUF rows
    blocks = QuantizedWeight.from_gguf_rows("Q8_0", random_gguf_rows("Q8_0", 40, 32, seed=3), 32)
    layer = Linear(32, 40, bias=False)
    with torch.no_grad():
        layer.weight.copy_(blocks.dequantize())
    layer.few_rows, layer.quantized = kernel, blocks
    with torch.inference_mode():
        for rows in (MAX_ROWS + 1, MAX_ROWS_GGUF, MAX_ROWS_GGUF + 1):
            x = torch.randn(rows, 32)
            assert rel_err(layer(x), F.linear(x, layer.weight)) <= 1e-5
    assert len(calls) == 4  # MAX_ROWS + 1 and MAX_ROWS_GGUF rows went to the kernel


def test_the_engine_hands_few_row_calls_to_the_kernels(tiny_dirs):
    path, _ = tiny_dirs["qwen2"]
    model = LLM(model=str(path)).engine.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 3 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    assert all(m.few_rows is not None for m in linears) and model.row_ops is not None
    # the head also keeps a oneDNN-packed copy for the 4-128 rows the kernel does not take
    assert model.lm_head.packed is not None and all(m.packed is None for m in linears if m is not model.lm_head)
    model.use_few_row_kernels(None, None)  # no kernels: torch, and the packed head
    assert model.lm_head.packed is not None and all(m.few_rows is None for m in linears) and model.row_ops is None


def random_gguf_rows(kind: str, out_features: int, in_features: int, seed: int) -> np.ndarray:
    """Raw GGUF rows of random Q4_1 or Q8_0 blocks (uint8 [out, bytes per row])."""
    rng = np.random.default_rng(seed)
    blocks = out_features * in_features // 32
    scales = rng.uniform(0.001, 0.05, (blocks, 1)).astype(np.float16).view(np.uint8)
    if kind == "Q4_1":
        mins = rng.uniform(-0.3, 0.0, (blocks, 1)).astype(np.float16).view(np.uint8)
        raw = np.concatenate([scales, mins, rng.integers(0, 256, (blocks, 16), dtype=np.uint8)], axis=1)
    else:
        raw = np.concatenate([scales, rng.integers(-128, 128, (blocks, 32), dtype=np.int8).view(np.uint8)], axis=1)
    return raw.reshape(out_features, -1)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("in_features, out_features", [(576, 1536), (96, 7), (32, 1), (1536, 6)])
def test_on_gguf_blocks_equals_the_float32_path_bit_for_bit(kernel, kind, in_features, out_features):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows = random_gguf_rows(kind, out_features, in_features, seed=in_features + out_features)
    weight = QuantizedWeight.from_gguf_rows(kind, rows, in_features)
    reference = torch.from_numpy(dequantize(rows, GGMLQuantizationType[kind]).astype(np.float32))
    assert torch.equal(weight.dequantize(), reference)  # GGUF's own values
    assert weight.matches(reference) and not weight.matches(reference + 1e-3)
    bias = torch.randn(out_features)
    for n in (1, 2, 3, 4, 5, 9, MAX_ROWS, MAX_ROWS_GGUF):  # up to 4: dequantized in registers; more: via L1
        x = torch.randn(n, in_features, generator=torch.Generator().manual_seed(n))  # (a seeded draw: a lone dot product may cancel)
        if n <= MAX_ROWS:  # the blocks are dequantized into the same tiles the float32 weight goes through
            assert torch.equal(kernel(x, weight, bias), kernel(x, reference, bias)), f"{n} rows"
            assert torch.equal(kernel(x, weight), kernel(x, reference)), f"{n} rows, no bias"
        assert rel_err(kernel(x, weight), F.linear(x, reference)) <= 1e-5
    with pytest.raises(ValueError, match="few-rows linear"):
        kernel(torch.randn(MAX_ROWS_GGUF + 1, in_features), weight)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit: torch.equal takes -0.0 for 0.0, which gguf's values are not."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def random_kquant_rows(kind: str, out_features: int, in_features: int, seed: int) -> np.ndarray:
    return random_rows(kind, out_features, in_features, np.random.default_rng(seed))


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("in_features, out_features", [(256, 7), (1536, 96), (512, 1)])
def test_k_quants_are_read_as_blocks_equal_to_gguf_bit_for_bit(kernel, kind, in_features, out_features):
    """A K-quant tensor re-expressed as the kernel's blocks dequantizes to gguf's own values, and the
    kernel over it equals the kernel over those values."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows = random_kquant_rows(kind, out_features, in_features, seed=in_features + out_features)
    weight = kquant_weight(kind, rows, in_features)
    assert weight.kind == {"Q2_K": "Q4_MS16", "Q3_K": "Q8_S16", "Q4_K": "Q4_1", "Q5_K": "Q8_M", "Q6_K": "Q8_S16"}[kind]
    reference = torch.from_numpy(dequantize(rows, GGMLQuantizationType[kind]).astype(np.float32))
    assert same_bits(weight.dequantize(), reference)
    bias = torch.randn(out_features)
    for n in (1, 3, 4, 5, MAX_ROWS):  # up to 4: dequantized in registers; more: via L1
        x = torch.randn(n, in_features)
        assert torch.equal(kernel(x, weight, bias), kernel(x, reference, bias)), f"{n} rows"


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_of_any_bytes_dequantize_as_gguf(kind):
    """Super-blocks of random bytes throughout (negative and subnormal scales and mins too): every
    row whose values are finite equals gguf's."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows = np.random.default_rng(7).integers(0, 256, (64, 2 * K_QUANT_BYTES[kind]), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # (NaN and infinite scales among them)
        reference = torch.from_numpy(dequantize(rows, GGMLQuantizationType[kind]).astype(np.float32))
        ours = kquant_weight(kind, rows, 512).dequantize()
    finite = reference.isfinite().all(dim=1)
    assert finite.sum() > 32
    assert same_bits(ours[finite], reference[finite])


@pytest.mark.parametrize("kind, as_kind", [("Q4_0", "Q4_1"), ("Q5_0", "Q8_0"), ("Q5_1", "Q8_M")])
def test_older_block_types_are_read_as_blocks_equal_to_gguf_bit_for_bit(kernel, kind, as_kind):
    """Q4_0, Q5_0 and Q5_1 (weights quantized by gguf itself, and blocks of random bytes) re-expressed
    as the kernel's blocks dequantize to gguf's own values, and the kernel over them equals the
    kernel over those values."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(3)
    floats = (rng.standard_normal((24, 160)) * rng.uniform(1e-3, 4, (24, 1))).astype(np.float32)
    for rows in (quantize(floats, GGMLQuantizationType[kind]),
                 rng.integers(0, 256, (64, 3 * LEGACY_BYTES[kind]), dtype=np.uint8)):
        in_features = rows.shape[1] // LEGACY_BYTES[kind] * 32
        with np.errstate(invalid="ignore", over="ignore"):  # (random bytes: NaN and infinite scales among them)
            reference = torch.from_numpy(dequantize(rows, GGMLQuantizationType[kind]).astype(np.float32))
            weight = reexpressed_weight(kind, rows, in_features)
            ours = weight.dequantize()
        finite = reference.isfinite().all(dim=1)
        assert weight.kind == as_kind and finite.sum() > 16
        if kind == "Q4_0":  # d * 8 + (-8 * d) is +0.0 where gguf's d * 0 may be -0.0: only a zero's sign differs
            assert torch.equal(ours[finite], reference[finite])
            differ = ours[finite].view(torch.int32) != reference[finite].view(torch.int32)
            assert (reference[finite][differ] == 0).all() and (ours[finite][differ] == 0).all()
        else:
            assert same_bits(ours[finite], reference[finite])
    weight = reexpressed_weight(kind, quantize(floats, GGMLQuantizationType[kind]), 160)
    reference = weight.dequantize()
    for n in (1, 3, 4, 5, MAX_ROWS):  # up to 4: dequantized in registers; more: via L1
        x = torch.randn(n, 160)
        assert torch.equal(kernel(x, weight), kernel(x, reference)), f"{n} rows"
    with pytest.raises(ValueError, match="whole blocks of 32"):
        reexpressed_weight(kind, rows, 100)


@pytest.mark.parametrize("kind, in_features", [("IQ4_NL", 160), ("IQ4_XS", 512)])
def test_iq4_blocks_are_read_as_q8_0_equal_to_gguf_bit_for_bit(kernel, kind, in_features):
    """IQ4_NL and IQ4_XS (random blocks with sane scales, and random bytes throughout) re-expressed
    as Q8_0 blocks dequantize to gguf's own values, in torch and in C, and the kernel over them
    equals the kernel over those values."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(11)
    weights, nbytes = IQ4_BLOCKS[kind]
    for rows in (random_rows(kind, 24, in_features, rng),
                 rng.integers(0, 256, (64, in_features // weights * nbytes), dtype=np.uint8)):  # fmt: skip
        with np.errstate(invalid="ignore", over="ignore"):  # (random bytes: NaN and infinite scales among them)
            reference = torch.from_numpy(dequantize(rows, GGMLQuantizationType[kind]).astype(np.float32))
            weight = reexpressed_weight(kind, rows, in_features)
            ours = weight.dequantize()
        finite = reference.isfinite().all(dim=1)
        assert weight.kind == "Q8_0" and finite.sum() > 16
        assert same_bits(ours[finite], reference[finite])
    weight = reexpressed_weight(kind, random_rows(kind, 24, in_features, rng), in_features)
    reference = weight.dequantize()
    assert torch.equal(kernel.dequantize(weight), reference)
    for n in (1, 3, 4, 5, MAX_ROWS):  # up to 4: dequantized in registers; more: via L1
        x = torch.randn(n, in_features)
        assert torch.equal(kernel(x, weight), kernel(x, reference)), f"{n} rows"
    with pytest.raises(ValueError, match="whole blocks of 32 \\(256\\)"):
        reexpressed_weight(kind, rows, in_features + 16)


@pytest.mark.parametrize("dtype, kind", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_16_bit_weights_are_read_as_they_are_equal_to_float32_bit_for_bit(kernel, dtype, kind):
    """A checkpoint's bfloat16 or float16 weights held as their 16 bits: the kernel over them equals
    the kernel over their float32 values (up to four rows in registers, more through L1), and so does
    a dequantization; weights that are not all such values, or rows not of whole blocks of 32, are not."""
    w = torch.randn(70, 160).to(dtype).float()
    w[0, :2] = torch.tensor([-0.0, 0.0])
    q = QuantizedWeight.from_halves(w)
    assert q.kind == kind and q.quants.dtype == torch.int16 and q.scales.shape == (70, 0)
    assert same_bits(q.dequantize(), w) and same_bits(kernel.dequantize(q), w) and same_bits(q.dequantize(slice(3, 5)), w[3:5])
    for n in (1, 3, 4, 5, MAX_ROWS, 100):
        x = torch.randn(n, 160)
        assert torch.equal(kernel.run(x, q, None), kernel.run(x, w, None)), f"{n} rows"
    assert QuantizedWeight.from_halves(torch.randn(4, 64)) is None
    assert QuantizedWeight.from_halves(torch.randn(4, 48).to(dtype).float()) is None
    later = torch.randn(4, 64).to(dtype).float()
    later[3, 5] = 0.1  # the first rows are 16-bit values, not the last
    assert QuantizedWeight.from_halves(later) is None


@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_a_gguf_s_16_bit_tensors_are_held_as_they_are(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    rows = quantize(np.random.default_rng(3).standard_normal((8, 96)).astype(np.float32), GGMLQuantizationType[kind])
    weight = reexpressed_weight(kind, rows, 96)
    assert weight.kind == kind and same_bits(weight.dequantize(), torch.from_numpy(dequantize(rows, GGMLQuantizationType[kind])))


@pytest.mark.parametrize("kind", ["TQ1_0", "TQ2_0"])
def test_ternary_blocks_are_read_as_q8_0_equal_to_gguf_bit_for_bit(kernel, kind):
    """TQ1_0 and TQ2_0 (gguf's own quantization of random weights, and random bytes throughout)
    re-expressed as Q8_0 blocks dequantize to gguf's own values, and the kernel over them equals the
    kernel over those values."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from cachedattention.model.gguf_kquants import TERNARY_BYTES

    rng = np.random.default_rng(12)
    quantized = quantize(rng.standard_normal((24, 512)).astype(np.float32), GGMLQuantizationType[kind])
    for rows in (quantized, rng.integers(0, 256, (64, 2 * TERNARY_BYTES[kind]), dtype=np.uint8)):
        with np.errstate(invalid="ignore", over="ignore"):  # (random bytes: NaN and infinite scales among them)
            reference = torch.from_numpy(dequantize(rows, GGMLQuantizationType[kind]).astype(np.float32))
            weight = reexpressed_weight(kind, rows, 512)
            ours = weight.dequantize()
        finite = reference.isfinite().all(dim=1)
        assert weight.kind == "Q8_0" and finite.sum() > 16 and len(reference[finite].unique()) > 3
        assert same_bits(ours[finite], reference[finite])
    weight = reexpressed_weight(kind, quantized, 512)
    reference = weight.dequantize()
    for n in (1, 3, 4, 5, MAX_ROWS):
        x = torch.randn(n, 512)
        assert torch.equal(kernel(x, weight), kernel(x, reference)), f"{n} rows"
    with pytest.raises(ValueError, match="whole super-blocks of 256"):
        reexpressed_weight(kind, quantized, 500)


@pytest.mark.parametrize("kind, as_kind", [("IQ1_S", "Q8_0"), ("IQ1_M", "Q8_S16"), ("IQ2_XXS", "Q8_0"),
                                           ("IQ2_XS", "Q8_S16"), ("IQ2_S", "Q8_S16"), ("IQ3_XXS", "Q8_0"),
                                           ("IQ3_S", "Q8_0")])  # fmt: skip
def test_grid_coded_iq_types_are_read_as_int8_blocks_equal_to_gguf_bit_for_bit(kernel, kind, as_kind):
    """IQ1-IQ3 super-blocks (random ones with sane scales, and random bytes throughout) re-expressed
    as int8 blocks dequantize to gguf's own values, and the kernel over them equals the kernel over
    those values."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(13)
    for rows in (random_rows(kind, 24, 512, rng), rng.integers(0, 256, (64, 2 * IQ_BYTES[kind]), dtype=np.uint8)):
        with np.errstate(invalid="ignore", over="ignore"):  # (random bytes: NaN and infinite scales among them)
            reference = torch.from_numpy(dequantize(rows, GGMLQuantizationType[kind]).astype(np.float32))
            weight = reexpressed_weight(kind, rows, 512)
            ours = weight.dequantize()
        finite = reference.isfinite().all(dim=1)
        assert weight.kind == as_kind and finite.sum() > 16 and reference[finite].abs().max() > 0
        assert same_bits(ours[finite], reference[finite])
    weight = reexpressed_weight(kind, random_rows(kind, 24, 512, rng), 512)
    reference = weight.dequantize()
    assert torch.equal(kernel.dequantize(weight), reference)
    for n in (1, 4, 5, MAX_ROWS):  # up to 4: dequantized in registers; more: via L1
        x = torch.randn(n, 512)
        assert torch.equal(kernel(x, weight), kernel(x, reference)), f"{n} rows"
    with pytest.raises(ValueError, match="whole super-blocks of 256"):
        reexpressed_weight(kind, rows, 384)


def test_quantized_weights_are_checked_when_made():
    rows = random_gguf_rows("Q4_1", 8, 64, seed=0)
    good = QuantizedWeight.from_gguf_rows("Q4_1", rows, 64)
    with pytest.raises(ValueError, match="Q4_1 and Q8_0"):
        QuantizedWeight.from_gguf_rows("Q4_K", rows, 64)
    with pytest.raises(ValueError, match="not a valid"):
        QuantizedWeight("Q4_1", good.quants[:, :-1], good.scales, good.mins, good.shape)  # short rows
    with pytest.raises(ValueError, match="not a valid"):
        QuantizedWeight("Q4_1", good.quants, good.scales, None, good.shape)  # Q4_1 needs its mins
    with pytest.raises(ValueError, match="not a valid"):
        QuantizedWeight("Q8_0", good.quants, good.scales.double(), None, good.shape)
    six = kquant_weight("Q6_K", random_kquant_rows("Q6_K", 2, 256, seed=0), 256)
    with pytest.raises(ValueError, match="not a valid"):  # a scale for each 16 weights, not 32
        QuantizedWeight("Q8_S16", six.quants, six.scales[:, ::2].contiguous(), None, six.shape)
    with pytest.raises(ValueError, match="not a valid"):
        QuantizedWeight("Q8_M", six.quants, six.scales[:, ::2].contiguous(), None, six.shape)  # Q8_M needs mins
    two = kquant_weight("Q2_K", random_kquant_rows("Q2_K", 2, 256, seed=0), 256)
    with pytest.raises(ValueError, match="not a valid"):  # a min for each 16 weights, as the scales
        QuantizedWeight("Q4_MS16", two.quants, two.scales, two.mins[:, ::2].contiguous(), two.shape)
    with pytest.raises(ValueError, match="not a valid"):  # nibbles, not int8
        QuantizedWeight("Q4_MS16", six.quants, six.scales, six.scales, six.shape)
    with pytest.raises(ValueError, match="super-blocks"):
        kquant_weight("Q4_K", random_kquant_rows("Q4_K", 2, 256, seed=0), 128)


def test_the_embedded_model_decodes_from_its_gguf_blocks(embedded_llm, caplog):
    from cachedattention.model.loader import attach_quantized

    model = embedded_llm.engine.model
    linears = dict((n, m) for n, m in model.named_modules() if isinstance(m, Linear))
    assert len(linears) == 30 * 7 + 1 and all(m.quantized is not None for m in linears.values())
    assert model.lm_head.quantized.kind == "Q8_0" and linears["model.layers.0.mlp.up_proj"].quantized.kind == "Q4_1"
    # blocks that do not dequantize to the layer's weight are refused, with a warning
    layer = linears["model.layers.0.self_attn.q_proj"]
    stale = {"model.layers.0.self_attn.q_proj.weight": linears["model.layers.0.self_attn.k_proj"].quantized}
    kept = layer.quantized
    layer.quantized = None
    try:
        assert attach_quantized(model, stale) == 0 and layer.quantized is None
        assert "do not match" in caplog.text
    finally:
        layer.quantized = kept


def test_blocks_file_round_trip_and_a_damaged_one(tmp_path):
    from cachedattention.model.gguf_loader import load_blocks, save_blocks

    blocks = {
        "a.weight": QuantizedWeight.from_gguf_rows("Q4_1", random_gguf_rows("Q4_1", 6, 64, seed=1), 64),
        "b.weight": QuantizedWeight.from_gguf_rows("Q8_0", random_gguf_rows("Q8_0", 5, 32, seed=2), 32),
        "c.weight": kquant_weight("Q5_K", random_kquant_rows("Q5_K", 3, 256, seed=3), 256),  # Q8_M
        "d.weight": kquant_weight("Q6_K", random_kquant_rows("Q6_K", 2, 512, seed=4), 512),  # Q8_S16
        "e.weight": kquant_weight("Q2_K", random_kquant_rows("Q2_K", 3, 512, seed=5), 512),  # Q4_MS16
        "f.weight": QuantizedWeight.from_halves(torch.randn(3, 96).bfloat16().float()),  # BF16: no scales
        "g.weight": QuantizedWeight.from_halves(torch.randn(2, 64).half().float()),  # F16
    }
    save_blocks(blocks, tmp_path / "blocks.safetensors")
    loaded = load_blocks(tmp_path / "blocks.safetensors")
    assert loaded.keys() == blocks.keys()
    for name, w in blocks.items():
        assert loaded[name].kind == w.kind and loaded[name].shape == w.shape
        assert torch.equal(loaded[name].dequantize(), w.dequantize())
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(ValueError, match="not a readable blocks file"):
        load_blocks(tmp_path / "bad.safetensors")


def test_a_damaged_blocks_file_leaves_the_model_on_float32(tiny_dirs, tmp_path, caplog):
    import shutil

    from cachedattention.model.embedded import BLOCKS_FILE

    path, hf = tiny_dirs["llama"]
    folder = tmp_path / "model"
    shutil.copytree(path, folder)
    (folder / BLOCKS_FILE).write_bytes(b"garbage")
    llm = LLM(model=str(folder))  # loads, with a warning, and serves from its float32 weights
    assert "GGUF blocks not used" in caplog.text
    assert all(m.quantized is None for m in llm.engine.model.modules() if isinstance(m, Linear))
    out = llm.generate([[5, 9, 13]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, [5, 9, 13], 6)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q5_K", "Q6_K", "Q2_K"])  # (Q4_1, Q8_0, Q8_M, Q8_S16, Q4_MS16)
def test_dequantizes_blocks_as_quantized_weight_does_bit_for_bit(kernel, kind):
    """The kernel's dequantization of a whole weight (for calls of more rows than it takes, on a
    weight held only as blocks) equals QuantizedWeight.dequantize, bit for bit."""
    if kind in K_QUANT_BYTES:
        weight = kquant_weight(kind, random_kquant_rows(kind, 37, 512, seed=5), 512)
    else:
        weight = QuantizedWeight.from_gguf_rows(kind, random_gguf_rows(kind, 37, 512, seed=5), 512)
    assert torch.equal(kernel.dequantize(weight), weight.dequantize())


def test_a_dequantized_call_reuses_its_threads_buffer_and_equals_the_dequantized_weights(kernel):
    """Calls of more rows than the kernel takes on weights held only as blocks dequantize into one
    buffer per thread, grown to the largest weight: each call's result is its own weight's, whatever
    the buffer held before, and another thread has its own buffer."""
    small = QuantizedWeight.from_gguf_rows("Q8_0", random_gguf_rows("Q8_0", 16, 64, seed=1), 64)
    large = kquant_weight("Q6_K", random_kquant_rows("Q6_K", 40, 256, seed=2), 256)
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(40, generator=gen)
    for weight, b in [(small, None), (large, bias), (small, None), (large, None)]:
        x = torch.randn(300, weight.shape[1], generator=gen)
        assert torch.equal(kernel.dequantized_linear(x, weight, b), F.linear(x, weight.dequantize(), b))
    buffer = kernel._scratch.buffer
    assert buffer.numel() == 40 * 256  # grown once, to the larger weight, and kept
    kernel.dequantized_linear(torch.randn(300, 64, generator=gen), small, None)
    assert kernel._scratch.buffer is buffer
    other = []
    thread = threading.Thread(target=lambda: (kernel.dequantized_linear(torch.ones(300, 64), small, None),
                                              other.append(kernel._scratch.buffer)))
    thread.start()
    thread.join()
    assert other[0] is not buffer and other[0].numel() == 16 * 64
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        kernel.dequantize(small, torch.empty(64, 16))
    # a call autograd records keeps a weight of its own: a later call rewriting the buffer changes nothing
    x = torch.randn(300, 64, generator=gen, requires_grad=True)
    y = kernel.dequantized_linear(x, small, None)
    kernel.dequantized_linear(torch.randn(300, 256, generator=gen), large, None)
    y.sum().backward()
    assert rel_err(x.grad, small.dequantize().sum(0).expand(300, -1)) <= 1e-6


def test_fp8_blocks_are_read_as_their_values_times_their_scales_bit_for_bit(kernel):
    """FP8 e4m3 bytes with a float32 scale for each 32 (every byte but NaN's: subnormals, both zeros,
    448): the kernel over them equals the kernel over float32 copies of the values, for a few rows in
    registers and more through L1, and so does its dequantization of the whole weight."""
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)  # (0x7F and 0xFF are e4m3's NaN)
    quants = codes[torch.randint(len(codes), (70, 320), generator=torch.Generator().manual_seed(3))]
    quants[0, : len(codes)] = codes
    scales = torch.rand(70, 10, generator=torch.Generator().manual_seed(4)) * 1e-2 + 1e-4
    scales[1, 0] = 2.0**-20  # subnormal values times a small scale
    q = QuantizedWeight("F8", quants.contiguous(), scales, None, (70, 320))
    w = (quants.view(torch.float8_e4m3fn).float().view(70, 10, 32) * scales[:, :, None]).reshape(70, 320)
    assert same_bits(q.dequantize(), w) and same_bits(kernel.dequantize(q), w)
    for n in (1, 3, 4, 5, MAX_ROWS, 100):
        x = torch.randn(n, 320)
        assert torch.equal(kernel.run(x, q, None), kernel.run(x, w, None)), f"{n} rows"
    with pytest.raises(ValueError, match="not a valid F8 weight"):
        QuantizedWeight("F8", quants.contiguous(), scales[:, :5].contiguous(), None, (70, 320))
