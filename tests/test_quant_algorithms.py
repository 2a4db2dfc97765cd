"""Properties of the pure quantization functions: equalities, bounds, errors."""

import pytest
import torch

from projq_train.quant import (
    gptq_quantize,
    lowrank_compensation,
    projq,
    projq_quantize,
    quantize_weight,
    rtn_quantize,
    spectral_tail,
)
from projq_train.quant.gptq import inverse_cholesky, reversed_cholesky, upper_triangular_inverse
from projq_train.quant.projq import (
    error_subspace,
    hessian_factor,
    projected_hessian,
    srr_preserved_rank,
    top_part,
    top_singular,
)
from projq_train.quant.rtn import clipped_params, minmax_params, quantize_to_grid


def hnorm(E, H):
    return torch.trace(E.double() @ H.double() @ E.double().T).item()


def structured_inputs(n=2048, d=128, k=8, seed=0):
    """Activations with a few dominant directions plus noise, as in real LLM layers."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g) @ torch.randn(k, d, generator=g) * 2 + 0.3 * torch.randn(
        n, d, generator=g
    )
    return X, X.T @ X / n


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(96, 128, generator=g)
    X, H = structured_inputs()
    return W, X, H


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_rtn_grid_round_trip(bits, group_size):
    W = torch.randn(17, 128, generator=torch.Generator().manual_seed(bits * 1000 + group_size))
    q = rtn_quantize(W, bits, group_size)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    gs = 128 if group_size == -1 else group_size
    assert q.scales.shape == (17, 128 // gs)
    # every weight lies within half a step of its group's grid (widened by the fp16 rounding of
    # the step, at most 2^-11 relative, over the 2^bits - 1 steps of the range); groups are contiguous
    step = q.scales[:, q.g_idx.long()]
    assert torch.all((W - q.dequantize()).abs() <= step / 2 + (2**bits - 1) * step * 2**-11 + 1e-6)
    assert torch.equal(q.g_idx.long(), torch.arange(128) // gs)


@pytest.mark.parametrize("value", [0.25, -0.25, 0.0])
def test_rtn_constant_row_is_exact(value):
    W = torch.full((3, 32), value)
    assert torch.equal(rtn_quantize(W, 2, 32).dequantize(), W)


def test_scales_are_fp16_values_so_packing_is_lossless():
    q = rtn_quantize(torch.randn(16, 64) * 1e-3, 3, 32)
    assert torch.equal(q.scales.half().float(), q.scales) and bool((q.scales > 0).all())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_eight_bit_scales_are_e4m3_times_the_layers_power_of_two_and_cost_little_error(layer, bits):
    from projq_train.quant.rtn import scale_exponent

    W, _, H = layer
    exact = gptq_quantize(W, H, bits, 32, clip=True)
    q = gptq_quantize(W, H, bits, 32, clip=True, scale_bits=8)
    assert scale_exponent(W, bits, 16) is None
    codes = q.scales / 2.0 ** scale_exponent(W, bits, 8)
    assert q.scale_bits == 8 and torch.equal(codes.to(torch.float8_e4m3fn).float(), codes)
    assert bool((q.scales > 0).all()) and not torch.equal(q.scales, exact.scales)
    assert hnorm(W - q.dequantize(), H) < 1.05 * hnorm(W - exact.dequantize(), H)
    # the power of two follows the weight's magnitude: a weight 2^-20 times as large is the same grid
    small = rtn_quantize(W * 2.0**-20, bits, 32, scale_bits=8)
    assert torch.equal(small.dequantize() * 2.0**20, rtn_quantize(W, bits, 32, scale_bits=8).dequantize())
    with pytest.raises(ValueError, match=r"scale_bits must be one of \(8, 16\), got 32"):
        gptq_quantize(W, H, bits, 32, scale_bits=32)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_equals_rtn(bits, group_size, act_order):
    W = torch.randn(40, 256)
    g = gptq_quantize(W, torch.eye(256), bits, group_size, act_order=act_order)
    r = rtn_quantize(W, bits, group_size)
    assert torch.equal(g.codes, r.codes)
    assert torch.equal(g.scales, r.scales) and torch.equal(g.zeros, r.zeros)
    assert torch.equal(g.dequantize(), r.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_in_h_norm(layer, bits, act_order):
    W, _, H = layer
    g = gptq_quantize(W, H, bits, 32, act_order=act_order)
    r = rtn_quantize(W, bits, 32)
    assert hnorm(W - g.dequantize(), H) < hnorm(W - r.dequantize(), H)


def test_gptq_act_order_groups_follow_permutation(layer):
    W, _, H = layer
    q = gptq_quantize(W, H, 3, 32, act_order=True)
    counts = torch.bincount(q.g_idx.long())
    assert counts.tolist() == [32] * 4
    assert not torch.equal(q.g_idx.long(), torch.arange(128) // 32)  # the permutation is real


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse(layer):
    """One reversed Cholesky (``R Rᵀ = H + λI``) and a triangular inverse by halves give ``U`` with
    ``Uᵀ U = (H + λI)⁻¹``."""
    _, _, H = layer
    damp = 0.01
    U = inverse_cholesky(H, damp)
    damped = H.double() + damp * H.diagonal().mean().double() * torch.eye(128, dtype=torch.float64)
    assert torch.equal(U, U.triu())
    torch.testing.assert_close(
        U.double().T @ U.double() @ damped, torch.eye(128, dtype=torch.float64), atol=1e-4, rtol=0
    )
    R = reversed_cholesky(H.double(), damp)
    assert torch.equal(R, R.triu())
    torch.testing.assert_close(R @ R.T, damped)
    # srr_preserved_rank's column weights 1 / U_jj² are R_jj²
    torch.testing.assert_close(R.diagonal().float() ** 2, U.diagonal() ** -2, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        upper_triangular_inverse(R, base=16),
        torch.linalg.solve_triangular(R, torch.eye(128, dtype=R.dtype), upper=True),
    )


def test_gptq_survives_indefinite_hessian(layer):
    """A failed Cholesky raises the dampening instead of crashing."""
    W, _, H = layer
    lam, V = torch.linalg.eigh(H)
    lam[:4] = -0.05 * lam.mean()  # slightly indefinite: damp 0.01 fails, 0.1 works
    q = gptq_quantize(W, (V * lam) @ V.T, 3, 32)
    assert torch.isfinite(q.dequantize()).all()


def test_gptq_dead_inputs_are_zeroed(layer):
    W, _, H = layer
    H = H.clone()
    H[:, 5] = 0
    H[5, :] = 0
    q = gptq_quantize(W, H, 4, 32)
    assert torch.allclose(q.dequantize()[:, 5], torch.zeros(96), atol=float(q.scales.max()))


def test_projq_rank_or_iters_zero_equals_gptq(layer):
    W, _, H = layer
    g = gptq_quantize(W, H, 3, 32)
    for kw in ({"rank": 0, "iters": 5}, {"rank": 8, "iters": 0}):
        p, tails = projq_quantize(W, H, 3, 32, **kw)
        assert torch.equal(p.codes, g.codes) and tails == []


def test_projected_hessian_is_hessian_of_projected_tokens(layer):
    """The Hessian-only H_perp equals Xᵀ(I − P)X/N built explicitly from X (test-only)."""
    W, X, H = layer
    E = (W - rtn_quantize(W, 3, 32).dequantize()).double()
    r, n = 6, X.shape[0]
    Y = X.double() / n**0.5
    H = Y.T @ Y
    U, S, _ = torch.linalg.svd(E @ Y.T, full_matrices=False)
    V = Y @ E.T @ U[:, :r] / S[:r]  # (N, r) token-space directions
    explicit = Y.T @ Y - (Y.T @ V) @ (V.T @ Y)
    F, _ = hessian_factor(H)
    _, Z = error_subspace(E, F, r)
    # F Fᵀ = H + δ I with δ = 1e-8 max diag(H): equal to that
    scale = H.diagonal().max().item()
    torch.testing.assert_close(projected_hessian(H, F, Z), explicit, rtol=0, atol=1e-6 * scale)


def test_hessian_factor_is_a_cholesky_factor_and_its_inverse_even_for_a_singular_hessian(layer):
    _, X, H = layer
    for h in (H.double(), (X[:8].T @ X[:8]).double()):  # full rank; rank 8 of 64
        F, F_inv = hessian_factor(h)
        assert torch.equal(F, F.tril())
        torch.testing.assert_close(F @ F.T, h, rtol=0, atol=1e-5 * h.diagonal().max().item())
        torch.testing.assert_close(F @ F_inv, torch.eye(h.shape[0], dtype=h.dtype), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_top_singular_is_exact_below_the_threshold_and_close_by_the_randomized_finder_above(
    shape, monkeypatch
):
    gen = torch.Generator().manual_seed(0)
    K = torch.randn(*shape, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.1, shape[1]).double()
    r = 6
    exact = torch.linalg.svdvals(K)
    U, S, V, total = top_singular(K, r)
    torch.testing.assert_close(S, exact[:r])
    torch.testing.assert_close(U * S @ V.T, (U @ U.T) @ K)  # U, V: the singular pairs of each σ
    assert total == pytest.approx(exact.pow(2).sum().item())
    monkeypatch.setattr(projq, "EXACT_SVD_MAX_DIM", 16)
    U2, S2, V2, _ = top_singular(K, r)
    assert torch.equal(S2, top_singular(K, r)[1])  # the test vectors come from a fixed seed
    captured = S2.pow(2).sum() / exact[:r].pow(2).sum()
    assert 0.999 < captured <= 1 + 1e-12
    torch.testing.assert_close(U2.T @ U2, torch.eye(r, dtype=K.dtype))
    torch.testing.assert_close(U2 * S2 @ V2.T, (U2 @ U2.T) @ K)


@pytest.mark.parametrize("factor", ["hessian_factor", "reversed_cholesky"])
def test_a_nan_factor_reported_as_a_success_is_retried_with_more_damping(factor, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(8, 32, generator=gen, dtype=torch.float64)
    H = X.T @ X  # rank 8 of 32
    cholesky_ex, factored = torch.linalg.cholesky_ex, []

    def nan_on_first_call(A):  # as CUDA answers a matrix that is not positive definite
        factored.append(A.flip(0, 1) if factor == "reversed_cholesky" else A)
        L, info = cholesky_ex(A)
        return (torch.full_like(L, float("nan")), torch.zeros_like(info)) if len(factored) == 1 else (L, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", nan_on_first_call)
    F = hessian_factor(H)[0] if factor == "hessian_factor" else reversed_cholesky(H, damp=0.01)
    assert len(factored) == 2
    first, second = ((A - H).diagonal() for A in factored)
    assert (second > first).all()  # the damping grew
    assert torch.isfinite(F).all()
    torch.testing.assert_close(F @ F.T, factored[1])


def test_small_svd_retries_a_failed_decomposition_on_the_cpu_in_float64(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(12, 4, generator=gen) @ torch.randn(4, 50, generator=gen)  # rank 4 of 12: repeated zeros
    svd = torch.linalg.svd
    calls = []

    def failing_below_float64(A, full_matrices=True):  # as cuSOLVER failed on an H200
        calls.append(A.dtype)
        if A.dtype != torch.float64:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(A, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", failing_below_float64)
    U, S, Vh = projq.small_svd(B)
    assert calls == [torch.float32, torch.float64]
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    torch.testing.assert_close(S, svd(B.double())[1].float())
    torch.testing.assert_close(U * S @ Vh, B, atol=1e-4, rtol=0)
    monkeypatch.setattr(torch.linalg, "svd", lambda A, full_matrices=True: failing_below_float64(A.float()))
    with pytest.raises(torch.linalg.LinAlgError):  # a float64 CPU matrix has nothing left to retry with
        projq.small_svd(B.double())
    B[3, 7] = float("nan")
    with pytest.raises(ValueError, match="12x50 matrix to decompose holds NaN"):
        projq.small_svd(B)


@pytest.mark.parametrize("bits", [2, 3])
def test_projq_lowers_compensated_error(layer, bits):
    W, _, H = layer
    r = 8
    g = gptq_quantize(W, H, bits, 32)
    p, tails = projq_quantize(W, H, bits, 32, rank=r, iters=5)
    assert spectral_tail(W - p.dequantize(), H, r) < spectral_tail(W - g.dequantize(), H, r)
    assert min(tails) == pytest.approx(spectral_tail(W - p.dequantize(), H, r), rel=1e-6)  # best iterate kept


def test_compensation_error_equals_spectral_tail(layer):
    W, X, H = layer
    E = W - gptq_quantize(W, H, 2, 32).dequantize()
    B, A = lowrank_compensation(E, H, rank=10)
    assert B.shape == (96, 10) and A.shape == (10, 128)
    resid = E.double() - B.double() @ A.double()
    measured = (resid @ X.double().T).pow(2).sum().item() / X.shape[0]  # ‖(E − BA)Xᵀ‖² / N
    assert measured == pytest.approx(spectral_tail(E, H, 10), rel=1e-4)
    # and it is the optimum: a plain (unweighted) SVD truncation does worse in the H-norm
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    plain = E - (U[:, :10] * S[:10]) @ Vh[:10]
    assert hnorm(plain, H) > hnorm(resid, H)


def test_row_weighted_compensation_is_the_optimum_of_its_weighted_norm(layer):
    """With row weights d the compensation minimizes ‖D (E − BA) Xᵀ‖²: it reaches the spectral
    tail of D E, beats the unweighted compensation in that norm (and loses to it in the plain
    one), and constant weights change nothing."""
    W, X, H = layer
    E = (W - gptq_quantize(W, H, 2, 32).dequantize()).double()
    H, X = H.double(), X.double()
    d = torch.linspace(0.2, 3.0, E.shape[0], dtype=torch.float64)[torch.randperm(E.shape[0])]

    def weighted(B, A):
        return (d[:, None] * (E - B.double() @ A.double()) @ X.T).pow(2).sum().item() / X.shape[0]

    Bw, Aw = lowrank_compensation(E, H, rank=10, row_weights=d)
    B, A = lowrank_compensation(E, H, rank=10)
    assert weighted(Bw, Aw) == pytest.approx(spectral_tail(d[:, None] * E, H, 10), rel=1e-4)
    assert weighted(Bw, Aw) < 0.99 * weighted(B, A)
    assert hnorm(E - Bw.double() @ Aw.double(), H) > hnorm(E - B.double() @ A.double(), H)
    Bc, Ac = lowrank_compensation(E, H, rank=10, row_weights=torch.full_like(d, 2.5))
    torch.testing.assert_close(Bc @ Ac, B @ A, rtol=1e-5, atol=1e-6)


def test_adapter_brings_quantized_layer_closer_to_float(layer):
    W, X, _ = layer
    H = X.T @ X / X.shape[0]
    q = quantize_weight(W, H, method="projq", bits=3, group_size=32, rank=8, iters=3)
    B, A = lowrank_compensation(W - q.dequantize(), H, rank=8)
    y = X @ W.T
    err_q = (X @ q.dequantize().T - y).pow(2).mean()
    err_qba = (X @ (q.dequantize() + B @ A).T - y).pow(2).mean()
    assert err_qba < 0.9 * err_q


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 5}, "bits must be one of"),
        ({"bits": 1}, "bits must be one of"),
        ({"group_size": 100}, "does not divide in_features 128"),
        ({"group_size": 0}, "group_size must be a positive"),
        ({"rank": 200}, "rank must be in"),
        ({"method": "awq"}, "method must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(layer, kwargs, message):
    W, _, H = layer
    with pytest.raises(ValueError, match=message):
        quantize_weight(W, H, **{"method": "projq", "bits": 3, "group_size": 32, "rank": 8, **kwargs})


def test_hessian_shape_is_checked(layer):
    W, _, _ = layer
    with pytest.raises(ValueError, match=r"H must be \(128, 128\)"):
        quantize_weight(W, torch.eye(64), method="gptq")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clipped_grid_is_never_worse_than_minmax(bits):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 32, generator=g)
    w[:, 3] *= 6  # an outlier column: clipping it buys a finer step for the rest
    weight = torch.rand(32, generator=g) + 0.1
    maxq = 2**bits - 1

    def row_err(scale, zero):
        deq = (quantize_to_grid(w, scale, zero, maxq) - zero[:, None]) * scale[:, None]
        return ((w - deq) ** 2 * weight).sum(dim=1)

    clipped, plain = row_err(*clipped_params(w, maxq, weight)), row_err(*minmax_params(w, maxq))
    assert torch.all(clipped <= plain)
    assert clipped.sum() < plain.sum()
    # every row got the best of the shrinks, each tried on its own (the search does all at once)
    shrinks = (1.0, 0.9, 0.8, 0.7)
    wmin, wmax = w.amin(dim=1), w.amax(dim=1)
    each = torch.stack([row_err(*minmax_params(torch.stack([p * wmin, p * wmax], 1), maxq)) for p in shrinks])
    torch.testing.assert_close(row_err(*clipped_params(w, maxq, weight, shrinks)), each.amin(dim=0))


def test_blocked_gptq_equals_column_by_column_gptq(layer):
    """Lazy blocks and sub-blocks reorder GPTQ's updates, not its result: the textbook loop, every
    rounding error sent at once to every later column, in fp64, gives the same codes."""
    W, _, H = layer
    bits, group_size, damp = 3, 32, 0.01
    got = gptq_quantize(W, H, bits, group_size, block_size=64, damp=damp)
    maxq, Wr = 2**bits - 1, W.double().clone()
    damped = H.double() + damp * H.diagonal().mean() * torch.eye(128)
    U = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)  # H⁻¹ = Uᵀ U
    codes = torch.zeros_like(Wr)
    for j in range(W.shape[1]):
        if j % group_size == 0:
            scale, zero = minmax_params(Wr[:, j : j + group_size].float(), maxq)
        codes[:, j] = quantize_to_grid(Wr[:, j : j + 1].float(), scale, zero, maxq)[:, 0].double()
        err = (Wr[:, j] - (codes[:, j] - zero.double()) * scale.double()) / U[j, j]
        Wr[:, j:] -= err[:, None] * U[j, j:][None, :]
    assert (got.codes.double() != codes).double().mean() < 1e-3  # fp32 against fp64 rounding


def test_refresh_mode_lowers_compensated_error_on_structured_weight(layer):
    W, _, H = layer
    g = torch.Generator().manual_seed(3)
    W = W + 4 * torch.randn(96, 4, generator=g) @ torch.randn(4, 128, generator=g) / 4  # low-rank structure
    r = 8
    gptq_tail = spectral_tail(W - gptq_quantize(W, H, 3, 32).dequantize(), H, r)
    q, tails = projq_quantize(W, H, 3, 32, rank=r, iters=3, mode="refresh", clip=True)
    assert spectral_tail(W - q.dequantize(), H, r) == pytest.approx(min(tails), rel=1e-6)
    assert min(tails) < gptq_tail


def test_unknown_projq_mode_or_preserved_rank_is_refused(layer):
    W, _, H = layer
    with pytest.raises(ValueError, match="mode must be 'paper', 'refresh' or 'srr'"):
        projq_quantize(W, H, 3, 32, rank=8, mode="loftq")
    with pytest.raises(ValueError, match=r"preserved_rank must be in \[0, rank\] = \[0, 8\], got 9"):
        projq_quantize(W, H, 3, 32, rank=8, mode="srr", preserved_rank=9)


def with_structure(W: torch.Tensor, strength: float, rank: int = 4) -> torch.Tensor:
    """``W`` plus a rank-``rank`` part: the dominant structure real weights have."""
    g = torch.Generator().manual_seed(3)
    return W + strength * torch.randn(W.shape[0], rank, generator=g) @ torch.randn(
        rank, W.shape[1], generator=g
    )


def test_srr_preserving_nothing_is_the_paper_loop_and_everything_refreshs_first_round(layer):
    W, _, H = layer
    W, r = with_structure(W, 2.0), 8

    def srr(k: int, iters: int):
        return projq_quantize(W, H, 3, 32, rank=r, iters=iters, mode="srr", preserved_rank=k)[0]

    # k = 0: plain GPTQ, and its compensation the plain one; with rounds, the paper's loop
    assert torch.equal(srr(0, 0).codes, gptq_quantize(W, H, 3, 32).codes)
    assert torch.equal(srr(0, 2).codes, projq_quantize(W, H, 3, 32, rank=r, iters=2)[0].codes)
    # k = r: W's best rank-r part in the H-norm, U_r U_rᵀ W, stays out of the grid (no rounds left)
    whole = srr(r, 3)
    _, refresh_tails = projq_quantize(W, H, 3, 32, rank=r, iters=1, mode="refresh")
    assert spectral_tail(W - whole.dequantize(), H, r) == pytest.approx(refresh_tails[0], rel=1e-9)
    lam, V = torch.linalg.eigh(H.double())
    U = torch.linalg.svd(W.double() @ (V * lam.clamp_min(1e-12).sqrt()) @ V.T)[0][:, :r]
    expected = gptq_quantize((W.double() - U @ U.T @ W.double()).float(), H, 3, 32)
    assert (whole.codes == expected.codes).float().mean() > 0.99  # the same up to float round-off


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_refresh_rounds_quantize_w_minus_the_compensation_against_the_projected_hessian(layer, alpha):
    """Round t + 1 of ``refresh`` is ``GPTQ(W − L_t, H_perp(Z_t))``: ``L_t`` the best rank-r part
    of the error in the H-norm, ``Z_t`` its subspace, the projection of strength ``alpha``."""
    W, _, H = layer
    W, r = with_structure(W, 2.0), 8
    F, F_inv = hessian_factor(H)
    first = gptq_quantize(W - top_part(W, F, F_inv, error_subspace(W, F, r)[1]), H, 3, 32)
    E = W - first.dequantize()
    Z = error_subspace(E, F, r)[1]
    second = gptq_quantize(W - top_part(E, F, F_inv, Z), projected_hessian(H, F, Z, alpha), 3, 32)
    _, tails = projq_quantize(W, H, 3, 32, rank=r, iters=1, tol=0.0, alpha=alpha, mode="refresh")
    assert tails == pytest.approx(
        [spectral_tail(W - q.dequantize(), H, r) for q in (first, second)], rel=1e-6
    )


@pytest.mark.parametrize(("strength", "expected_k"), [(0.0, 0), (4.0, 4)])
def test_srr_criterion_keeps_the_low_rank_structure_of_a_weight_and_nothing_of_noise(
    layer, strength, expected_k
):
    W, _, H = layer
    W, r = with_structure(W, strength), 8
    assert srr_preserved_rank(W, H, r, 3, 32) == expected_k
    tails = {  # in fp64: the kept part makes the error's energy large and its tail a small remainder
        k: spectral_tail(
            (
                W - projq_quantize(W, H, 3, 32, rank=r, iters=0, mode="srr", preserved_rank=k)[0].dequantize()
            ).double(),
            H.double(),
            r,
        )
        for k in range(r + 1)
    }
    assert tails[expected_k] <= 1.1 * min(tails.values())  # the split it picks is (near) the best one
    if strength:
        assert tails[expected_k] < tails[0] / 10  # keeping the structure out of the grid pays
    assert srr_preserved_rank(W, H, 0, 3, 32) == 0


def allocation_problem(seed: int = 0, group_sizes: tuple[int, ...] = (64,)):
    """Six modules of different shapes, each error falling with its bit width and rising with its
    group size (per row: -1), keyed by grid (bits, group size)."""
    g = torch.Generator().manual_seed(seed)
    outs, ins = torch.tensor([64, 128, 192]), torch.tensor([64, 128, 256])
    shapes = {
        f"m{i}": (
            int(outs[torch.randint(3, (1,), generator=g)]),
            int(ins[torch.randint(3, (1,), generator=g)]),
        )
        for i in range(6)
    }
    errors = {}
    for n in shapes:
        e2 = 0.05 + 0.25 * torch.rand(1, generator=g).item()
        e3 = e2 * (0.2 + 0.3 * torch.rand(1, generator=g).item())
        by_bits = {2: e2, 3: e3, 4: e3 * (0.2 + 0.3 * torch.rand(1, generator=g).item())}
        coarser = {gs: 1 + 0.4 * torch.rand(1, generator=g).item() for gs in (32, 64, -1)}
        coarser = {32: 1.0, 64: coarser[64], -1: coarser[64] * coarser[-1]}  # larger groups err more
        errors[n] = {(b, gs): e * coarser[gs] for b, e in by_bits.items() for gs in group_sizes}
    return shapes, errors


def test_bit_allocation_meets_the_budget_is_optimal_and_a_larger_budget_never_errs_more():
    import itertools

    from projq_train.quant.allocate import (
        allocate_bits,
        grid_choices,
        storage_bits_per_weight,
        uniform_storage,
    )
    from projq_train.quant.pack import PackedWeight
    from projq_train.quant.rtn import rtn_quantize

    shapes, errors = allocation_problem()
    uniform = uniform_storage(shapes, 64)
    weights = sum(o * i for o, i in shapes.values())
    previous = float("inf")
    for budget in [uniform[2], 2.5, 2.8, 3.0, uniform[3], 3.6, 4.0, uniform[4]]:
        chosen = allocate_bits(errors, shapes, [64], budget)
        packed = {
            n: PackedWeight.from_quantized(rtn_quantize(torch.randn(o, i), *chosen[n]))
            for n, (o, i) in shapes.items()
        }
        stored = sum(w.storage_bits for w in packed.values()) / weights  # counted from the packed tensors
        assert stored == pytest.approx(storage_bits_per_weight(shapes, chosen), rel=1e-12)
        assert stored <= budget * (1 + 1e-12)
        total = sum(errors[n][g] for n, g in chosen.items())
        best = min(
            sum(errors[n][g] for n, g in zip(shapes, grids, strict=True))
            for grids in itertools.product(grid_choices([64]), repeat=len(shapes))
            if storage_bits_per_weight(shapes, dict(zip(shapes, grids, strict=True))) <= budget * (1 + 1e-12)
        )
        assert total == pytest.approx(best, rel=1e-12)  # exact: the knapsack's units divide every cost
        assert total <= previous
        previous = total
    assert {g for _, g in allocate_bits(errors, shapes, [64], uniform[3]).values()} == {64}


@pytest.mark.parametrize("scale_bits", [16, 8])
def test_grid_allocation_over_group_sizes_is_optimal_within_the_budget_and_beats_one_group_size(scale_bits):
    import itertools

    from projq_train.quant.allocate import allocate_bits, grid_choices, storage_bits_per_weight
    from projq_train.quant.pack import PackedWeight
    from projq_train.quant.rtn import rtn_quantize

    sizes = [32, 64, -1]
    shapes, errors = allocation_problem(group_sizes=tuple(sizes))
    weights = sum(o * i for o, i in shapes.values())
    previous = float("inf")
    for budget in [2.3, 2.6, 2.8, 3.0, 3.3, 4.0]:
        chosen = allocate_bits(errors, shapes, sizes, budget, scale_bits)
        stored = sum(  # counted from the packed tensors
            PackedWeight.from_quantized(rtn_quantize(torch.randn(o, i), *chosen[n], scale_bits)).storage_bits
            for n, (o, i) in shapes.items()
        )
        assert stored / weights == pytest.approx(
            storage_bits_per_weight(shapes, chosen, scale_bits), rel=1e-12
        )
        assert stored / weights <= budget * (1 + 1e-12)
        total = sum(errors[n][g] for n, g in chosen.items())
        best = min(
            sum(errors[n][g] for n, g in zip(shapes, grids, strict=True))
            for grids in itertools.product(grid_choices(sizes), repeat=len(shapes))
            if storage_bits_per_weight(shapes, dict(zip(shapes, grids, strict=True)), scale_bits)
            <= budget * (1 + 1e-12)
        )
        assert total == pytest.approx(best, rel=1e-12)
        assert total <= previous
        previous = total
        one_size = allocate_bits(
            {n: {(b, 64): e[b, 64] for b in (2, 3, 4)} for n, e in errors.items()},
            shapes,
            [64],
            budget,
            scale_bits,
        )
        assert total <= sum(errors[n][g] for n, g in one_size.items())
    assert (
        len({g for _, g in allocate_bits(errors, shapes, sizes, 2.8, scale_bits).values()}) > 1
    )  # the menu is used


def test_rank_allocation_is_optimal_within_the_parameters_of_one_rank_everywhere():
    import itertools

    from projq_train.quant.allocate import allocate_ranks, rank_choices

    assert rank_choices(8) == (2, 4, 6, 8, 10, 12, 14, 16) and rank_choices(1) == (1, 2)
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (64, 64), "b": (192, 64), "c": (64, 256), "d": (8, 128)}  # d: at most rank 8
    errors = {}
    for n in shapes:  # falling and convex in the rank, as spectral tails are
        energies = torch.rand(20, generator=g).sort(descending=True).values * torch.rand(1, generator=g)
        errors[n] = {r: energies[r:].sum().item() for r in rank_choices(8)}
    chosen = allocate_ranks(errors, shapes, 8)
    params = {n: sum(shape) for n, shape in shapes.items()}
    room = sum(8 * p for p in params.values())
    assert sum(chosen[n] * params[n] for n in shapes) <= room and chosen["d"] <= 8
    best = min(
        sum(errors[n][r] for n, r in zip(shapes, ranks, strict=True))
        for ranks in itertools.product(rank_choices(8), repeat=len(shapes))
        if sum(r * params[n] for n, r in zip(shapes, ranks, strict=True)) <= room and ranks[3] <= 8
    )
    assert sum(errors[n][r] for n, r in chosen.items()) == pytest.approx(best, rel=1e-12)
    assert len(set(chosen.values())) > 1  # not every module at 8
    flat = {n: dict.fromkeys(rank_choices(8), 1.0) for n in shapes}  # nothing to gain: the fewest
    assert set(allocate_ranks(flat, shapes, 8).values()) == {2}


def test_a_budget_outside_what_2_to_4_bits_store_is_one_clear_error():
    from projq_train.quant.allocate import allocate_bits

    shapes, errors = allocation_problem()
    for budget in (2.0, 4.5):
        with pytest.raises(
            ValueError,
            match=r"quant.budget_bits .* is outside .*: 2\.\d{3} \(all 2-bit\) to 4\.\d{3} \(all 4-bit\)",
        ):
            allocate_bits(errors, shapes, [64], budget)
