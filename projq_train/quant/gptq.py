"""GPTQ (Frantar et al., 2023): column-by-column rounding with second-order error feedback.

Minimizes ``‖(W − Q) Xᵀ‖² = tr((W − Q) H (W − Q)ᵀ)`` with ``H = XᵀX / N``. Each column
is rounded on its group's grid and the rounding error is spread over the columns not yet
quantized through the upper Cholesky factor of ``H⁻¹``; updates are applied lazily per
block of columns, so the big matrix product is done once per block; inside a block the same
holds per sub-block of :data:`SUB_BLOCK` columns: a rounded column updates the rest of its
sub-block at once, and the rest of the block receives a sub-block's errors in one product
(less memory traffic than a rank-1 update of the whole block per column). The loop works on
``Wᵀ``, where a column is a contiguous row that each step reads and writes in place.

On CUDA a sub-block is rounded by one Triton kernel (:func:`round_columns`) instead of seven
small operations per column: on a GPU the column loop is otherwise bound by kernel launches.
"""

from __future__ import annotations

import functools
import itertools
import logging

import torch
from torch import Tensor

from projq_train.quant.rtn import (
    QuantizedWeight,
    check_grid,
    clipped_params,
    minmax_params,
    scale_exponent,
)

log = logging.getLogger(__name__)
SUB_BLOCK = 16  # columns whose rank-1 updates are applied one by one; the rest of a block lazily
TRIANGULAR_BASE = 128  # upper_triangular_inverse: blocks up to this size are solved directly


def inverse_cholesky(H: Tensor, damp: float, max_tries: int = 6) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U = (H + λI)⁻¹``), ``λ = damp · mean(diag H)``:
    ``U = R⁻¹`` with ``R`` from :func:`reversed_cholesky` (:func:`upper_triangular_inverse`), at
    about half the cost of inverting ``H + λI`` and factoring the inverse."""
    return upper_triangular_inverse(reversed_cholesky(H, damp, max_tries))


def cholesky_or_none(A: Tensor) -> Tensor | None:
    """The lower Cholesky factor of ``A``, or ``None`` where ``A`` is not positive definite in
    floating point. On CUDA such a matrix can come back as NaN with ``info`` 0
    (pytorch/pytorch#121009; most likely what crashed a quantization on an H200), so a factor needs a
    finite diagonal too: a NaN anywhere in a row reaches that row's diagonal entry."""
    L, info = torch.linalg.cholesky_ex(A)
    return L if info.item() == 0 and bool(torch.isfinite(L.diagonal()).all()) else None


def reversed_cholesky(H: Tensor, damp: float, max_tries: int = 6) -> Tensor:
    """Upper ``R`` with ``R Rᵀ = H + λI``, ``λ = damp · mean(diag H)``: the Cholesky factor of
    ``H + λI`` with rows and columns in reverse order, read back reversed. When the factorization
    fails (H is not positive definite in floating point), ``λ`` is multiplied by 10 and it is
    retried, up to ``max_tries`` times."""
    mean_diag = H.diagonal().mean().clamp_min(1e-12)
    reversed_H = H.flip(0, 1)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(max_tries):
        lam = damp * mean_diag * 10**attempt
        L = cholesky_or_none(reversed_H + lam * eye)
        if L is not None:
            return L.flip(0, 1)
    raise torch.linalg.LinAlgError(
        f"Cholesky of the Hessian failed even with dampening {damp * 10 ** (max_tries - 1):g}; "
        "the calibration activations are degenerate (too few samples?)"
    )


def upper_triangular_inverse(R: Tensor, base: int = TRIANGULAR_BASE) -> Tensor:
    """``R⁻¹`` of an invertible upper triangular ``R (n, n)``, by halves:
    ``[[A, B], [0, C]]⁻¹ = [[A⁻¹, −A⁻¹ B C⁻¹], [0, C⁻¹]]``, down to blocks of ``base`` solved
    directly. The work goes into matrix products (``n³ / 3`` flops), where a triangular solve
    against the identity does ``n³``."""
    n = R.shape[0]
    if n <= base:
        return torch.linalg.solve_triangular(R, torch.eye(n, dtype=R.dtype, device=R.device), upper=True)
    h = n // 2
    A_inv = upper_triangular_inverse(R[:h, :h], base)
    C_inv = upper_triangular_inverse(R[h:, h:], base)
    out = torch.zeros_like(R)
    out[:h, :h], out[h:, h:] = A_inv, C_inv
    out[:h, h:] = -(A_inv @ R[:h, h:]) @ C_inv
    return out


def round_columns(
    W1: Tensor, Hinv1: Tensor, scale: Tensor, low: Tensor, high: Tensor, q: Tensor, err: Tensor
) -> None:
    """Round the rows of ``W1 (c, out)`` (``c`` columns of ``W``, each a row) one after the other:
    row ``i`` onto the grid ``(x / scale).round().clamp(low, high) · scale`` (per output, ``(out,)``)
    into ``q[i]``, its error divided by the pivot ``Hinv1[i, i]`` into ``err[i]``, and that error
    fed forward into rows ``i`` and below through ``Hinv1[i, i:]`` (``W1`` is updated in place).
    On CUDA, one Triton kernel (:func:`projq_train.quant.triton_kernels.round_columns`) where it
    passed its self-test (:func:`triton_rounding`)."""
    if W1.is_cuda and triton_rounding(W1.device):
        from projq_train.quant.triton_kernels import round_columns as fused

        fused(W1, Hinv1, scale, low, high, q, err)
    else:
        round_columns_torch(W1, Hinv1, scale, low, high, q, err)


def round_columns_torch(
    W1: Tensor, Hinv1: Tensor, scale: Tensor, low: Tensor, high: Tensor, q: Tensor, err: Tensor
) -> None:
    """:func:`round_columns` in torch operations, seven per row."""
    for i, pivot in enumerate(Hinv1.diagonal().tolist()):
        w, qi, ei = W1[i], q[i], err[i]
        torch.div(w, scale, out=qi).round_().clamp_(low, high).mul_(scale)
        torch.sub(w, qi, out=ei).div_(pivot)
        W1[i:].addr_(Hinv1[i, i:], ei, alpha=-1)


@functools.cache
def triton_rounding(device: torch.device) -> bool:
    """Whether :func:`round_columns` uses the Triton kernel on ``device``: Triton imports and the
    kernel agrees with :func:`round_columns_torch` on a small case, ties included (checked once per
    device; otherwise a warning, and the torch loop)."""
    try:
        from projq_train.quant.triton_kernels import round_columns as fused

        gen = torch.Generator().manual_seed(0)
        A = torch.randn(16, 16, generator=gen)
        Hinv1 = torch.linalg.cholesky(A @ A.T + 16 * torch.eye(16)).T.to(device)
        scale = torch.full((256,), 0.1, device=device)
        low, high = torch.full_like(scale, -4.0), torch.full_like(scale, 3.0)
        W1 = (torch.randn(16, 256, generator=gen) * 0.3).to(device)
        W1[0, :3] = torch.tensor([0.5, 1.5, -2.5], device=device) * scale[:3]  # ties
        runs = [(W1.clone(), torch.zeros_like(W1), torch.zeros_like(W1)) for _ in range(2)]
        round_columns_torch(runs[0][0], Hinv1, scale, low, high, *runs[0][1:])
        fused(runs[1][0], Hinv1, scale, low, high, *runs[1][1:])
        agree = (runs[0][1] != runs[1][1]).float().mean().item() < 1e-3 and all(
            torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(runs[0], runs[1], strict=True)
        )
        problem = None if agree else "the kernel disagrees with the torch loop"
    except Exception as err:  # Triton missing, or its compiler failing on this device
        problem = f"{type(err).__name__}: {err}"
    if problem:
        log.warning("GPTQ rounds column by column in torch on %s: %s", device, problem)
    return problem is None


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int = 128,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    clip: bool = False,
    scale_bits: int = 16,
) -> QuantizedWeight:
    """Quantize ``W (out, in)`` against the input second moment ``H (in, in)``.

    Args:
        bits: 2, 3 or 4.
        group_size: columns sharing a scale/zero (-1: one group per row).
        block_size: columns per lazy-update block (rounded to a multiple of the group size).
        damp: relative dampening added to ``diag(H)``.
        act_order: quantize columns in order of decreasing ``diag(H)``; groups then follow
            that order and ``g_idx`` records each column's group.
        clip: choose each group's grid by a ``diag(H)``-weighted MSE search over shrunk
            min-max ranges (:func:`clipped_params`) instead of plain min-max.
        scale_bits: 16 (fp16 scales) or 8 (e4m3 scales times a power of two for the layer).
    """
    out_f, in_f = W.shape
    gs = check_grid(bits, group_size, in_f)
    maxq = 2**bits - 1
    exponent = scale_exponent(W, bits, scale_bits)
    Wt = W.detach().float().t().clone(memory_format=torch.contiguous_format)  # (in, out): a column a row
    H = H.detach().float().clone()

    dead = H.diagonal() == 0  # inputs that are always zero: any value is free, use 0
    H[dead, dead] = 1.0
    Wt[dead] = 0.0

    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        Wt, H = Wt[perm], H[perm][:, perm]
    Hinv = inverse_cholesky(H, damp)  # (in, in) upper
    d = H.diagonal()

    def grid(wt: Tensor, cols: slice) -> tuple[Tensor, Tensor]:
        w = wt.t()  # (out, columns)
        return (
            clipped_params(w, maxq, d[cols], exponent=exponent) if clip else minmax_params(w, maxq, exponent)
        )

    block = max(block_size // gs, 1) * gs if gs < in_f else block_size
    deq_t = torch.zeros_like(Wt)  # the rounded columns, (code − zero) · scale
    scales = torch.zeros(out_f, in_f // gs, device=Wt.device)
    zeros = torch.zeros_like(scales)
    if gs == in_f:
        scale, zero = grid(Wt, slice(None))
        scales[:, 0], zeros[:, 0] = scale, zero
        low, high = -zero, maxq - zero

    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = Wt[i1:i2].clone()  # (b, out) updated in place as columns are rounded
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # sub-blocks, also cut where a group starts, so that one grid serves each
        starts = {*range(0, i2 - i1, SUB_BLOCK), *(range(-i1 % gs, i2 - i1, gs) if gs < in_f else ())}
        bounds = [*sorted(starts), i2 - i1]
        for j1, j2 in itertools.pairwise(bounds):  # the rank-1 updates stay inside a sub-block
            col = i1 + j1
            if gs < in_f and col % gs == 0:  # a group starts here and lies inside this block
                scale, zero = grid(W1[j1 : j1 + gs], slice(col, col + gs))
                scales[:, col // gs], zeros[:, col // gs] = scale, zero
                low, high = -zero, maxq - zero  # code − zero stays in [−zero, maxq − zero]
            round_columns(W1[j1:j2], Hinv1[j1:j2, j1:j2], scale, low, high, deq_t[col : i1 + j2], Err1[j1:j2])
            W1[j2:] -= Hinv1[j1:j2, j2:].t() @ Err1[j1:j2]
        Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err1

    g_idx = torch.arange(in_f, device=Wt.device) // gs
    deq = deq_t.t()
    codes = torch.round(deq / scales[:, g_idx]) + zeros[:, g_idx]  # exact: deq is an integer times the scale
    if perm is not None:
        inv = torch.argsort(perm)
        codes, g_idx = codes[:, inv], g_idx[inv]
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.uint8),
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=gs,
        scale_bits=scale_bits,
    )
