"""The gated MLP of Llama, Mistral and Qwen (``down(silu(gate(x)) * up(x))``) with one tensor
fewer kept for backward.

Autograd keeps, per token and layer, the gate projection ``g`` (for SiLU's gradient), ``silu(g)``
and ``u = up(x)`` (for the product's), and the product (the input of ``down_proj``). The function
here keeps ``g`` and ``u`` only and recomputes ``silu(g)`` in the backward pass: the same values
and gradients, and ``intermediate_size`` fewer elements per token and layer (on SmolLM2-135M, fp32,
1 x 128 tokens: 20 MiB of a 1.04 GiB peak; step time +5 %).

For ``s = sigmoid(g)``: ``silu(g) = g s``, ``silu'(g) = s (1 + g (1 - s))``, so for the output
``y = silu(g) u`` and its gradient ``dy``: ``dg = dy u silu'(g)`` and ``du = dy silu(g)``.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SILU_CLASSES = ("SiLU", "SiLUActivation")  # torch.nn.SiLU, transformers.activations.SiLUActivation


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_up = grad * silu
        grad_gate = grad * up * sig * (1 + gate * (1 - sig))
        return grad_gate, grad_up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for the backward pass."""
    return _SwiGLU.apply(gate, up)


def _lean_forward(self: nn.Module, x: Tensor) -> Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def use_lean_mlps(model: nn.Module) -> int:
    """Rebinds the ``forward`` of every gated SiLU MLP in ``model`` (a module with ``gate_proj``,
    ``up_proj``, ``down_proj`` and a SiLU ``act_fn``: torch's or transformers') to :func:`swiglu`;
    returns how many."""
    count = 0
    for module in model.modules():
        act = getattr(module, "act_fn", None)
        if type(act).__name__ in SILU_CLASSES and all(
            hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")
        ):
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
