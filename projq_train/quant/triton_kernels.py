"""Fused dequantize + matmul for packed 2/3/4-bit weights (CUDA, Triton).

Imported lazily by :mod:`projq_train.quant.linear`; CPU installs never import it. Both
kernels read the GPTQ-layout tensors of :mod:`projq_train.quant.pack` and rebuild a
``(BLOCK_K, BLOCK_N)`` tile of ``Ŵᵀ`` in registers: code ``k`` of column ``n`` sits at bit
``bits·k`` of ``qweight[:, n]``'s bit stream (word ``bits·k // 32``, shift ``bits·k % 32``);
at 3 bits a code may straddle two words, so the next word is read where the shift exceeds 29.

- :func:`matmul`: ``y (M, out) = x (M, in) · Ŵᵀ``
- :func:`matmul_grad_input`: ``dx (M, in) = dy (M, out) · Ŵ``
- :func:`dequantize`: the dense ``Ŵᵀ``, for the ``dense`` path of both (dequantize, then
  cuBLAS), which many tokens can favour: the fused kernels rebuild each weight tile once per
  block of rows, a dense weight is built once. Which is faster is measured per shape on first use.
- :func:`round_columns`: GPTQ's rounding of a sub-block of columns with its error feedback
  (:func:`projq_train.quant.gptq.round_columns`), one kernel instead of seven operations per column.

With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (with one fixed tile size
per kernel instead of autotuning), which is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _extract(lo_ptrs, shift, mask, next_word: tl.constexpr, BITS: tl.constexpr):
    """Codes of ``BITS`` bits at bit ``shift`` of the words at ``lo_ptrs`` (``+ next_word`` for
    the following word, which 3-bit codes at shift 30 or 31 continue into)."""
    lo = tl.load(lo_ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    code = (lo >> shift) & ((1 << BITS) - 1)
    if BITS == 3:
        cross = shift > 29
        hi = tl.load(lo_ptrs + next_word, mask=mask & cross, other=0).to(tl.uint32, bitcast=True)
        code = code | ((hi << tl.where(cross, 32 - shift, 0)) & 7)
    return code


@triton.jit
def _dequant_tile(
    qw_ptr,
    qz_ptr,
    sc_ptr,
    gi_ptr,
    offs_k,
    offs_n,
    K,
    N,
    stride_qw,
    stride_qz,
    stride_sc,
    BITS: tl.constexpr,
):
    """``Ŵᵀ[offs_k, offs_n]`` as a float32 ``(BLOCK_K, BLOCK_N)`` tile (zero outside the matrix)."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    kbit = offs_k * BITS
    wptrs = qw_ptr + (kbit // 32)[:, None] * stride_qw + offs_n[None, :]
    kshift = (kbit % 32).to(tl.uint32)[:, None] + tl.zeros_like(offs_n).to(tl.uint32)[None, :]
    codes = _extract(wptrs, kshift, mask, stride_qw, BITS)
    g = tl.load(gi_ptr + offs_k, mask=offs_k < K, other=0)
    nbit = offs_n * BITS
    zptrs = qz_ptr + g[:, None] * stride_qz + (nbit // 32)[None, :]
    nshift = tl.zeros_like(offs_k).to(tl.uint32)[:, None] + (nbit % 32).to(tl.uint32)[None, :]
    zeros = _extract(zptrs, nshift, mask, 1, BITS)
    scales = tl.load(sc_ptr + g[:, None] * stride_sc + offs_n[None, :], mask=mask, other=0.0)
    return (codes.to(tl.int32) - zeros.to(tl.int32)).to(tl.float32) * scales.to(tl.float32)


@triton.jit
def _tile_ids(M, COLS, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program. Program ids walk GROUP_M row blocks per column
    block, so neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    n_m, n_c = tl.cdiv(M, BLOCK_M), tl.cdiv(COLS, BLOCK_C)
    first_m = pid // (GROUP_M * n_c) * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * n_c)) % rows, (pid % (GROUP_M * n_c)) // rows


@triton.jit
def _matmul_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    sc_ptr,
    gi_ptr,
    y_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_qw,
    stride_qz,
    stride_sc,
    stride_ym,
    BITS: tl.constexpr,
    IEEE: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``y`` over the ``program_id(1)``-th of ``SPLIT_K`` slices
    of ``K``. ``ATOMIC``: add into a zeroed float32 ``y`` (split-K); else store in ``y``'s dtype.
    ``BLOCK_M == 1`` (one token) reduces on the CUDA cores instead of a padded ``tl.dot``."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = tl.program_id(1) * per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        w = _dequant_tile(
            qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, K, N, stride_qw, stride_qz, stride_sc, BITS
        )  # (BLOCK_K, BLOCK_N), float32
        if BLOCK_M == 1:
            acc += tl.sum(tl.trans(x.to(tl.float32)) * w, axis=0, keep_dims=True)
        elif IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_input_kernel(
    g_ptr,
    qw_ptr,
    qz_ptr,
    sc_ptr,
    gi_ptr,
    dx_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_gm,
    stride_qw,
    stride_qz,
    stride_sc,
    stride_dm,
    BITS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(
            g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :],
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
            other=0.0,
        )  # (BLOCK_M, BLOCK_N)
        w = _dequant_tile(
            qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, K, N, stride_qw, stride_qz, stride_sc, BITS
        ).to(g.dtype)  # (BLOCK_K, BLOCK_N)
        if IEEE:
            acc += tl.dot(g, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(g, tl.trans(w))
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _dequant_kernel(
    qw_ptr,
    qz_ptr,
    sc_ptr,
    gi_ptr,
    w_ptr,
    N,
    K,
    stride_qw,
    stride_qz,
    stride_sc,
    stride_w,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``(BLOCK_K, BLOCK_N)`` tile of the dense ``Ŵᵀ`` in ``w``'s dtype."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _dequant_tile(
        qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, K, N, stride_qw, stride_qz, stride_sc, BITS
    )
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    tl.store(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def _configs(shapes: list[tuple[int, ...]], split: bool = True) -> list[triton.Config]:
    """Autotuning candidates from ``(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages)``
    (``split=False``: without ``SPLIT_K``, for the grad-input kernel)."""
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}
            | ({"SPLIT_K": split_k} if split else {}),
            num_warps=warps,
            num_stages=stages,
        )
        for m, n, k, split_k, warps, stages in shapes
    ]


# Many tokens: enough output tiles to fill the GPU; each program walks all of K.
_LARGE = [
    (16, 64, 64, 1, 4, 4),
    (16, 128, 64, 1, 4, 4),
    (32, 64, 64, 1, 4, 4),
    (64, 64, 64, 1, 4, 3),
    (64, 128, 32, 1, 4, 4),
    (128, 64, 32, 1, 4, 4),
    (128, 128, 32, 1, 8, 3),
]
# Up to 16 tokens: one row of tiles, so K is split across programs to keep every SM reading.
_SMALL = [
    (16, 64, 64, 4, 4, 3),
    (16, 64, 128, 8, 4, 3),
    (16, 128, 64, 4, 4, 3),
    (16, 128, 64, 8, 4, 3),
    (16, 64, 64, 16, 4, 3),
    (16, 128, 128, 16, 8, 3),
]
# One token (decoding): a matrix-vector product, reduced on the CUDA cores.
_GEMV = [
    (1, 32, 128, 8, 4, 3),
    (1, 64, 64, 8, 4, 3),
    (1, 64, 128, 4, 4, 3),
    (1, 64, 128, 8, 4, 3),
    (1, 128, 64, 4, 4, 3),
    (1, 128, 64, 16, 4, 2),
    (1, 128, 128, 8, 8, 3),
    (1, 256, 64, 8, 8, 3),
]
if INTERPRET:  # one small config each instead of autotuning; SPLIT_K = 3 leaves slices of a short K empty
    _GEMV, _SMALL, _LARGE = [(1, 32, 32, 3, 4, 1)], [(16, 32, 32, 3, 4, 1)], [(16, 32, 32, 1, 4, 1)]

_KEY = ["M_BUCKET", "N", "K", "BITS", "IEEE"]  # M in power-of-two buckets: no re-tuning per batch shape
_matmul = {  # split-K paths add into a zeroed float32 output, which autotuning must re-zero per trial
    "gemv": triton.autotune(_configs(_GEMV), key=_KEY, reset_to_zero=["y_ptr"])(_matmul_kernel),
    "split": triton.autotune(_configs(_SMALL), key=_KEY, reset_to_zero=["y_ptr"])(_matmul_kernel),
    "tiled": triton.autotune(_configs(_LARGE), key=_KEY)(_matmul_kernel),
}
_grad_input = triton.autotune(_configs(_LARGE, split=False), key=_KEY)(_grad_input_kernel)
_FASTER: dict[tuple, str] = {}

MatmulPath = Literal["gemv", "split", "tiled", "dense"]


def _bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 4096)


def _faster(product: Callable[..., Tensor], a: Tensor, packed: tuple[Tensor, ...], bits: int) -> str:
    """``tiled`` or ``dense``: whichever computes ``product(a, *packed, bits, path)`` in less GPU
    time, measured on the first call for this product, token bucket, layer shape and dtype."""
    (K,), N = packed[3].shape, packed[2].shape[1]
    key = (product.__name__, _bucket(a.shape[0]), N, K, bits, a.dtype, a.device)
    if key not in _FASTER:
        if INTERPRET:  # no GPU clock
            _FASTER[key] = "tiled"
        else:
            from triton.testing import do_bench

            def gpu_ms(path: str) -> float:
                return do_bench(partial(product, a, *packed, bits, path), warmup=5, rep=20)

            _FASTER[key] = min(("tiled", "dense"), key=gpu_ms)
    return _FASTER[key]


def dequantize(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, dtype: torch.dtype
) -> Tensor:
    """The dense ``Ŵᵀ (in, out)`` in ``dtype``, in one pass over the packed weight."""
    (K,), N = g_idx.shape, scales.shape[1]
    w = torch.empty(K, N, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(K, 32), triton.cdiv(N, 128))
    _dequant_kernel[grid](
        qweight,
        qzeros,
        scales,
        g_idx,
        w,
        N,
        K,
        qweight.stride(0),
        qzeros.stride(0),
        scales.stride(0),
        w.stride(0),
        BITS=bits,
        BLOCK_N=128,
        BLOCK_K=32,
    )
    return w


def matmul(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    path: MatmulPath | None = None,
) -> Tensor:
    """``x (M, in) · Ŵᵀ → (M, out)`` in ``x``'s dtype.

    Paths: ``gemv`` (one token: a matrix-vector product on the CUDA cores), ``split`` (up to 16
    tokens: ``K`` split across programs, float32 atomic adds), ``tiled`` (``M × N`` tiles with
    ``tl.dot``), ``dense`` (:func:`dequantize`, then a cuBLAS matmul; the weight exists densely
    only during the call). ``None``: by token count, and beyond 16 tokens the faster of ``tiled``
    and ``dense``, timed once per shape."""
    x = x.contiguous()
    (M, K), N = x.shape, scales.shape[1]
    packed = (qweight, qzeros, scales, g_idx)
    if path is None:
        path = ("gemv" if M == 1 else "split") if M <= 16 else _faster(matmul, x, packed, bits)
    if path == "dense":
        return x @ dequantize(*packed, bits, x.dtype)
    atomic = path != "tiled"
    y = torch.zeros(M, N, dtype=torch.float32, device=x.device) if atomic else x.new_empty(M, N)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    _matmul[path][grid](
        x,
        *packed,
        y,
        M,
        N,
        K,
        _bucket(M),
        x.stride(0),
        qweight.stride(0),
        qzeros.stride(0),
        scales.stride(0),
        y.stride(0),
        BITS=bits,
        IEEE=x.dtype == torch.float32,
        ATOMIC=atomic,
    )
    return y.to(x.dtype)


def matmul_grad_input(
    grad_y: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    path: Literal["tiled", "dense"] | None = None,
) -> Tensor:
    """``dy (M, out) · Ŵ → (M, in)`` in ``dy``'s dtype. Paths as for :func:`matmul`; ``None``:
    ``tiled`` up to 16 tokens, beyond that the faster of ``tiled`` and ``dense``."""
    grad_y = grad_y.contiguous()
    (M, N), K = grad_y.shape, g_idx.shape[0]
    packed = (qweight, qzeros, scales, g_idx)
    if path is None:
        path = "tiled" if M <= 16 else _faster(matmul_grad_input, grad_y, packed, bits)
    if path == "dense":
        return grad_y @ dequantize(*packed, bits, grad_y.dtype).T
    dx = torch.empty(M, K, dtype=grad_y.dtype, device=grad_y.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    _grad_input[grid](
        grad_y,
        *packed,
        dx,
        M,
        N,
        K,
        _bucket(M),
        grad_y.stride(0),
        qweight.stride(0),
        qzeros.stride(0),
        scales.stride(0),
        dx.stride(0),
        BITS=bits,
        IEEE=grad_y.dtype == torch.float32,
    )
    return dx


@triton.jit
def _round_half_even(x):
    """``torch.round``: to the nearest integer, ties to the even one."""
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _round_columns_kernel(
    w_ptr,
    h_ptr,
    scale_ptr,
    low_ptr,
    high_ptr,
    q_ptr,
    err_ptr,
    C,
    N,
    stride_w,
    stride_h_row,
    stride_h_col,
    stride_q,
    stride_err,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One ``(C, BLOCK_N)`` tile of the rows to round, held in registers while each row in turn
    is rounded and its error fed into itself and the rows below it (outputs are independent in
    GPTQ), then written back as the torch loop leaves it."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    in_n, in_c = offs_n < N, offs_c < C
    tile = tl.load(
        w_ptr + offs_c[:, None] * stride_w + offs_n[None, :], mask=in_c[:, None] & in_n[None, :], other=0.0
    )
    scale = tl.load(scale_ptr + offs_n, mask=in_n, other=1.0)
    low = tl.load(low_ptr + offs_n, mask=in_n, other=0.0)
    high = tl.load(high_ptr + offs_n, mask=in_n, other=0.0)
    for i in range(0, C):
        w = tl.sum(tl.where(offs_c[:, None] == i, tile, 0.0), axis=0)  # row i of the tile
        q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(w, scale)), low), high) * scale
        err = tl.math.div_rn(w - q, tl.load(h_ptr + i * (stride_h_row + stride_h_col)))
        tl.store(q_ptr + i * stride_q + offs_n, q, mask=in_n)
        tl.store(err_ptr + i * stride_err + offs_n, err, mask=in_n)
        h = tl.load(h_ptr + i * stride_h_row + offs_c * stride_h_col, mask=in_c & (offs_c >= i), other=0.0)
        tile = tile - h[:, None] * err[None, :]
    tl.store(w_ptr + offs_c[:, None] * stride_w + offs_n[None, :], tile, mask=in_c[:, None] & in_n[None, :])


def round_columns(
    W1: Tensor, Hinv1: Tensor, scale: Tensor, low: Tensor, high: Tensor, q: Tensor, err: Tensor
) -> None:
    """:func:`projq_train.quant.gptq.round_columns` in one kernel: at most 64 float32 rows, each
    contiguous (``Hinv1`` may have any strides)."""
    C, N = W1.shape
    if C > 64 or not W1.stride(1) == q.stride(1) == err.stride(1) == 1:
        raise ValueError(f"round_columns takes at most 64 contiguous rows, got {C} of strides {W1.stride()}")
    block_n = 32 if INTERPRET else 64  # 64 programs for 4096 outputs; not tuned on a GPU yet
    _round_columns_kernel[(triton.cdiv(N, block_n),)](
        W1,
        Hinv1,
        scale.contiguous(),
        low.contiguous(),
        high.contiguous(),
        q,
        err,
        C,
        N,
        W1.stride(0),
        *Hinv1.stride(),
        q.stride(0),
        err.stride(0),
        BLOCK_C=max(triton.next_power_of_2(C), 16),
        BLOCK_N=block_n,
    )


def self_test(device: torch.device, dtypes: tuple[torch.dtype, ...] | None = None) -> str | None:
    """Run every path of both products at every bit width on ``device`` against the torch
    reference (act-order groups, ragged sizes) for inputs of ``dtypes`` (default: float32,
    float16, and bfloat16 on CUDA); ``None`` when they agree, else what went wrong."""
    from projq_train.quant.pack import PackedWeight, dequantize_packed
    from projq_train.quant.rtn import rtn_quantize

    gen = torch.Generator().manual_seed(0)
    if dtypes is None:  # bf16 on CUDA only: the interpreter's tl.dot mishandles bf16 operands
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if bf16 else ())
    cases = [  # (product, path, rows)
        *(("forward", path, m) for path, m in (("gemv", 1), ("split", 5), ("tiled", 37), ("dense", 37))),
        *(("grad_input", path, m) for path, m in (("tiled", 5), ("tiled", 37), ("dense", 37))),
    ]
    try:
        for bits in (2, 3, 4):
            q = rtn_quantize(torch.randn(72, 160, generator=gen), bits, 32)
            q.g_idx = q.g_idx[torch.randperm(160, generator=gen)]  # act-order style group map
            tensors = tuple(PackedWeight.from_quantized(q).to(device).tensors().values())
            w_t = dequantize_packed(*tensors, bits, torch.float32)  # (in, out)
            for dtype, (product, path, m) in itertools.product(dtypes, cases):
                if product == "forward":
                    x = torch.randn(m, 160, generator=gen).to(device, dtype)
                    got, ref = matmul(x, *tensors, bits, path), x.float() @ w_t
                else:
                    dy = torch.randn(m, 72, generator=gen).to(device, dtype)
                    got, ref = matmul_grad_input(dy, *tensors, bits, path), dy.float() @ w_t.T
                err = (got.float() - ref).abs().max().item()
                tol = 1e-3 if dtype == torch.float32 else 2e-2
                if not err <= tol * ref.abs().max().item():
                    return (
                        f"{product} ({path}) at {bits} bits in {dtype} with M={m} differs from the "
                        f"torch reference by {err:.3g}"
                    )
    except Exception as err:  # any compile or launch failure means: do not use the kernels
        return f"{type(err).__name__}: {err}"
    return None
