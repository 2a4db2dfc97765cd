"""Input rotations (``quant.rotate_inputs``): an orthogonal Q applied in O(n (a + b)), fixed on every
machine, and what it does to a grid."""

import pytest
import torch

from projq_train.config import QuantConfig
from projq_train.quant.calibrate import quantize_module
from projq_train.quant.linear import QuantLinear
from projq_train.quant.projq import hessian_factor
from projq_train.quant.rotation import (
    SIGN_SEED,
    kronecker_sides,
    rotate,
    rotate_factors,
    rotate_hessian,
    rotation_signs,
    splitmix64,
    unrotate,
)
from projq_train.quant.rtn import rtn_quantize


def rotation_matrix(n: int) -> torch.Tensor:
    """``Q (n, n)`` itself: the rotated rows of the identity."""
    return rotate(torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [7, 64, 96, 576])
def test_rotation_is_orthogonal_spreads_every_channel_and_unrotate_inverts_it(n):
    Q = rotation_matrix(n)
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64))
    if n != 7:  # a prime width has one side: the DCT of all of it
        assert Q.abs().max() <= 2 / n**0.5 + 1e-12  # no input channel stays in a few coordinates
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(rotate(x), x @ Q)
    torch.testing.assert_close(unrotate(rotate(x)), x)


def test_rotation_keeps_float32_under_autocast():
    x = torch.randn(4, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rotate(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, rotate(x))


def test_kronecker_sides_are_the_divisor_pair_closest_to_the_square_root():
    assert [kronecker_sides(n) for n in (7, 64, 576, 1536, 11008)] == [
        (1, 7),
        (8, 8),
        (24, 24),
        (32, 48),
        (86, 128),
    ]


def test_signs_are_a_fixed_sequence_so_artifacts_mean_the_same_everywhere():
    # SplitMix64's published first outputs from seed 0
    assert splitmix64(0, 3) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert rotation_signs(8).tolist() == [1 if z >> 63 else -1 for z in splitmix64(SIGN_SEED, 8)]
    assert abs(rotation_signs(4096).mean().item()) < 0.05


def test_hessian_and_its_factors_follow_the_rotation_and_keep_every_error_norm():
    n = 96
    Q = rotation_matrix(n)
    X = torch.randn(500, n, dtype=torch.float64) * torch.linspace(0.1, 10, n, dtype=torch.float64)
    H = X.T @ X / 500
    torch.testing.assert_close(rotate_hessian(H), Q.T @ H @ Q)
    F, F_inv = rotate_factors(hessian_factor(H, rel_floor=0))
    torch.testing.assert_close(F @ F.T, Q.T @ H @ Q)
    torch.testing.assert_close(F @ F_inv, torch.eye(n, dtype=torch.float64))
    E = torch.randn(8, n, dtype=torch.float64)
    torch.testing.assert_close(
        torch.trace(rotate(E) @ rotate_hessian(H) @ rotate(E).T), torch.trace(E @ H @ E.T)
    )


def outlier_weight(out_f=32, in_f=256) -> torch.Tensor:
    """A weight whose few input channels are 10 times larger than the rest (as in LLMs' layers)."""
    torch.manual_seed(0)
    W = torch.randn(out_f, in_f)
    W[:, [3, 77, 140, 201]] *= 10
    return W


@pytest.mark.parametrize("bits", [3, 4])
def test_rotated_grid_of_a_weight_with_outlier_channels_has_a_third_of_the_error_or_less(bits):
    W = outlier_weight()
    plain = (W - rtn_quantize(W, bits, -1).dequantize()).pow(2).sum()
    rotated = (W - unrotate(rtn_quantize(rotate(W), bits, -1).dequantize())).pow(2).sum()
    assert rotated < plain / 3


@pytest.mark.parametrize("method", ["gptq", "projq"])
def test_a_rotated_module_is_packed_rotated_compensated_in_the_weights_basis_and_computes_its_step0_weight(
    method,
):
    W = outlier_weight()
    X = torch.randn(2048, 256) * torch.linspace(0.2, 3, 256)
    H = X.T @ X / len(X)

    def quantize(rotate_inputs):
        cfg = QuantConfig(method=method, bits=3, group_size=64, clip=True, rotate_inputs=rotate_inputs)
        return quantize_module(W, H, cfg, 8, 3, 64)

    def h_error(qm):
        E = W - qm.step0_weight()
        return torch.trace(E @ H @ E.T) / torch.trace(W @ H @ W.T)

    plain, rotated = quantize(False), quantize(True)
    assert rotated.weight.rotated_inputs and not plain.weight.rotated_inputs
    assert h_error(rotated) < h_error(plain) / 2
    layer = QuantLinear.from_packed(rotated.weight)
    assert layer.rotated_inputs and "rotated_inputs=True" in repr(layer)
    x = torch.randn(4, 256)
    expected = x @ rotated.weight.dequantize().T  # in the weight's own basis
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.packed().dequantize(), rotated.weight.dequantize())
    # the adapter corrects W's error in W's basis: B A is the best rank-8 part of W − Ŵ there
    residual = W - rotated.weight.dequantize()
    assert h_error(rotated) < torch.trace(residual @ H @ residual.T) / torch.trace(W @ H @ W.T)
