"""QuantLinear: a frozen linear layer whose weight lives packed at 2/3/4 bits.

The weight is held as GPTQ-layout buffers (:mod:`projq_train.quant.pack`), never as a
parameter, so optimizers, ``requires_grad_`` and dtype casts of the model leave it alone.
``y = x Ŵᵀ + b`` with ``Ŵ = dequant(qweight)``; the backward pass computes ``∂L/∂x = ∂L/∂y · Ŵ``
only. A layer quantized with ``quant.rotate_inputs`` holds ``Ŵ Q`` and computes ``(x Q)(Ŵ Q)ᵀ``
(:mod:`projq_train.quant.rotation`). Two backends compute the products:

- ``torch``: dequantize to the input's dtype, then dense matmuls, one block of about
  :data:`DEQUANTIZE_BLOCK_ELEMENTS` input rows at a time (``y = Σ x[:, rows] Ŵᵀ[rows]``), so no
  layer's whole float weight exists. Works everywhere; it is the reference the fused kernel is
  tested against. The blocks are rebuilt in the backward pass instead of being kept alive,
  unless ``save_dequantized`` is set (then the whole weight is dequantized and kept). Inside
  :func:`dequantize_once`, each layer dequantizes once per dtype and reuses the result: the
  float weights' memory, for repeated inference (evaluation, generation) without a kernel.
- ``triton``: fused dequantize + matmul on CUDA (:mod:`projq_train.quant.triton_kernels`).
  ``auto`` uses it on CUDA once a self-test against the torch backend has passed on that
  device, and falls back to torch with a warning if the test fails.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from projq_train.quant.pack import PACKING, PackedWeight, dequantize_packed, float_scales, packed_length
from projq_train.quant.rotation import rotate
from projq_train.quant.rtn import check_grid, check_scale_bits

log = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "triton"]
_TRITON_READY: dict[tuple[torch.device, torch.dtype], bool] = {}
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEQUANTIZE_BLOCK_ELEMENTS = 2**21  # weights the torch backend dequantizes at once (8 MiB in fp32)


def triton_ready(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernels run and agree with the torch backend on ``device`` for ``dtype``
    inputs (tested once per device and dtype, so a run compiles only the kernels it uses)."""
    if device.type != "cuda" or dtype not in TRITON_DTYPES:
        return False
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if (device, dtype) not in _TRITON_READY:
        try:
            from projq_train.quant import triton_kernels
        except ImportError as err:
            problem = f"triton is not importable ({err})"
        else:
            problem = triton_kernels.self_test(device, (dtype,))
        if problem:
            warnings.warn(f"QuantLinear uses the torch backend on {device}: {problem}", stacklevel=2)
        else:
            log.info("QuantLinear: Triton kernels passed their self-test on %s in %s", device, dtype)
        _TRITON_READY[device, dtype] = not problem
    return _TRITON_READY[device, dtype]


def dequantize_block_rows(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Input rows the torch backend dequantizes at once: about :data:`DEQUANTIZE_BLOCK_ELEMENTS`
    weights, in whole groups and whole packing units (at most ``in_features``)."""
    gs = check_grid(bits, group_size, in_features)
    align = math.lcm(PACKING[bits][0], gs)
    return min(in_features, max(align, DEQUANTIZE_BLOCK_ELEMENTS // out_features // align * align))


class _QuantMatmul(torch.autograd.Function):
    """``x (..., in) → x Ŵᵀ (..., out)`` with a gradient for ``x`` only."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear, fused: bool) -> Tensor:
        ctx.layer, ctx.fused = layer, fused
        if fused:
            from projq_train.quant.triton_kernels import matmul

            return matmul(x.reshape(-1, x.shape[-1]), *layer.packed_tensors(), layer.bits).reshape(
                *x.shape[:-1], layer.out_features
            )
        if layer.save_dequantized:
            w_t = layer.dequantize_t(x.dtype)  # (in, out)
            ctx.save_for_backward(w_t)
            return x @ w_t
        x2, y = x.reshape(-1, x.shape[-1]), None
        for rows, w_rows in layer.dequantized_row_blocks(x.dtype):  # Σ_blocks x[:, rows] Ŵᵀ[rows]
            y = x2[:, rows] @ w_rows if y is None else y.addmm_(x2[:, rows], w_rows)
            del w_rows  # before the next block is dequantized
        return y.reshape(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        layer = ctx.layer
        if ctx.fused:
            from projq_train.quant.triton_kernels import matmul_grad_input

            g = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
            grad_x = matmul_grad_input(g, *layer.packed_tensors(), layer.bits)
            return grad_x.reshape(*grad_y.shape[:-1], layer.in_features), None, None
        if layer.save_dequantized:
            return grad_y @ ctx.saved_tensors[0].T, None, None
        g, grad_x = grad_y.reshape(-1, grad_y.shape[-1]), None
        for rows, w_rows in layer.dequantized_row_blocks(grad_y.dtype):
            part = g @ w_rows.T  # ∂L/∂x[:, rows] = ∂L/∂y Ŵ[:, rows]
            del w_rows  # before the next block is dequantized
            if rows == slice(0, layer.in_features):  # one block: the whole weight
                grad_x = part
                continue
            if grad_x is None:
                grad_x = g.new_empty(g.shape[0], layer.in_features)
            grad_x[:, rows] = part
        return grad_x.reshape(*grad_y.shape[:-1], layer.in_features), None, None


class QuantLinear(nn.Module):
    """Frozen ``(out_features, in_features)`` linear layer with a packed ``bits``-bit weight."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: Backend = "auto",
        save_dequantized: bool = False,
        scale_bits: int = 16,
        rotated_inputs: bool = False,
    ) -> None:
        super().__init__()
        gs = check_grid(bits, group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, gs
        self.backend, self.save_dequantized = backend, save_dequantized
        self.rotated_inputs = rotated_inputs  # the codes hold W Q: inputs are rotated first
        self._dense: dict[torch.dtype, Tensor] | None = None  # Ŵᵀ by dtype inside dequantize_once
        n_groups = in_features // gs
        self.register_buffer(
            "qweight",
            torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32, device=device),
        )
        self.register_buffer(
            "qzeros",
            torch.zeros(n_groups, packed_length(out_features, bits), dtype=torch.int32, device=device),
        )
        check_scale_bits(scale_bits)
        scale_dtype = torch.float16 if scale_bits == 16 else torch.float8_e4m3fn
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=scale_dtype, device=device))
        exponent = torch.zeros(1, dtype=torch.int32, device=device) if scale_bits == 8 else None
        self.register_buffer("scale_exponent", exponent)  # 8-bit scales: the layer's power of two
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32, device=device) // gs)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_packed(cls, pw: PackedWeight, bias: Tensor | None = None, **kwargs) -> QuantLinear:
        layer = cls(
            pw.in_features,
            pw.out_features,
            pw.bits,
            pw.group_size,
            bias=bias is not None,
            dtype=bias.dtype if bias is not None else torch.float32,
            device="meta",
            scale_bits=pw.scale_bits,
            rotated_inputs=pw.rotated_inputs,
            **kwargs,
        )
        for name, t in pw.tensors().items():
            setattr(layer, name, t)
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def packed_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``qweight, qzeros, scales, g_idx`` as the kernels read them: the scales in fp16."""
        return self.qweight, self.qzeros, float_scales(self.scales, self.scale_exponent), self.g_idx

    def packed(self) -> PackedWeight:
        return PackedWeight(
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            self.bits,
            self.group_size,
            self.in_features,
            self.out_features,
            self.scale_exponent,
            self.rotated_inputs,
        )

    def dequantize_t(self, dtype: torch.dtype) -> Tensor:
        """``Ŵᵀ (in, out)`` in ``dtype`` as stored (torch reference; a rotated layer's ``(Ŵ Q)ᵀ``)."""
        if self._dense is None:
            return dequantize_packed(*self.packed_tensors(), self.bits, dtype)
        if dtype not in self._dense:
            self._dense[dtype] = dequantize_packed(*self.packed_tensors(), self.bits, dtype)
        return self._dense[dtype]

    def dequantized_row_blocks(self, dtype: torch.dtype) -> Iterator[tuple[slice, Tensor]]:
        """``(rows, Ŵᵀ[rows])`` in ``dtype`` over blocks of input rows of about
        :data:`DEQUANTIZE_BLOCK_ELEMENTS` weights (whole groups, whole packing units), so the torch
        backend never holds a layer's whole float weight; one block, the whole weight, inside
        :func:`dequantize_once`."""
        if self._dense is not None:
            yield slice(0, self.in_features), self.dequantize_t(dtype)
            return
        step = dequantize_block_rows(self.in_features, self.out_features, self.bits, self.group_size)
        packed = self.packed_tensors()  # 8-bit scales made fp16 once, not once per block
        for start in range(0, self.in_features, step):
            rows = slice(start, min(start + step, self.in_features))
            yield rows, dequantize_packed(*packed, self.bits, dtype, rows)

    def _fused(self, x: Tensor) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "triton":
            if not triton_ready(x.device, x.dtype):
                raise RuntimeError(
                    "backend='triton' needs CUDA, a working Triton install and float32/float16/bfloat16 "
                    f"inputs (got {x.dtype} on {x.device})"
                )
            return True
        return triton_ready(x.device, x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if self.rotated_inputs:
            x = rotate(x)
        y = _QuantMatmul.apply(x, self, self._fused(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        """Follow the model's device moves, but keep the scales in their dtype (fp16 or e4m3): they
        are part of the packed format, and a cast such as ``model.to(torch.bfloat16)`` would round
        them."""
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(self.qweight.device)
        return self

    def weight_bits(self) -> float:
        """Stored bits per weight: packed codes, zeros, scales (and their exponent) and g_idx over
        ``in·out`` weights."""
        total = sum(t.numel() * t.element_size() for t in self.packed().tensors().values())
        return 8 * total / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend}"
            + (", scale_bits=8" if self.scale_exponent is not None else "")
            + (", rotated_inputs=True" if self.rotated_inputs else "")
        )


@contextmanager
def dequantize_once(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every torch-backend :class:`QuantLinear` of ``model`` keeps its
    dequantized weight after first use, so repeated forward passes skip the unpacking; the
    copies are dropped on exit. Costs the float weights' memory; the packed buffers must not
    change inside the block."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer._dense = {}
    try:
        yield model
    finally:
        for layer in layers:
            layer._dense = None


def swap_in_quant_linears(model: nn.Module, weights: dict[str, PackedWeight], **kwargs) -> nn.Module:
    """Replace each ``nn.Linear`` named in ``weights`` by a :class:`QuantLinear` (bias kept)."""
    for name, pw in weights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if (old.out_features, old.in_features) != (pw.out_features, pw.in_features):
            raise ValueError(
                f"{name}: packed weight is ({pw.out_features}, {pw.in_features}), "
                f"the model's layer is ({old.out_features}, {old.in_features})"
            )
        if not old.weight.is_meta:  # a skeleton's layer (meta) leaves the packed weight where it is
            pw = pw.to(old.weight.device)
        setattr(parent, child, QuantLinear.from_packed(pw, old.bias, **kwargs))
    return model
