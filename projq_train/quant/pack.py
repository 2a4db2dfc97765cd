"""Bit packing of 2/3/4-bit codes into int32 words, in the layout GPTQ checkpoints use.

Codes are packed along one dimension as a little-endian bit stream: code ``k`` occupies
bits ``[bits·k, bits·k + bits)`` of the stream, and stream bit ``b`` is bit ``b mod 32`` of
word ``b // 32``. A *unit* is the smallest run of codes that fills whole words
(``32·W = bits·L``)::

    bits  codes/unit L  words/unit W
     2        16            1        word0 = c15 … c1 c0        (c0 in bits 0-1)
     4         8            1        word0 = c7 … c1 c0         (c0 in bits 0-3)
     3        32            3        see below

    3 bits, one unit of 32 codes in 3 words (bit 31 on the left, bit 0 on the right):

    word0  |c10₁c10₀|  c9 | c8 | … | c1 | c0 |      c10 is split: bits 0-1 here,
    word1  |c21₀|  c20 | … | c12 | c11 |c10₂|      bit 2 in word1's bit 0;
    word2  |  c31 | c30 | … | c23 | c22 |c21₂c21₁|  c21: bit 0 in word1's bit 31, bits 1-2 here

No bit is wasted. ``PACKING[bits]`` lists, for one unit, every piece of a code that lands in
a word as ``(code, word, code_shift, word_shift, width)``; packing loops over that table,
vectorized over all units and over the other dimension. Unpacking indexes the bit stream
directly, the way the Triton kernel does. A length that is not a multiple of ``L`` is padded
with zero codes; unpacking takes the true length back.

The GPTQ checkpoint tensors of a linear layer ``W (out, in)`` are ``qweight (in·bits/32, out)``
(codes packed along ``in``), ``qzeros (n_groups, out·bits/32)`` (zero points packed along
``out``), ``scales (n_groups, out)`` fp16 and ``g_idx (in,)`` int32. Zero points are stored as
they are (what GPTQModel calls format v2); the original AutoGPTQ format v1 stores ``zero − 1``.
With 8-bit scales (``quant.scale_bits: 8``) ``scales`` holds e4m3 floats and ``scale_exponent
(1,)`` int32 the layer's power of two: a scale is ``scales · 2^scale_exponent``, which fp16 holds
exactly, so GPTQ kernels read :meth:`PackedWeight.float_scales` as they read fp16 scales.
A weight quantized with ``quant.rotate_inputs`` holds the codes of ``W Q``
(:mod:`projq_train.quant.rotation`; ``rotated_inputs``, recorded in the artifact's metadata): the
same tensors, read against rotated inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from projq_train.quant.rotation import unrotate
from projq_train.quant.rtn import E4M3_MAX, QuantizedWeight, check_grid, check_scale_bits


def _pieces(bits: int) -> tuple[int, int, tuple[tuple[int, int, int, int, int], ...]]:
    """``(L, W, pieces)`` for one unit: every (code, word, code_shift, word_shift, width) piece."""
    words = bits // math.gcd(bits, 32)
    codes = 32 * words // bits
    pieces = []
    for k in range(codes):
        start, end = bits * k, bits * (k + 1)
        while start < end:
            word, word_shift = divmod(start, 32)
            width = min(end, 32 * (word + 1)) - start
            pieces.append((k, word, start - bits * k, word_shift, width))
            start += width
    return codes, words, tuple(pieces)


PACKING = {bits: _pieces(bits) for bits in (2, 3, 4)}
PACKED_KEYS = ("qweight", "qzeros", "scales", "g_idx", "scale_exponent")  # the last with 8-bit scales


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words that hold ``length`` codes (padded to whole units)."""
    codes, words, _ = PACKING[bits]
    return -(-length // codes) * words


def packed_storage_bits(
    out_features: int, in_features: int, bits: int, group_size: int, scale_bits: int = 16
) -> int:
    """Bits a ``(out, in)`` weight stores in this layout: codes, zero points and scales of
    ``scale_bits`` (8: plus the layer's 32-bit exponent; ``g_idx``, an index that plain group
    order does not need, not counted). Uniform 3 bits at group 64 store ``3 + (3 + 16) / 64 ≈
    3.30`` bits per weight with fp16 scales, ``3 + (3 + 8) / 64 ≈ 3.17`` with 8-bit ones."""
    check_scale_bits(scale_bits)
    groups = in_features // (in_features if group_size == -1 else group_size)
    codes = packed_length(in_features, bits) * out_features
    exponent = 32 if scale_bits == 8 else 0
    return (
        32 * (codes + groups * packed_length(out_features, bits))
        + scale_bits * groups * out_features
        + exponent
    )


def pack(codes: Tensor, bits: int, dim: int = 0) -> Tensor:
    """Pack integer ``codes`` in ``[0, 2**bits)`` along ``dim`` (of a 2-D tensor) into int32 words."""
    L, W, pieces = PACKING[bits]
    c = codes.to(torch.int64).movedim(dim, 0)
    n = c.shape[0]
    c = torch.cat([c, c.new_zeros(-(-n // L) * L - n, *c.shape[1:])])
    c = c.reshape(-1, L, *c.shape[1:])  # (units, L, rest)
    out = c.new_zeros(c.shape[0], W, *c.shape[2:])  # (units, W, rest)
    for k, w, code_shift, word_shift, width in pieces:
        out[:, w] |= ((c[:, k] >> code_shift) & ((1 << width) - 1)) << word_shift
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # reinterpret as signed
    return out.reshape(-1, *out.shape[2:]).movedim(0, dim).contiguous()


def unpack(words: Tensor, bits: int, length: int, dim: int = 0) -> Tensor:
    """Inverse of :func:`pack`: the first ``length`` codes along ``dim``, as uint8."""
    return unpack_rows(words.movedim(dim, 0), bits, length).to(torch.uint8).movedim(0, dim).contiguous()


def unpack_rows(words: Tensor, bits: int, length: int) -> Tensor:
    """The first ``length`` codes packed along dim 0 of ``words (packed, rest)``, as int32 ``(length, rest)``.

    Reads the bit stream directly: code ``k`` is at shift ``bits·k mod 32`` of word
    ``bits·k // 32``, continued in the next word when it straddles (3 bits, shift 30 or 31).
    """
    bit = torch.arange(length, device=words.device) * bits
    word, shift = bit // 32, (bit % 32).to(torch.int32)
    mask = (1 << bits) - 1
    codes = words[word]  # (length, rest)
    codes >>= shift.view(-1, *[1] * (words.dim() - 1))
    # the arithmetic shift brings in sign bits above bit 31 - shift; masking drops them, except
    # for codes that continue into the next word, which are rebuilt from both words
    codes &= mask
    cross = (shift > 32 - bits).nonzero().squeeze(1)
    if cross.numel():
        low_width = (32 - shift[cross]).view(-1, *[1] * (words.dim() - 1))
        low = (words[word[cross]] >> (32 - low_width)) & ((1 << low_width) - 1)
        codes[cross] = low | ((words[word[cross] + 1] << low_width) & mask)
    return codes


def dequantize_packed(
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    dtype: torch.dtype,
    rows: slice | None = None,
) -> Tensor:
    """``Ŵᵀ (in, out)`` in ``dtype`` from GPTQ-layout tensors (the torch reference), or only its
    input rows ``rows`` (a ``slice`` whose start is a multiple of the codes per unit, ``PACKING[bits][0]``):
    a block of rows costs that block's memory, not the whole weight's."""
    (in_f,), (n_groups, out_f) = g_idx.shape, scales.shape
    start, stop, _ = (rows or slice(None)).indices(in_f)
    unit_codes, unit_words, _ = PACKING[bits]
    if start % unit_codes:
        raise ValueError(
            f"a block of rows must start at a multiple of {unit_codes} at {bits} bits, got {start}"
        )
    words = qweight[start // unit_codes * unit_words :]
    w = unpack_rows(words, bits, stop - start).to(torch.float32)  # (rows, out)
    gs = in_f // n_groups
    g = g_idx[start:stop]
    if (
        start % gs == 0
        and (stop - start) % gs == 0
        and torch.equal(g, torch.arange(start, stop, device=g.device, dtype=g.dtype) // gs)
    ):
        # contiguous groups: only the block's groups, broadcast per group instead of gathered per row
        groups = slice(start // gs, stop // gs)
        zeros = unpack_rows(qzeros[groups].T, bits, out_f).T.to(torch.float32)  # (count, out)
        w3 = w.view(-1, gs, out_f)
        w3.sub_(zeros[:, None]).mul_(scales[groups, None].to(torch.float32))
    else:
        zeros = unpack_rows(qzeros.T, bits, out_f).T.to(torch.float32)  # (n_groups, out)
        g = g.long()
        w.sub_(zeros[g]).mul_(scales[g].to(torch.float32))
    return w.to(dtype)


def float_scales(scales: Tensor, exponent: Tensor | None) -> Tensor:
    """Stored ``scales`` in fp16: as they are, or 8-bit ones times ``2^exponent`` (exact, as
    :func:`eight_bit_scales` checked)."""
    if exponent is None:
        return scales
    return (scales.float() * torch.exp2(exponent.float())).half()


def eight_bit_scales(scales: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes, exponent)``: float32 ``scales`` that are e4m3 values times one power of two, as
    e4m3 ``codes`` and the smallest such int32 ``exponent (1,)`` (any larger one the quantizer
    used holds a subset of its values). Raises if a scale is not stored exactly that way or not
    exactly in fp16, which the GPTQ kernels read."""
    exponent = math.ceil(math.log2(scales.abs().amax().item() / E4M3_MAX))
    codes = (scales / 2.0**exponent).to(torch.float8_e4m3fn)
    decoded = codes.float() * 2.0**exponent
    if not (torch.equal(decoded, scales) and torch.equal(decoded.half().float(), scales)):
        raise ValueError("scales are not e4m3 values times one power of two within fp16's range")
    return codes, torch.tensor([exponent], dtype=torch.int32, device=scales.device)


@dataclass
class PackedWeight:
    """A quantized linear weight ``(out, in)`` in the GPTQ checkpoint layout (see module docstring)."""

    qweight: Tensor  # (packed_length(in), out) int32
    qzeros: Tensor  # (n_groups, packed_length(out)) int32
    scales: Tensor  # (n_groups, out) float16, or float8_e4m3fn with scale_exponent
    g_idx: Tensor  # (in,) int32
    bits: int
    group_size: int
    in_features: int
    out_features: int
    scale_exponent: Tensor | None = None  # (1,) int32 with 8-bit scales
    rotated_inputs: bool = False  # the codes hold W Q (quant.rotate_inputs); dequantize() gives W's basis

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, rotated_inputs: bool = False) -> PackedWeight:
        """Pack a :class:`QuantizedWeight` (of ``W Q`` when ``rotated_inputs``); exact because its
        scales are already stored values."""
        out_f, in_f = q.codes.shape
        if q.scale_bits == 8:
            scales, exponent = eight_bit_scales(q.scales.T.float())
        else:
            scales, exponent = q.scales.T.to(torch.float16), None
        return cls(
            qweight=pack(q.codes.T, q.bits, dim=0),
            qzeros=pack(q.zeros.T, q.bits, dim=1),
            scales=scales.contiguous(),
            g_idx=q.g_idx.to(torch.int32).contiguous(),
            bits=q.bits,
            group_size=q.group_size,
            in_features=in_f,
            out_features=out_f,
            scale_exponent=exponent,
            rotated_inputs=rotated_inputs,
        )

    @property
    def scale_bits(self) -> int:
        return 16 if self.scale_exponent is None else 8

    def float_scales(self) -> Tensor:
        """The scales ``(n_groups, out)`` in fp16, as GPTQ kernels read them (exact)."""
        return float_scales(self.scales, self.scale_exponent)

    def unpack(self) -> QuantizedWeight:
        return QuantizedWeight(
            codes=unpack(self.qweight, self.bits, self.in_features, dim=0).T.contiguous(),
            scales=self.float_scales().T.float().contiguous(),
            zeros=unpack(self.qzeros, self.bits, self.out_features, dim=1).T.contiguous(),
            g_idx=self.g_idx,
            bits=self.bits,
            group_size=self.group_size,
            scale_bits=self.scale_bits,
        )

    def dequantize(self) -> Tensor:
        """``Ŵ (out, in)`` float32, in the model's basis (codes of ``W Q``: their values times ``Qᵀ``)."""
        w = dequantize_packed(
            self.qweight, self.qzeros, self.float_scales(), self.g_idx, self.bits, torch.float32
        ).T
        return unrotate(w) if self.rotated_inputs else w

    def to(self, device: torch.device | str) -> PackedWeight:
        return replace(self, **{key: t.to(device) for key, t in self.tensors().items()})

    @property
    def storage_bits(self) -> int:
        """Bits the packed codes, zero points and scales hold (:func:`packed_storage_bits`)."""
        stored = [t for key, t in self.tensors().items() if key != "g_idx"]
        return 8 * sum(t.numel() * t.element_size() for t in stored)

    def tensors(self) -> dict[str, Tensor]:
        """The GPTQ tensors by their checkpoint names (and ``scale_exponent`` with 8-bit scales)."""
        named = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}
        return named if self.scale_exponent is None else {**named, "scale_exponent": self.scale_exponent}

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, Tensor],
        bits: int,
        group_size: int,
        in_features: int,
        out_features: int,
        rotated_inputs: bool = False,
    ) -> PackedWeight:
        """Rebuild from checkpoint tensors, checking every shape against the stated layer size;
        8-bit (e4m3) scales come with ``scale_exponent``."""
        gs = check_grid(bits, group_size, in_features)
        n_groups = in_features // gs
        expected = {
            "qweight": (packed_length(in_features, bits), out_features),
            "qzeros": (n_groups, packed_length(out_features, bits)),
            "scales": (n_groups, out_features),
            "g_idx": (in_features,),
        }
        if "scales" in tensors and tensors["scales"].dtype == torch.float8_e4m3fn:
            expected["scale_exponent"] = (1,)
        for key, shape in expected.items():
            if key not in tensors:
                raise KeyError(f"packed weight is missing '{key}'")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(
                    f"packed '{key}' has shape {tuple(tensors[key].shape)}, expected {shape} for a "
                    f"{bits}-bit ({out_features}, {in_features}) weight with group size {gs}"
                )
        return cls(
            tensors["qweight"],
            tensors["qzeros"],
            tensors["scales"],
            tensors["g_idx"],
            bits,
            gs,
            in_features,
            out_features,
            tensors["scale_exponent"] if "scale_exponent" in expected else None,
            rotated_inputs,
        )
