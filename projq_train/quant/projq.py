"""ProjQ: quantize so that the error lands where a rank-r adapter can remove it.

Notation (GUIDE §2): ``W (out, in)``, ``H = XᵀX / N (in, in)``, ``E = W − Q``, rank ``r``.
With ``K = E H^{1/2}`` (same singular values as ``E Xᵀ / √N``) the error a rank-r adapter
cannot remove is the spectral tail ``Σ_{i>r} σ_i²(K)``.

Phase 1 alternates: take the top-r right singular vectors ``Z_r`` of ``K``; the token-space
projector onto the dominant error directions turns, in Hessian-only form, into
``H_perp = H − G Gᵀ`` with ``G = H Eᵀ U_r Σ_r⁻¹ = H^{1/2} Z_r (in, r)``; re-run GPTQ against
``H_perp``, so rounding error may move freely into the subspace the adapter will absorb.
No calibration ``X`` is stored and no ``N × N`` matrix is formed.

``mode="refresh"`` is our variant (see :func:`projq_quantize`): it also refreshes the
compensation inside the loop, quantizing ``W`` minus the current compensation against the
projected Hessian, starting from the H-weighted top-r SVD of ``W``.

``mode="srr"`` splits the rank as SRR does ("Preserve-Then-Quantize", 2026): the H-weighted top-k
part of ``W`` is kept out of the grid (the adapter holds it), the residual is quantized with the
paper's loop at rank ``r − k``; ``k`` per weight by :func:`srr_preserved_rank`.

Phase 2 (``lowrank_compensation``): ``B A`` = best rank-r approximation of ``E`` in the
H-norm, from the top-r SVD of ``E F``.

Any factor ``F`` with ``F Fᵀ = H`` serves where ``H^{1/2}`` is written: ``E F`` has the singular
values and left singular vectors of ``E H^{1/2}``. We take the Cholesky factor
(:func:`hessian_factor`), and the top-r singular triplets exactly for matrices up to
:data:`EXACT_SVD_MAX_DIM` wide and by a randomized range finder above (:func:`top_singular`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from projq_train.quant.gptq import cholesky_or_none, gptq_quantize, reversed_cholesky
from projq_train.quant.rtn import QuantizedWeight

EXACT_SVD_MAX_DIM = 1024  # top_singular: exact up to this min(out, in), randomized above
RANDOMIZED_OVERSAMPLE = 16  # extra test vectors of the randomized range finder
RANDOMIZED_POWER_ITERS = 4  # its subspace iterations


def check_rank(rank: int, out_features: int, in_features: int) -> None:
    if not 0 <= rank <= min(out_features, in_features):
        raise ValueError(
            f"rank must be in [0, min(out, in)] = [0, {min(out_features, in_features)}] "
            f"for a ({out_features}, {in_features}) weight, got {rank}"
        )


def _work_dtype(t: Tensor) -> torch.dtype:
    """The dtype of the factorizations: ``t``'s, at least fp32 (the calibration driver's Hessians
    are fp32, on CPU and GPU alike; a caller wanting fp64 passes fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def hessian_factor(H: Tensor, rel_floor: float = 1e-8) -> tuple[Tensor, Tensor]:
    """A factor ``F (in, in)`` with ``F Fᵀ = H`` and its inverse: the lower Cholesky factor of
    ``H + δ I``, ``δ = rel_floor · max diag(H)`` (raised tenfold until the factorization succeeds),
    so both exist for a singular ``H``.

    Every use needs only ``F Fᵀ = H``: ``K = E F`` has the singular values of ``E Xᵀ / √N`` (and
    its left singular vectors), and the best rank-r part of ``E`` in the H-norm is
    ``K_r F⁻¹`` whichever factor is taken. A Cholesky factor costs a fraction of a symmetric
    square root's eigendecomposition (``benchmarks/lowrank_svd.py`` times both).
    """
    Hw = H.to(_work_dtype(H))
    eye = torch.eye(Hw.shape[0], dtype=Hw.dtype, device=Hw.device)
    delta = rel_floor * Hw.diagonal().max().clamp_min(1e-30)
    for _ in range(12):
        F = cholesky_or_none(Hw + delta * eye)
        if F is not None:
            return F, torch.linalg.solve_triangular(F, eye, upper=False)
        delta = delta * 10
    raise ValueError("the Hessian is not positive semi-definite: its factorization failed")


def top_singular(K: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """The top ``rank`` singular triplets of ``K (out, in)``, ``U (out, r)``, ``σ (r,)``, ``V (in, r)``,
    and ``‖K‖²_F`` (so the tail ``Σ_{i>r} σ_i² = ‖K‖² − Σ_{i≤r} σ_i²``).

    Exact (the eigendecomposition of the smaller Gram matrix) while ``min(out, in)`` is at most
    :data:`EXACT_SVD_MAX_DIM`; above, :func:`randomized_top_singular` with
    :data:`RANDOMIZED_OVERSAMPLE` and :data:`RANDOMIZED_POWER_ITERS`, where the exact
    decomposition costs minutes per matrix on a CPU and the randomized one seconds.
    """
    total = K.pow(2).sum().item()
    if min(K.shape) > EXACT_SVD_MAX_DIM:
        U, S, V = randomized_top_singular(K, rank, RANDOMIZED_OVERSAMPLE, RANDOMIZED_POWER_ITERS)
        return U, S, V, total
    if K.shape[1] <= K.shape[0]:
        lam, V = torch.linalg.eigh(K.T @ K)  # ascending
        S = lam.flip(0)[:rank].clamp_min(0).sqrt()
        V = V.flip(1)[:, :rank]
        return (K @ V) / S.clamp_min(1e-30), S, V, total
    lam, U = torch.linalg.eigh(K @ K.T)
    S = lam.flip(0)[:rank].clamp_min(0).sqrt()
    U = U.flip(1)[:, :rank]
    return U, S, (K.T @ U) / S.clamp_min(1e-30), total


def randomized_top_singular(
    K: Tensor, rank: int, oversample: int, power_iters: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``rank`` singular triplets ``U (out, r)``, ``σ (r,)``, ``V (in, r)`` of ``K (out, in)`` by
    a randomized range finder (Halko, Martinsson and Tropp 2011, algorithms 4.4 and 5.1):
    ``rank + oversample`` Gaussian test vectors, ``power_iters`` subspace iterations with
    re-orthonormalization, then the exact SVD of the small projection ``QᵀK``. The test matrix
    comes from a generator of fixed seed, so the result is deterministic. ``Σ σ²`` is at most the
    exact top-r energy; ``benchmarks/lowrank_svd.py`` measures how close it comes."""
    width = min(rank + oversample, *K.shape)
    gen = torch.Generator(device=K.device).manual_seed(0)
    omega = torch.randn(K.shape[1], width, generator=gen, device=K.device, dtype=K.dtype)
    Q = torch.linalg.qr(K @ omega).Q  # (out, width)
    for _ in range(power_iters):
        Q = torch.linalg.qr(K @ torch.linalg.qr(K.T @ Q).Q).Q
    U, S, Vh = small_svd(Q.T @ K)  # (width, in)
    return (Q @ U)[:, :rank], S[:rank], Vh[:rank].T


def small_svd(B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``U, σ, Vᴴ`` of a matrix with few rows. Where cuSOLVER fails to converge on a
    finite one, the SVD is taken on the CPU in float64 (LAPACK) and returned on ``B``'s device and
    dtype. (A quantization on an H200 failed here, most likely on a NaN matrix made by a Hessian
    factor that :func:`~projq_train.quant.gptq.cholesky_or_none` now rejects.)"""
    if not torch.isfinite(B).all():
        raise ValueError(
            f"the {B.shape[0]}x{B.shape[1]} matrix to decompose holds NaN or infinite values: the module's "
            "weights, its calibration activations or its Hessian factor are not finite"
        )
    try:
        return torch.linalg.svd(B, full_matrices=False)
    except torch.linalg.LinAlgError:
        if B.device.type == "cpu" and B.dtype == torch.float64:
            raise
        return tuple(t.to(B.device, B.dtype) for t in torch.linalg.svd(B.cpu().double(), full_matrices=False))


def error_subspace(E: Tensor, F: Tensor, rank: int) -> tuple[float, Tensor]:
    """The spectral tail ``Σ_{i>r} σ_i²(E F)`` (the H-norm error a rank-r correction leaves) and the
    top-r right singular vectors ``Z_r (in, r)`` of ``K = E F`` (``F``: :func:`hessian_factor`)."""
    _, S, Z, total = top_singular(E.to(F.dtype) @ F, rank)
    return max(total - S.pow(2).sum().item(), 0.0), Z


def spectral_tail(E: Tensor, H: Tensor, rank: int) -> float:
    """``Σ_{i>r} σ_i²(E H^{1/2})``: the H-norm error left after the best rank-r correction."""
    return error_subspace(E, hessian_factor(H)[0], rank)[0]


def top_part(W: Tensor, F: Tensor, F_inv: Tensor, Z: Tensor) -> Tensor:
    """``W F Z Zᵀ F⁻¹ (out, in)``: the part of ``W`` along the right singular vectors ``Z (in, k)`` of
    ``W F``; for its top-k ones, the best rank-k part of ``W`` in the H-norm (``U_k U_kᵀ W``)."""
    return ((W.to(F.dtype) @ (F @ Z)) @ (Z.T @ F_inv)).to(W.dtype)


def grid_noise(W: Tensor, bits: int, group_size: int) -> Tensor:
    """The rounding-noise variance of each group of ``W (out, in)`` on its min-max grid,
    ``Δ² / 12`` with ``Δ = range / (2^bits − 1)``: ``(out, groups)``."""
    out_f, in_f = W.shape
    g = in_f if group_size == -1 else group_size
    Wg = W.reshape(out_f, in_f // g, g)
    step = (Wg.amax(dim=2) - Wg.amin(dim=2)) / (2**bits - 1)
    return step**2 / 12


def srr_preserved_rank(
    W: Tensor,
    H: Tensor,
    rank: int,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    factors: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
) -> int:
    """SRR's split of the rank ``r``: how many top H-weighted directions of ``W`` to keep out of
    the grid (``k``) so that the error the remaining ``r − k`` cannot reconstruct is smallest,
    balancing the energy quantization exposes against what stays unrecoverable.

    GPTQ rounds column ``j`` with an error of variance ``var = Δ² / 12`` (``Δ``: its group's
    step) and leaves ``Err = (W − Q) U⁻¹`` with ``U`` the upper Cholesky factor of ``H⁻¹``, so
    ``(W − Q) H^{1/2} = Err · (U H^{1/2})`` with ``U H^{1/2}`` orthogonal (any factor ``F`` with
    ``F Fᵀ = H`` in place of ``H^{1/2}`` gives the same spectrum): the error's H-norm
    spectrum is that of ``Err``, independent entries of variance ``var / U_jj²``. Hence
    - exposed energy ``ε(k) = Σ var_k / U_jj²`` of the residual ``W − U_k U_kᵀ W`` (its groups'
      ranges shrink as dominant directions leave the grid, :func:`grid_noise`);
    - the share ``ρ(m)`` a rank-m reconstruction removes, read off one random probe shaped like
      ``Err`` (``Σ_{i≤m} s_i² / Σ s_i²``);
    - ``J(k) = ε(k) (1 − ρ(r − k))``, ``k = argmin J``. ``k = 0`` is plain compensation,
      ``k = r`` the first round of ``refresh``.
    ``damp``: GPTQ's dampening; ``seed``: the probe's; ``factors``: :func:`hessian_factor`'s.
    """
    check_rank(rank, *W.shape)
    if rank == 0:
        return 0
    F, _ = factors if factors is not None else hessian_factor(H)
    W = W.to(F.dtype)
    U = top_singular(W @ F, rank)[0]  # (out, r)
    components = U.T @ W  # (r, in): W's part along each u_i
    g = W.shape[1] if group_size == -1 else group_size
    column_weight = reversed_cholesky(H.to(W.dtype), damp).diagonal() ** 2  # (in,) 1 / U_jj² = R_jj²
    group_weight = column_weight.reshape(-1, g).sum(dim=1)  # (groups,)
    noise_var = grid_noise(W, bits, group_size)  # (out, groups), of W itself
    residual, exposed = W.clone(), [(noise_var * group_weight).sum()]
    for k in range(1, rank + 1):
        residual -= U[:, k - 1 : k] @ components[k - 1 : k]
        exposed.append((grid_noise(residual, bits, group_size) * group_weight).sum())
    gen = torch.Generator(device=W.device).manual_seed(seed)
    probe = torch.randn(W.shape, generator=gen, device=W.device, dtype=W.dtype)
    probe *= (noise_var.repeat_interleave(g, dim=1) * column_weight).sqrt()  # shaped like Err
    _, S, _, total = top_singular(probe, rank)
    captured = torch.cat([S.new_zeros(1), S.pow(2).cumsum(0) / max(total, 1e-30)])  # ρ(0..r)
    unrecoverable = torch.stack(exposed) * (1 - captured.flip(0))  # J(k) = ε(k) (1 − ρ(r − k))
    return int(unrecoverable.argmin())


def projected_hessian(H: Tensor, F: Tensor, Z: Tensor, alpha: float = 1.0) -> Tensor:
    """``H_perp = H − α G Gᵀ`` with ``G = F Z (in, r)`` (``F Fᵀ = H``: :func:`hessian_factor`).

    For ``Z`` the top-r right singular vectors of ``E F`` this is ``Xᵀ(I − P)X / N`` with ``P``
    the projector onto the r token directions that carry most of ``E Xᵀ`` (``X = Ω Fᵀ √N`` with
    ``Ω`` orthonormal, so those directions are ``Ω Z``).
    """
    G = F @ Z
    return (H.to(F.dtype) - alpha * G @ G.T).to(H.dtype)


def lowrank_compensation(
    E: Tensor,
    H: Tensor,
    rank: int,
    factors: tuple[Tensor, Tensor] | None = None,
    row_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Best rank-r ``B (out, r) @ A (r, in)`` approximation of ``E (out, in)`` in the H-norm.

    With ``F Fᵀ = H`` and the top-r SVD ``E F ≈ U_r Σ_r V_rᵀ`` (:func:`top_singular`):
    ``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_rᵀ F⁻¹``, so ``‖(E − BA) F‖²_F = Σ_{i>r} σ_i²``.
    With ``row_weights d (out,)`` (positive) the norm is ``‖D (E − BA) F‖_F``, ``D = diag(d)``:
    the same construction on ``D E`` with ``B`` divided by ``d`` row by row (``D`` is invertible,
    so every rank-r ``D B A`` is some rank-r ``B A``: this is the best one).
    Returned in float32. ``factors``: :func:`hessian_factor` of ``H`` when the caller has it.
    """
    check_rank(rank, *E.shape)
    F, F_inv = factors if factors is not None else hessian_factor(H)
    d = None if row_weights is None else row_weights.to(F)[:, None]
    E = E.to(F.dtype)
    U, S, V, _ = top_singular((E if d is None else d * E) @ F, rank)
    s = S.sqrt()
    B = U * s if d is None else U * s / d  # (out, r)
    A = (s[:, None] * V.T) @ F_inv  # (r, in)
    return B.float(), A.float()


def projq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int = 128,
    rank: int = 32,
    iters: int = 5,
    tol: float = 1e-3,
    alpha: float = 1.0,
    mode: Literal["paper", "refresh", "srr"] = "paper",
    factors: tuple[Tensor, Tensor] | None = None,
    preserved_rank: int | None = None,
    **gptq_kwargs,
) -> tuple[QuantizedWeight, list[float]]:
    """ProjQ phase 1: alternate quantizing and re-estimating the error subspace ``Z_r``.

    ``mode="paper"``: ``Q ← GPTQ(W, H_perp)`` with ``H_perp`` projecting out ``Z_r`` (the
    paper's algorithm, starting from ``GPTQ(W, H)``).
    ``mode="refresh"``: the compensation is refreshed inside the loop as well,
    ``Q ← GPTQ(W − L, H_perp)`` with ``L = E F Z_r Z_rᵀ F⁻¹`` the best rank-r part of the
    current error ``E`` in the H-norm, starting from ``L`` = the best rank-r part of ``W``
    itself (that first round against ``H``: srr with ``k = r``): the adapter takes the dominant
    structure, the grid fits what is left. ``H_perp``
    ignores the error along ``Z_r``, so the objective is the same as the paper's; subtracting
    ``L`` (which lies along ``Z_r``) changes only what GPTQ rounds: the grids fit ``W − L``,
    whose groups span smaller ranges. ``alpha = 0`` quantizes against ``H`` itself.
    ``mode="srr"``: ``Q ← paper loop(W − L_k)`` at rank ``r − k``, with ``L_k`` the best rank-k
    part of ``W`` in the H-norm and ``k = preserved_rank`` (None: :func:`srr_preserved_rank`);
    ``Q`` then approximates ``W − L_k``, and the rank-r compensation of ``W − Q`` holds ``L_k``.

    Args:
        rank: adapter rank r (0: plain GPTQ).
        iters: rounds after the first quantization (0: plain GPTQ).
        tol: stop when the tail improves by less than this fraction of the best so far,
            or when the subspace moves by less than this (relative Frobenius distance).
        alpha: projection strength, ``H_perp = H − α G Gᵀ`` (1: the paper).
        factors: :func:`hessian_factor` of ``H`` when the caller already has it.
        preserved_rank: ``k`` in srr mode, in ``[0, rank]``.
        gptq_kwargs: passed to :func:`gptq_quantize` (block_size, damp, act_order, clip).

    Returns:
        The iterate with the smallest tail, and the tail of every iterate in order (srr: those of
        the loop on ``W − L_k`` at rank ``r − k``).
    """
    check_rank(rank, *W.shape)
    if mode not in ("paper", "refresh", "srr"):
        raise ValueError(f"mode must be 'paper', 'refresh' or 'srr', got {mode!r}")
    if mode == "srr" and rank > 0:
        factors = factors if factors is not None else hessian_factor(H)
        damp = gptq_kwargs.get("damp", 0.01)
        k = (
            srr_preserved_rank(W, H, rank, bits, group_size, damp, factors)
            if preserved_rank is None
            else preserved_rank
        )
        if not 0 <= k <= rank:
            raise ValueError(f"preserved_rank must be in [0, rank] = [0, {rank}], got {k}")
        kept = top_part(W, *factors, error_subspace(W, factors[0], k)[1]) if k else 0
        return projq_quantize(
            W - kept, H, bits, group_size, rank - k, iters, tol, alpha, "paper", factors, **gptq_kwargs
        )
    if rank == 0 or iters == 0:
        return gptq_quantize(W, H, bits, group_size, **gptq_kwargs), []
    F, F_inv = factors if factors is not None else hessian_factor(H)

    def step(E: Tensor, Z: Tensor) -> QuantizedWeight:
        """Quantize given the dominant subspace ``Z (in, r)`` of the current error ``E``."""
        target = W if mode == "paper" else W - top_part(E, F, F_inv, Z)
        return gptq_quantize(target, projected_hessian(H, F, Z, alpha), bits, group_size, **gptq_kwargs)

    if mode == "paper":
        q = gptq_quantize(W, H, bits, group_size, **gptq_kwargs)
    else:  # W's own top-r part goes to the adapter, the grid fits the rest (srr with k = r)
        q = gptq_quantize(
            W - top_part(W, F, F_inv, error_subspace(W, F, rank)[1]), H, bits, group_size, **gptq_kwargs
        )
    best, best_tail, tails, Z_prev = q, float("inf"), [], None
    for t in range(iters + 1):
        E = W - q.dequantize()
        tail, Z = error_subspace(E, F, rank)
        tails.append(tail)
        improved = tail < best_tail * (1 - tol)
        if tail < best_tail:
            best, best_tail = q, tail
        moved = Z_prev is None or torch.linalg.norm(Z @ Z.T - Z_prev @ Z_prev.T) > tol * (2 * rank) ** 0.5
        if t == iters or not improved or not moved:
            break
        q = step(E, Z)
        Z_prev = Z
    return best, tails
