"""Driving a decoder layer by layer: the first layer's inputs, then each layer's outputs.

The quantizer (:mod:`~projq_train.quant.calibrate`) and the sensitivity pass
(:mod:`~projq_train.quant.sensitivity`) both walk the decoder this way, one layer on the
device at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from projq_train.host_memory import return_free_pages
from projq_train.models import decoder_layers, layer_output


class StopForward(Exception):
    """Raised by a hook once everything needed from a forward pass has been seen."""


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, ids: Tensor, device: torch.device, batch_size: int
) -> tuple[list[Tensor], list[dict]]:
    """Hidden states and keyword arguments the first decoder layer receives, per batch of ``ids``."""
    layers = decoder_layers(model)
    others = [m for n, m in model.model.named_children() if n != "layers"]
    for m in others:
        m.to(device)
    inputs, kwargs = [], []

    def grab(_mod, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append(kw)
        raise StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
        for m in others:
            m.to("cpu")
    return inputs, kwargs


def run_layer(layer: nn.Module, inputs: list[Tensor], kwargs: list[dict]) -> list[Tensor]:
    """``layer``'s outputs for each batch of ``inputs`` (with its keyword arguments)."""
    outs = []
    for h, kw in zip(inputs, kwargs, strict=True):
        outs.append(layer_output(layer(h, **kw)))
        release_batch(h)
    return outs


def release_batch(h: Tensor) -> None:
    """On CPU, give a calibration batch's freed temporaries back to the OS before the next batch,
    so they do not fragment the heap into the quantization peak."""
    if h.device.type == "cpu":
        return_free_pages()
