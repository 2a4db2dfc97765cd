"""The quantization grid: asymmetric min-max per group, and round-to-nearest (RTN).

A weight ``W (out, in)`` is cut along ``in`` into groups of ``group_size`` columns
(``-1``: one group per row). Each (row, group) has a scale ``s`` and an integer zero
point ``z``; a weight is stored as a code ``c ∈ [0, 2^bits)`` and read back as
``ŵ = (c − z) · s``. Scales are fp16 values (kept in float32), so packing is exact; with
``scale_bits=8`` they are 8-bit floats (e4m3: 4 exponent bits, 3 mantissa bits) times a power
of two per layer, the layout NVFP4 uses for its block scales, so a scale costs 8 bits instead
of 16 (uniform 3 bits at group 64: 3.17 bits per weight instead of 3.30). The quantizers round
each scale before they round the weights to its grid, so the codes fit the scale stored.
``g_idx (in,)`` names the group of every input column, the layout GPTQ checkpoints use,
so act-order GPTQ (whose groups follow a permutation) fits too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from projq_train.config import SUPPORTED_BITS, SUPPORTED_SCALE_BITS

FP16_TINY, FP16_MAX = 2.0**-24, 65504.0  # scales live on the fp16 grid (smallest subnormal, largest)
E4M3_TINY, E4M3_MAX = 2.0**-9, 448.0  # the 8-bit scales' grid before the layer's power of two
SCALE_HEADROOM = 4.0  # how far below E4M3_MAX a layer's widest min-max scale sits (GPTQ's updates)


def check_grid(bits: int, group_size: int, in_features: int) -> int:
    """Validate bit width and group size for a layer; return the effective group size."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size == -1:
        return in_features
    if group_size <= 0:
        raise ValueError(f"group_size must be a positive number of columns or -1 (per row), got {group_size}")
    if in_features % group_size != 0:
        raise ValueError(
            f"group_size {group_size} does not divide in_features {in_features}; "
            f"choose a divisor of {in_features} or -1 (one group per row)"
        )
    return group_size


@dataclass
class QuantizedWeight:
    """Integer codes plus per-group scale and zero point of one linear weight."""

    codes: Tensor  # (out, in) uint8, values in [0, 2**bits)
    scales: Tensor  # (out, n_groups) float32
    zeros: Tensor  # (out, n_groups) uint8 integer zero points
    g_idx: Tensor  # (in,) int32, group of each input column
    bits: int
    group_size: int  # columns per group; equals in_features for per-row groups
    scale_bits: int = 16  # 16: fp16 scales; 8: e4m3 scales times a power of two per layer

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return replace(
            self,
            codes=self.codes.to(device),
            scales=self.scales.to(device),
            zeros=self.zeros.to(device),
            g_idx=self.g_idx.to(device),
        )

    def dequantize(self) -> Tensor:
        """``Ŵ = (codes − zeros[:, g_idx]) · scales[:, g_idx]`` as an (out, in) float32 tensor."""
        g = self.g_idx.long()
        return (self.codes.float() - self.zeros[:, g].float()) * self.scales[:, g]


def check_scale_bits(scale_bits: int) -> None:
    if scale_bits not in SUPPORTED_SCALE_BITS:
        raise ValueError(f"scale_bits must be one of {SUPPORTED_SCALE_BITS}, got {scale_bits}")


def scale_exponent(W: Tensor, bits: int, scale_bits: int) -> int | None:
    """The power of two that 8-bit scales of ``W`` are multiplied by (None for fp16 scales, which
    need none; :func:`round_scales` takes either): the widest min-max scale a group of ``W`` can
    have at ``bits`` (its range ``2·max|W|`` over ``2^bits − 1`` steps) lands
    :data:`SCALE_HEADROOM` to twice that many times below the largest e4m3 value (between 56 and
    112), which leaves room for the columns GPTQ updates and, below, scales down to 1/3500 of it
    with e4m3's full 3-bit mantissa (the smallest normal e4m3 value is 2^-6)."""
    check_scale_bits(scale_bits)
    if scale_bits == 16:
        return None
    widest = 2 * W.detach().abs().amax().item() / (2**bits - 1)
    return math.ceil(math.log2(max(widest, FP16_TINY) * SCALE_HEADROOM / E4M3_MAX))


def round_scales(scale: Tensor, exponent: int | None) -> Tensor:
    """``scale`` rounded to the nearest stored value, in float32: fp16 (``exponent`` None), or an
    e4m3 value times ``2**exponent`` (saturating at both ends, so no scale is 0)."""
    if exponent is None:
        return scale.clamp(FP16_TINY, FP16_MAX).to(torch.float16).float()  # as in GPTQ
    unit = 2.0**exponent
    return (scale / unit).clamp(E4M3_TINY, E4M3_MAX).to(torch.float8_e4m3fn).float() * unit


def minmax_params(w: Tensor, maxq: int, exponent: int | None = None) -> tuple[Tensor, Tensor]:
    """Asymmetric min-max grid for each row of ``w (out, g)``: scale (out,), integer zero (out,);
    the scales rounded as :func:`round_scales` stores them."""
    wmin = w.amin(dim=1)
    wmax = w.amax(dim=1)
    flat = wmax == wmin  # constant rows c: scale |c| with code 1, zero 0 (c > 0) or code 0, zero 1
    scale = round_scales(torch.where(flat, wmax.abs(), (wmax - wmin) / maxq), exponent)
    zero = torch.where(flat, (wmin < 0).float(), torch.round(-wmin / scale)).clamp(0, maxq)
    return scale, zero


def clipped_params(
    w: Tensor,
    maxq: int,
    weight: Tensor,
    shrinks: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6),
    exponent: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Grid for each row of ``w (out, g)`` whose range is the min-max range shrunk by the factor
    in ``shrinks`` that minimizes ``Σ_j weight_j (w_j − ŵ_j)²`` (``weight (g,)``, e.g. diag H);
    ``exponent`` as in :func:`minmax_params`.

    Clipping a few outliers buys a finer step for every other weight of the group; at 2-3 bits
    that usually lowers the error. Shrink 1.0 is plain min-max, so the result is never worse.
    Every shrink is tried at once, as one ``(shrinks, out, g)`` computation.
    """
    shrink = torch.tensor(shrinks, dtype=w.dtype, device=w.device)[:, None]  # (S, 1)
    ends = torch.stack([shrink * w.amin(dim=1), shrink * w.amax(dim=1)], dim=2)  # (S, out, 2)
    scale, zero = (t.view(len(shrinks), -1) for t in minmax_params(ends.view(-1, 2), maxq, exponent))
    deq = (quantize_to_grid(w, scale, zero, maxq) - zero[..., None]) * scale[..., None]  # (S, out, g)
    err = ((w - deq) ** 2 * weight).sum(dim=2)  # (S, out)
    best = err.argmin(dim=0, keepdim=True)  # the first of equal errors: the widest range
    return scale.gather(0, best)[0], zero.gather(0, best)[0]


def quantize_to_grid(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes (as float) of ``w (out, k)`` on the grid of per-row ``scale``, ``zero`` (out,)
    (or ``(..., out)``: several grids at once, codes ``(..., out, k)``)."""
    return torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, maxq)


def rtn_quantize(W: Tensor, bits: int, group_size: int = 128, scale_bits: int = 16) -> QuantizedWeight:
    """Round every weight of ``W (out, in)`` to the nearest point of its group's min-max grid
    (scales stored in ``scale_bits``, 16 or 8)."""
    out_f, in_f = W.shape
    gs = check_grid(bits, group_size, in_f)
    maxq = 2**bits - 1
    Wg = W.float().reshape(out_f * (in_f // gs), gs)  # one row per (row, group)
    scale, zero = minmax_params(Wg, maxq, scale_exponent(W, bits, scale_bits))
    codes = quantize_to_grid(Wg, scale, zero, maxq).reshape(out_f, in_f)
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scale.reshape(out_f, -1),
        zeros=zero.reshape(out_f, -1).to(torch.uint8),
        g_idx=torch.arange(in_f, dtype=torch.int32, device=W.device) // gs,
        bits=bits,
        group_size=gs,
        scale_bits=scale_bits,
    )
