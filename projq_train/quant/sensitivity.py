"""How much the model's loss cares about each output channel of each quantized module.

Mixed precision needs one currency across modules: a module's error at 2 bits must be weighed
against another's at 4 by what it costs the model, not by its share of the module's own output
energy. For an error ``E = W − Q − BA`` the module's output moves by ``δ_t = E x_t``; to second
order, with the empirical Fisher of the output kept diagonal (as BRECQ weighs its block
reconstructions), the next-token loss grows by about

    ΔL ≈ ½ Σ_j F_j · (E H Eᵀ)_jj,    F_j = mean_t (∂CE_t / ∂y_tj)²,    H = mean_t x_t x_tᵀ,

summed over the module's output channels ``j``. :func:`output_sensitivities` measures ``F`` of
every target module with one forward and one backward pass of the float model over the first
:data:`SENSITIVITY_TOKENS` calibration tokens. It streams like the quantizer: with a weight
``source`` each decoder layer is read for the forward pass, dropped, and read again for the
backward pass (last layer first), so one decoder layer's float weights exist at a time; every
layer's input hidden states of those tokens are kept for the backward pass. No weight gradient
is computed: the backward pass asks autograd for the gradient of each layer's input only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from projq_train.host_memory import release_freed_memory
from projq_train.loss import causal_lm_loss_from_hidden
from projq_train.models import decoder_layers, layer_output
from projq_train.quant.layerwise import capture_layer_inputs, run_layer
from projq_train.weights import (
    WeightSource,
    load_to_device,
    materialize,
    release_weights,
    unload_from_device,
)

SENSITIVITY_TOKENS = 4096  # calibration tokens (whole windows, at least one) the Fisher is measured on
FISHER_FLOOR = 1.0  # compensation_row_weights: the even share beside the Fisher's (mean 1)
LOSS_CHUNK_LOGITS = 2**22  # fp32 logits per chunk of the loss (16 MiB), while every layer's inputs are kept


def sensitivity_windows(ids: Tensor) -> Tensor:
    """The first windows of ``ids (n, seqlen)`` holding at most :data:`SENSITIVITY_TOKENS` tokens
    (at least one window)."""
    return ids[: max(1, SENSITIVITY_TOKENS // ids.shape[1])]


def compensation_row_weights(sensitivity: Tensor) -> Tensor:
    """The row weights ``d (out,)`` of ``quant.compensation: fisher``: ``d_j² = F_j / mean(F) +
    FISHER_FLOOR``, the output Fisher relative to its mean plus as much again spread evenly, so a
    channel whose measured Fisher is near 0 (a few thousand tokens estimate it) keeps a share."""
    F = sensitivity.double()
    return (F / F.mean().clamp_min(1e-30) + FISHER_FLOOR).sqrt()


def weighted_error(E: Tensor, H: Tensor, sensitivity: Tensor) -> float:
    """``Σ_j F_j (E H Eᵀ)_jj``: the loss increase (×2) an error ``E (out, in)`` of a module with
    input second moment ``H (in, in)`` and output sensitivity ``F (out,)`` costs."""
    return torch.einsum("oi,ij,oj,o->", E, H, E, sensitivity.to(E)).item()


def weighted_tails(E: Tensor, F: Tensor, sensitivity: Tensor, ranks: tuple[int, ...]) -> dict[int, float]:
    """The weighted error ``Σ_j F_j ((E − C) H (E − C)ᵀ)_jj`` (:func:`weighted_error`) left after the
    best rank-r correction ``C`` in that norm, for each ``r`` in ``ranks``: the tail
    ``Σ_{i>r} σ_i²`` of ``diag(√F) E F_H`` (``F_H F_Hᵀ = H``:
    :func:`~projq_train.quant.projq.hessian_factor`), from the eigenvalues of its smaller Gram
    matrix in fp64."""
    K = (sensitivity.double().clamp_min(0).sqrt()[:, None] * E.double()) @ F.double()
    gram = K.T @ K if K.shape[1] <= K.shape[0] else K @ K.T
    energy = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)  # σ_i², descending
    kept = torch.cat([energy.new_zeros(1), energy.cumsum(0)])
    total = K.pow(2).sum()
    return {r: max((total - kept[min(r, len(energy))]).item(), 0.0) for r in ranks}


def output_sensitivities(
    model: nn.Module,
    ids: Tensor,
    module_names: list[str],
    device: torch.device,
    source: WeightSource | None = None,
) -> dict[str, Tensor]:
    """``F (out,)`` fp32 on CPU of each module in ``module_names`` (full names of linear modules
    inside the decoder layers): the mean over the tokens of :func:`sensitivity_windows` of the
    squared gradient of the summed next-token cross-entropy with respect to the module's output.
    The windows go through one at a time (the backward pass's transients are one window's).

    With ``source``, ``model`` is a skeleton on the meta device (as :func:`quantize_model` takes
    it) and is left on it; without, its weights are used where they are and left unchanged.
    """
    windows = sensitivity_windows(ids)
    names = {id(m): n for n, m in model.named_modules()}
    wanted = set(module_names)
    head = model.get_output_embeddings()
    ends = [m for n, m in model.model.named_children() if n != "layers"]  # embeddings, final norm, rotary
    dtype = model.model.embed_tokens.weight.dtype
    if source is not None:
        for m in ends:
            materialize(m, f"{names[id(m)]}.", source, dtype)
        if model.config.tie_word_embeddings:
            model.tie_weights()  # the head is the embedding just read
        else:
            materialize(head, f"{names[id(head)]}.", source, dtype)
    inputs, kwargs = capture_layer_inputs(model, windows, device, batch_size=1)
    layers = list(decoder_layers(model))
    stored = []  # each layer's inputs, on CPU
    with torch.no_grad():
        for layer in layers:
            stored.append([h.cpu() for h in inputs])
            load_to_device(layer, f"{names[id(layer)]}.", source, dtype, device)
            inputs = run_layer(layer, inputs, kwargs)
            unload_from_device(layer, source)
    grads = _loss_gradients(model, head, inputs, windows.split(1), device)
    if source is not None:
        for m in (*ends, head):
            release_weights(m)
        if model.config.tie_word_embeddings:
            model.tie_weights()
    del inputs
    release_freed_memory()
    squares: dict[str, Tensor] = {}
    for layer, layer_inputs in zip(reversed(layers), reversed(stored), strict=True):
        load_to_device(layer, f"{names[id(layer)]}.", source, dtype, device)
        targets = {names[id(m)]: m for m in layer.modules() if names[id(m)] in wanted}
        grads = _layer_backward(layer, layer_inputs, kwargs, grads, targets, squares)
        unload_from_device(layer, source)
        layer_inputs.clear()  # this layer's stored inputs are no longer needed
        release_freed_memory()
    tokens = windows.numel()
    missing = wanted - set(squares)
    if missing:
        raise ValueError(f"no decoder layer has the modules {sorted(missing)}")
    return {n: squares[n].div_(tokens).cpu() for n in module_names}


def _loss_gradients(model, head, hidden: list[Tensor], batches: tuple[Tensor, ...], device) -> list[Tensor]:
    """∂(summed next-token CE)/∂(last layer's output), per batch; the final norm and head on ``device``."""
    norm = model.model.norm.to(device)
    head.to(device)
    weight = head.weight.detach()  # no gradient for the head: only for the hidden states
    chunk = max(1, LOSS_CHUNK_LOGITS // weight.shape[0])
    grads = []
    with torch.enable_grad():
        for h, batch in zip(hidden, batches, strict=True):
            h = h.detach().requires_grad_()
            batch = batch.to(device)
            loss = causal_lm_loss_from_hidden(norm(h), weight, batch, num_tokens=1.0, chunk_tokens=chunk)
            grads.append(torch.autograd.grad(loss, h)[0])
    norm.to("cpu")
    head.to("cpu")
    return grads


def _layer_backward(
    layer: nn.Module,
    inputs: list[Tensor],
    kwargs: list[dict],
    grads: list[Tensor],
    targets: dict[str, nn.Module],
    squares: dict[str, Tensor],
) -> list[Tensor]:
    """Run ``layer`` on each batch of ``inputs`` again with autograd, pull the output gradient
    ``grads`` back to its input, and add each target module's squared output gradient, summed
    over the tokens, to ``squares``. Returns the input gradients."""

    def hook(name):
        def fn(mod, _args, out):
            def grab(g):
                total = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
                squares[name] = squares[name] + total if name in squares else total

            out.register_hook(grab)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in targets.items()]
    device = next(layer.parameters()).device
    upstream = []
    try:
        with torch.enable_grad():
            for h, kw, g in zip(inputs, kwargs, grads, strict=True):
                h = h.to(device).requires_grad_()
                out = layer_output(layer(h, **kw))
                upstream.append(torch.autograd.grad(out, h, grad_outputs=g)[0])
    finally:
        for hd in handles:
            hd.remove()
    return upstream
