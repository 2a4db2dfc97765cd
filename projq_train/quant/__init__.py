"""Quantization algorithms as pure tensor functions, and the per-weight entry point."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from projq_train.quant.gptq import gptq_quantize
from projq_train.quant.projq import lowrank_compensation, projq_quantize, spectral_tail
from projq_train.quant.rtn import QuantizedWeight, rtn_quantize

Method = Literal["rtn", "gptq", "projq"]
METHODS: tuple[str, ...] = ("rtn", "gptq", "projq")

__all__ = [
    "METHODS",
    "Method",
    "QuantizedWeight",
    "gptq_quantize",
    "lowrank_compensation",
    "projq_quantize",
    "quantize_weight",
    "rtn_quantize",
    "spectral_tail",
]


def quantize_weight(
    W: Tensor,
    H: Tensor | None,
    method: Method = "projq",
    bits: int = 4,
    group_size: int = 128,
    rank: int = 32,
    iters: int = 5,
    **options,
) -> QuantizedWeight:
    """Quantize one weight ``W (out, in)`` given ``H = XᵀX / N (in, in)`` of its inputs.

    ``method``: ``"rtn"`` (H unused), ``"gptq"``, or ``"projq"`` (uses ``rank``, ``iters``).
    ``options`` go to the method's function (``scale_bits``; for GPTQ and ProjQ also
    ``block_size``, ``damp``, ``act_order``, ``clip``; for ProjQ also ``tol``, ``alpha``, ``mode``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D (out, in) tensor, got shape {tuple(W.shape)}")
    if method == "rtn":
        return rtn_quantize(W, bits, group_size, **options)
    if H is None or H.shape != (W.shape[1], W.shape[1]):
        got = None if H is None else tuple(H.shape)
        raise ValueError(f"H must be ({W.shape[1]}, {W.shape[1]}) for W of shape {tuple(W.shape)}, got {got}")
    if method == "gptq":
        return gptq_quantize(W, H, bits, group_size, **options)
    return projq_quantize(W, H, bits, group_size, rank=rank, iters=iters, **options)[0]
