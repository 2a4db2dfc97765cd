"""Bit packing and QuantLinear (torch backend): round trips, layout, gradients, memory."""

import warnings

import pytest
import torch
from torch import nn

import projq_train.quant.linear as linear
from projq_train.quant.linear import QuantLinear, dequantize_once, swap_in_quant_linears, triton_ready
from projq_train.quant.pack import (
    PACKING,
    PackedWeight,
    dequantize_packed,
    pack,
    packed_length,
    packed_storage_bits,
    unpack,
)
from projq_train.quant.rotation import rotate
from projq_train.quant.rtn import rtn_quantize
from tests.conftest import peak_allocated_bytes


def bitstream_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (K, N) codes bit by bit: code k of column n at stream bit bits*k, word = bit // 32."""
    K, N = codes.shape
    words = torch.zeros(packed_length(K, bits), N, dtype=torch.int64)
    for k in range(K):
        for t in range(bits):
            bit = bits * k + t
            words[bit // 32] |= ((codes[k].long() >> t) & 1) << (bit % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("length", [1, 31, 32, 33, 100])
def test_pack_matches_the_bit_stream_and_round_trips(bits, length):
    codes = torch.randint(0, 2**bits, (length, 5), dtype=torch.uint8)
    words = pack(codes, bits)
    assert words.dtype == torch.int32 and torch.equal(words, bitstream_reference(codes, bits))
    assert torch.equal(unpack(words, bits, length), codes)
    along_cols = pack(codes.T, bits, dim=1)
    assert torch.equal(along_cols, words.T) and torch.equal(unpack(along_cols, bits, length, dim=1), codes.T)


def test_three_bit_unit_is_32_codes_in_3_words_with_two_split_codes():
    L, W, pieces = PACKING[3]
    assert (L, W) == (32, 3)
    split = sorted({k for k, *_ in pieces if sum(p[0] == k for p in pieces) == 2})
    assert split == [10, 21]
    # all 96 bits used exactly once
    assert sum(width for *_, width in pieces) == 96
    codes = torch.zeros(32, 1, dtype=torch.uint8)
    codes[10] = 0b111  # bits 30, 31 of word 0 and bit 0 of word 1
    assert pack(codes, 3)[:, 0].tolist() == [-(2**31) + 2**30, 1, 0]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape,group_size", [((48, 64), 32), ((33, 100), -1), ((7, 96), 32)])
@pytest.mark.parametrize("scale_bits", [16, 8])
def test_packed_weight_round_trip_is_exact(bits, shape, group_size, scale_bits):
    q = rtn_quantize(
        torch.randn(*shape) * 10.0 ** torch.randint(-3, 2, (shape[0], 1)), bits, group_size, scale_bits
    )
    q.g_idx = q.g_idx[torch.randperm(shape[1])]  # act-order style group map
    pw = PackedWeight.from_quantized(q)
    assert pw.scale_bits == scale_bits and (pw.scale_exponent is not None) == (scale_bits == 8)
    back = pw.unpack()
    for field in ("codes", "scales", "zeros", "g_idx", "scale_bits"):
        assert torch.equal(torch.as_tensor(getattr(back, field)), torch.as_tensor(getattr(q, field))), field
    assert torch.equal(pw.dequantize(), q.dequantize())
    kernel_view = (pw.qweight, pw.qzeros, pw.float_scales(), pw.g_idx)  # fp16 scales, as GPTQ kernels read
    assert pw.float_scales().dtype == torch.float16
    assert torch.equal(dequantize_packed(*kernel_view, bits, torch.float32), q.dequantize().T)
    assert pw.storage_bits == packed_storage_bits(*shape, bits, group_size, scale_bits)


def test_eight_bit_scales_cost_8_bits_a_group_plus_an_exponent_a_layer():
    assert packed_storage_bits(4096, 4096, 3, 64, 16) - packed_storage_bits(4096, 4096, 3, 64, 8) == (
        8 * 4096 * 64 - 32
    )
    assert packed_storage_bits(576, 576, 3, 64, 8) / 576**2 == pytest.approx(3 + 11 / 64, abs=1e-4)
    with pytest.raises(ValueError, match=r"scale_bits must be one of \(8, 16\), got 4"):
        packed_storage_bits(64, 64, 3, 64, 4)


def test_packing_refuses_scales_that_8_bits_do_not_store():
    q = rtn_quantize(torch.randn(8, 64), 3, 32, scale_bits=8)
    q.scales[0, 0] *= 1.01  # between two e4m3 values
    with pytest.raises(ValueError, match="not e4m3 values times one power of two"):
        PackedWeight.from_quantized(q)


def test_packed_weight_from_tensors_checks_shapes():
    pw = PackedWeight.from_quantized(rtn_quantize(torch.randn(8, 64), 3, 32))
    tensors = pw.tensors()
    assert PackedWeight.from_tensors(tensors, 3, 32, 64, 8).bits == 3
    with pytest.raises(ValueError, match=r"packed 'qweight' has shape \(6, 8\), expected \(12, 8\)"):
        PackedWeight.from_tensors(tensors, 3, 32, 128, 8)
    with pytest.raises(KeyError, match="missing 'scales'"):
        PackedWeight.from_tensors({k: v for k, v in tensors.items() if k != "scales"}, 3, 32, 64, 8)
    eight = PackedWeight.from_quantized(rtn_quantize(torch.randn(8, 64), 3, 32, scale_bits=8)).tensors()
    assert torch.equal(PackedWeight.from_tensors(eight, 3, 32, 64, 8).scale_exponent, eight["scale_exponent"])
    with pytest.raises(KeyError, match="missing 'scale_exponent'"):
        PackedWeight.from_tensors({k: v for k, v in eight.items() if k != "scale_exponent"}, 3, 32, 64, 8)


def make_layer(bits=3, out_f=24, in_f=64, gs=32, bias=True, scale_bits=16, rotated_inputs=False, **kwargs):
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=bias)
    W = rotate(dense.weight.detach()) if rotated_inputs else dense.weight.detach()
    pw = PackedWeight.from_quantized(rtn_quantize(W, bits, gs, scale_bits), rotated_inputs)
    return QuantLinear.from_packed(pw, dense.bias, **kwargs), pw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale_bits,rotated_inputs", [(16, False), (8, False), (16, True)])
def test_quant_linear_matches_dense_reference(dtype, scale_bits, rotated_inputs):
    """``pw.dequantize()`` is the weight in the model's basis, a rotated layer's too."""
    layer, pw = make_layer(scale_bits=scale_bits, rotated_inputs=rotated_inputs)
    assert layer.scales.element_size() * 8 == scale_bits
    x = torch.randn(2, 5, 64)
    ref = x.to(dtype).float() @ pw.dequantize().to(dtype).float().T + layer.bias.to(dtype).float()
    y = layer(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 5, 24)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("save_dequantized,rotated_inputs", [(False, False), (True, False), (False, True)])
def test_gradient_flows_to_the_input_only(save_dequantized, rotated_inputs):
    layer, pw = make_layer(save_dequantized=save_dequantized, rotated_inputs=rotated_inputs)
    x = torch.randn(3, 64, dtype=torch.float64).float().requires_grad_()
    dense_x = x.detach().clone().requires_grad_()
    layer(x).pow(2).sum().backward()
    (dense_x @ pw.dequantize().T + layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, dense_x.grad)
    assert list(layer.parameters()) == []
    assert all(not b.requires_grad and b.grad is None for b in layer.buffers())


def saved_numels(layer: QuantLinear, x: torch.Tensor) -> list[int]:
    """Sizes of the tensors autograd keeps from the forward pass for the backward pass."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        layer(x)
    return sizes


def test_dequantized_weight_is_kept_between_forward_and_backward_only_when_configured():
    x = torch.randn(1, 512, requires_grad=True)
    weight = 256 * 512
    assert max(saved_numels(make_layer(out_f=256, in_f=512, gs=128, bias=False)[0], x), default=0) < weight
    kept = make_layer(out_f=256, in_f=512, gs=128, bias=False, save_dequantized=True)[0]
    assert max(saved_numels(kept, x)) == weight


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantizing_blocks_of_rows_equals_the_whole_weight(bits, act_order):
    q = rtn_quantize(torch.randn(24, 256), bits, 32)
    if act_order:
        q.g_idx = q.g_idx[torch.randperm(256)]
    tensors = PackedWeight.from_quantized(q).tensors().values()
    whole = dequantize_packed(*tensors, bits, torch.float32)
    for rows in (slice(0, 64), slice(64, 256), slice(96, 160), slice(224, 256)):
        assert torch.equal(dequantize_packed(*tensors, bits, torch.float32, rows), whole[rows])
    unit = PACKING[bits][0]
    with pytest.raises(ValueError, match=f"must start at a multiple of {unit} at {bits} bits, got 5"):
        dequantize_packed(*tensors, bits, torch.float32, slice(5, 64))


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_in_blocks_of_rows_equals_the_whole_weight(monkeypatch, bits, dtype):
    layer, pw = make_layer(bits=bits, out_f=48, in_f=512, gs=64, bias=False)
    layer = layer.to(dtype)
    x = torch.randn(2, 7, 512, dtype=dtype)
    want_x = x.detach().clone().requires_grad_()
    (want_x @ pw.dequantize().to(dtype).T).float().pow(2).sum().backward()
    monkeypatch.setattr(linear, "DEQUANTIZE_BLOCK_ELEMENTS", 48 * 100)  # 64 rows: 8 blocks
    assert [r for r, _ in layer.dequantized_row_blocks(dtype)][:2] == [slice(0, 64), slice(64, 128)]
    got_x = x.detach().clone().requires_grad_()
    y = layer(got_x)
    y.float().pow(2).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, want_x.detach() @ pw.dequantize().to(dtype).T, atol=tol, rtol=tol)
    torch.testing.assert_close(got_x.grad, want_x.grad, atol=tol, rtol=tol)


def test_torch_backend_never_holds_a_whole_float_weight(monkeypatch):
    out_f, in_f, tokens = 256, 2048, 8
    layer, _ = make_layer(out_f=out_f, in_f=in_f, gs=64, bias=False)
    x = torch.randn(tokens, in_f, requires_grad=True)
    whole = out_f * in_f * 4  # the fp32 weight
    step = lambda: layer(x).sum().backward()  # noqa: E731
    assert peak_allocated_bytes(step) >= whole  # one block: the whole weight (the check can fail)
    monkeypatch.setattr(linear, "DEQUANTIZE_BLOCK_ELEMENTS", out_f * 256)  # 8 blocks of 256 rows
    # a block's fp32 weight and its int32 codes, the input's gradient, the output and its gradient
    bound = 2 * whole // 8 + 4 * (tokens * in_f + 2 * tokens * out_f)
    assert peak_allocated_bytes(step) <= bound


def test_dequantize_once_unpacks_each_weight_once_per_dtype_inside_the_block(monkeypatch):
    layer, _ = make_layer()
    model = nn.Sequential(layer, nn.ReLU(), make_layer(out_f=16, in_f=24, gs=-1)[0])
    x = torch.randn(4, 64)
    expected, expected_half = model(x), model(x.half())
    calls = []
    monkeypatch.setattr(
        linear, "dequantize_packed", lambda *args: calls.append(args[-1]) or dequantize_packed(*args)
    )
    with dequantize_once(model):
        for _ in range(3):
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(model(x.half()), expected_half, rtol=0, atol=0)
    assert calls == [torch.float32] * 2 + [torch.float16] * 2
    model(x)  # outside the block: unpacked again on every call, nothing kept
    assert len(calls) == 6 and layer._dense is None


def test_three_bit_group_128_stores_at_most_3_3_bits_per_weight():
    layer = QuantLinear(4096, 4096, bits=3, group_size=128)
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (384, 4096)
    assert layer.weight_bits() <= 3.3
    assert QuantLinear(4096, 11008, bits=2, group_size=128).weight_bits() <= 2.3
    assert QuantLinear(4096, 4096, bits=3, group_size=64, scale_bits=8).weight_bits() <= 3.18


@pytest.mark.parametrize("scale_bits", [16, 8])
def test_model_dtype_casts_leave_packed_buffers_alone(scale_bits):
    layer, pw = make_layer(scale_bits=scale_bits)
    layer.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.int32 and layer.scales.dtype == pw.scales.dtype
    assert torch.equal(layer.scales.float(), pw.scales.float()) and layer.bias.dtype == torch.bfloat16
    assert layer.packed().dequantize().equal(pw.dequantize())


def test_extra_repr_and_bad_settings():
    layer, _ = make_layer()
    assert "bits=3, group_size=32" in repr(layer) and "scale_bits" not in repr(layer)
    assert "scale_bits=8" in repr(make_layer(scale_bits=8)[0])
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantLinear(64, 8, bits=5, group_size=32)
    with pytest.raises(ValueError, match="does not divide in_features 64"):
        QuantLinear(64, 8, bits=3, group_size=48)


def test_swap_in_quant_linears_replaces_named_layers_and_checks_shapes():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 64)
    weights = {"0": PackedWeight.from_quantized(rtn_quantize(model[0].weight.detach(), 4, 32))}
    expected = model[2](torch.relu(x @ weights["0"].dequantize().T + model[0].bias))
    swap_in_quant_linears(model, weights)
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], nn.Linear)
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="packed weight is"):
        swap_in_quant_linears(model, {"2": weights["0"]})


def test_triton_backend_falls_back_with_a_warning_when_the_self_test_fails(monkeypatch):
    tested = []

    class BrokenKernels:
        @staticmethod
        def self_test(device, dtypes):
            tested.append(dtypes)
            return "forward at 3 bits differs"

    monkeypatch.setitem(__import__("sys").modules, "projq_train.quant.triton_kernels", BrokenKernels)
    monkeypatch.setattr(linear, "_TRITON_READY", {})
    cuda0 = torch.device("cuda", 0)
    with pytest.warns(UserWarning, match="torch backend on cuda:0: forward at 3 bits differs"):
        assert triton_ready(cuda0, torch.bfloat16) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert triton_ready(cuda0, torch.bfloat16) is False  # tested once, warned once
        assert triton_ready(cuda0, torch.float64) is False  # no kernels for it: not tested, no warning
        assert triton_ready(torch.device("cpu"), torch.float32) is False
    assert tested == [(torch.bfloat16,)]  # only the dtype in use is compiled and tested
    with pytest.raises(RuntimeError, match="got torch.float32 on cpu"):
        make_layer(backend="triton")[0](torch.randn(2, 64))
