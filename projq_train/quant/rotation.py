"""Input rotations (``quant.rotate_inputs``): quantize ``W Q`` instead of ``W``, for a fixed orthogonal ``Q``.

A few input channels with large weights (or large activations) widen the range of every group
they fall in, and the grid's steps with it. An orthogonal ``Q`` spreads each channel over all of
them: the layer computes ``(x Q)(W Q)ᵀ = x Wᵀ``, the quantizer sees ``W Q`` and the Hessian of
its inputs ``Qᵀ H Q``, whose rows are flatter (the incoherence processing of QuIP and QuIP#;
QuaRot and SpinQuant fold such rotations into the neighbouring layers instead, which changes the
model's other weights). The H-norm of an error is the same in both bases, so every error the
driver measures is comparable with and without a rotation.

``Q = diag(s) (C_a ⊗ C_b)ᵀ``: ``s`` a fixed ±1 sequence, ``C_n`` the orthonormal DCT-II matrix of
size ``n`` and ``a · b`` the input width (``a`` its largest divisor up to ``√in``). Applying it to a
row costs ``in · (a + b)`` multiply-adds (two small matrix products on the row viewed as
``(a, b)``), not ``in²``, and nothing is stored: ``s`` comes from a fixed integer sequence, the same
on every machine. The random signs keep a smooth row from staying smooth, which the DCT alone
would compress rather than spread.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SIGN_SEED = 0x5DEECE66D  # the sign sequence's start (any fixed value; changing it changes every artifact)


def kronecker_sides(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a · b = n`` and ``a`` the largest divisor of ``n`` up to ``√n``."""
    a = max(k for k in range(1, math.isqrt(n) + 1) if n % k == 0)
    return a, n // a


def dct_matrix(n: int) -> Tensor:
    """The orthonormal DCT-II matrix ``C (n, n)``, float64: ``C[k, i] = c_k cos(π (2i + 1) k / 2n)``."""
    k, i = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None, :]
    C = math.sqrt(2 / n) * torch.cos(math.pi * (2 * i + 1) * k / (2 * n))
    C[0] /= math.sqrt(2)
    return C


def splitmix64(seed: int, n: int) -> list[int]:
    """The first ``n`` outputs of SplitMix64 from ``seed`` (64-bit integers)."""
    mask, x, out = 2**64 - 1, seed, []
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def rotation_signs(n: int) -> Tensor:
    """``s (n,)`` float64 in {−1, 1}: the top bits of SplitMix64's sequence from :data:`SIGN_SEED`."""
    return torch.tensor([1.0 if z >> 63 else -1.0 for z in splitmix64(SIGN_SEED, n)], dtype=torch.float64)


_FACTORS: dict[tuple[int, torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}


def factors_on(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``s, C_a, C_b`` for width ``n`` on ``device`` in ``dtype`` (kept for the next call)."""
    key = (n, device, dtype)
    if key not in _FACTORS:
        a, b = kronecker_sides(n)
        _FACTORS[key] = tuple(t.to(device, dtype) for t in (rotation_signs(n), dct_matrix(a), dct_matrix(b)))
    return _FACTORS[key]


def rotate(x: Tensor) -> Tensor:
    """``x Q`` for rows ``x (..., n)``, computed in at least float32 and returned in ``x``'s dtype."""
    work = torch.promote_types(x.dtype, torch.float32)
    s, Ca, Cb = factors_on(x.shape[-1], x.device, work)
    X = (x.to(work) * s).unflatten(-1, (Ca.shape[0], Cb.shape[0]))
    return _sides_product(X, Ca, Cb).flatten(-2).to(x.dtype)


def unrotate(y: Tensor) -> Tensor:
    """``y Qᵀ`` for rows ``y (..., n)``: the inverse of :func:`rotate`."""
    work = torch.promote_types(y.dtype, torch.float32)
    s, Ca, Cb = factors_on(y.shape[-1], y.device, work)
    Y = y.to(work).unflatten(-1, (Ca.shape[0], Cb.shape[0]))
    return (_sides_product(Y, Ca.T, Cb.T).flatten(-2) * s).to(y.dtype)


def _sides_product(X: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """``A X Bᵀ`` for each ``X (a, b)`` of ``X (..., a, b)``: one 2-D matmul on the right, one batched
    on the left (``A`` broadcast, not copied; autograd keeps only the constant factors), in ``X``'s
    dtype even under autocast."""
    with torch.autocast(X.device.type, enabled=False):
        return A @ (X @ B.T)


def rotate_hessian(H: Tensor) -> Tensor:
    """``Qᵀ H Q`` for a symmetric ``H (n, n)``: the second moment of the rotated inputs."""
    return rotate(rotate(H).T)


def rotate_factors(factors: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``(Qᵀ F, F⁻¹ Q)`` from ``(F, F⁻¹)`` with ``F Fᵀ = H``: a factor of ``Qᵀ H Q`` and its inverse."""
    F, F_inv = factors
    return rotate(F.T).T, rotate(F_inv)
