"""Linear + cross-entropy in chunks of tokens: the loss from the final hidden states without the
full ``(tokens, vocab)`` logits.

For hidden rows ``h_i`` (``H``), an output matrix ``W`` (``V x H``, the ``lm_head``) and targets
``y_i``, the loss is ``L = Σ_i CE_i`` with ``CE_i = logsumexp(W h_i) - (W h_i)_{y_i}`` over the rows
whose target is not -100. Its gradients are ``∂L/∂h_i = (p_i - e_{y_i}) W`` and
``∂L/∂W = Σ_i (p_i - e_{y_i}) h_iᵀ`` with ``p_i = softmax(W h_i)``. :func:`linear_cross_entropy`
computes both in the forward pass, one chunk of rows at a time, and keeps only the gradients for
the backward pass, never the logits (the idea of Liger-Kernel's fused linear cross-entropy, in
plain torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from projq_train.data.instruct import IGNORE_INDEX

LOGITS_PER_CHUNK = 2**24  # fp32 elements of one chunk's logits (64 MiB) when chunk_tokens is unset


def _full_weight(weight: Tensor) -> Tensor:
    """``weight`` itself, or the whole tensor if FSDP2 sharded it (a DTensor; the all-gather is
    differentiable, so the gradient reaches the shards)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return weight
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T``; the gradients are computed in the forward pass
    (see :func:`linear_cross_entropy`)."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_tokens: int,
        grad_hidden_needed: bool,
        grad_weight_needed: bool,
    ) -> Tensor:
        N, H = hidden.shape
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None  # (N, H)
        grad_weight = (  # (V, H), accumulated in fp32 over the chunks
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if grad_weight_needed
            else None
        )
        with torch.autocast(hidden.device.type, enabled=False):  # the logits stay in fp32 under autocast
            for start in range(0, N, chunk_tokens):
                h = hidden[start : start + chunk_tokens]  # (C, H)
                y = targets[start : start + chunk_tokens]  # (C,)
                valid = y != IGNORE_INDEX  # (C,)
                y = torch.where(valid, y, 0)
                logits = (h.to(weight.dtype) @ weight.T).float()  # (C, V), the chunk's one vocab-sized buffer
                picked = logits.gather(1, y[:, None]).squeeze(1)  # (C,)
                top = logits.amax(dim=1, keepdim=True)  # (C, 1)
                shifted_exp = logits.sub_(top).exp_()  # in place: exp(logits - max) (C, V)
                norm = shifted_exp.sum(dim=1, keepdim=True)  # (C, 1)
                lse = (top + norm.log()).squeeze(1)  # (C,) logsumexp, without a workspace of its own
                total += torch.where(valid, lse - picked, 0.0).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                dlogits = shifted_exp.div_(norm)  # softmax, in place (C, V)
                dlogits.scatter_add_(1, y[:, None], -valid[:, None].float())  # p - onehot
                dlogits.mul_(valid[:, None])  # ignored rows have no gradient
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_tokens] = dlogits.to(weight.dtype) @ weight  # (C, H)
                if grad_weight is not None:
                    grad_weight.addmm_(dlogits.T, h.float())  # (V, H)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # a 0-dim fp32 factor keeps each gradient's dtype (one rounding for low-precision inputs)
        return (
            None if grad_hidden is None else grad_hidden * grad_output,
            None if grad_weight is None else grad_weight * grad_output,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int | None = None
) -> Tensor:
    """Summed cross-entropy of the logits ``hidden @ weight.T``, without keeping them for backward.

    Args:
        hidden: ``(N, H)`` rows, e.g. final hidden states of the tokens that have a target.
        weight: ``(V, H)`` output matrix (``lm_head.weight``); a DTensor sharded by FSDP2 is gathered
            with ``full_tensor()`` first.
        targets: ``(N,)`` long class indices in ``[0, V)``; -100 marks a row without a target (it adds
            nothing to the loss and gets a zero gradient).
        chunk_tokens: rows per chunk; default ``max(1, 2**24 // V)``, so that one chunk's fp32
            logits hold about 2**24 elements (64 MiB).

    Returns:
        A scalar fp32 tensor ``Σ_i [logsumexp(W h_i) - (W h_i)_{y_i}]`` over the rows with a target.

    The forward pass walks the chunks of rows: it computes a chunk's logits in fp32 (the product
    runs in ``weight``'s dtype, so a bf16 ``weight`` is never copied to fp32; hidden rows are cast to
    it), adds the chunk's cross-entropy, and at once its gradients: ``(p - onehot) @ W`` for the
    hidden rows and, only if ``weight`` requires a gradient, ``(p - onehot)ᵀ @ h`` into an fp32
    ``(V, H)`` accumulator. Nothing else is computed when no gradient is needed (``torch.no_grad``
    or inputs that do not require one).

    Memory: saved for backward are the ``(N, H)`` gradient of ``hidden`` in its dtype and, if needed,
    the ``(V, H)`` gradient of ``weight`` in its dtype, never logits. Transient, per chunk, one
    ``(chunk_tokens, V)`` fp32 buffer (the logits, turned in place into ``exp(logits - max)``, then
    ``p - onehot``; the logsumexp is taken from its row sums, with no workspace of its own) and, for
    a 16-bit ``weight``, a 16-bit one (the product before its cast to fp32, and the cast of
    ``p - onehot`` back), plus the fp32 weight-gradient accumulator when it is needed. Backward only
    scales the saved gradients by the incoming gradient.
    """
    weight = _full_weight(weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy needs hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if chunk_tokens is None:
        chunk_tokens = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    elif chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    grad_enabled = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(
        hidden,
        weight,
        targets,
        chunk_tokens,
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
    )


def causal_lm_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    num_tokens: Tensor | float | None = None,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Next-token cross-entropy of ``logits = hidden @ weight.T``, without the logits.

    Position ``t`` of ``hidden (B, T, H)`` predicts ``labels[:, t + 1]`` (``labels (B, T)``, -100 on
    prompt and padding); ``weight`` is the ``(V, H)`` output matrix. The hidden rows whose target is
    -100 are dropped first (a boolean mask selects the ``(M, H)`` rows that have one; no shifted copy
    of anything vocab-sized exists), then :func:`linear_cross_entropy` sums the loss in chunks of
    ``chunk_tokens`` rows. The sum is divided by ``num_tokens`` (default: the ``M`` labelled targets
    of this batch, i.e. the mean). A batch without labelled targets gives a zero loss (not NaN)
    that still has a gradient path, with zero gradients.

    Returns:
        A scalar fp32 tensor.
    """
    has_target = F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1))  # (B, T): position t has labels[:, t + 1]
    rows = hidden[has_target]  # (M, H)
    targets = labels[:, 1:][has_target[:, :-1]]  # (M,)
    total = linear_cross_entropy(rows, weight, targets, chunk_tokens)
    if num_tokens is None:
        num_tokens = has_target.sum().clamp_min(1)
    return total / num_tokens
