"""LoRA adapters on packed QuantLinear bases, through peft's custom-module extension point.

``QuantLoraLinear`` wraps a :class:`QuantLinear` (kept as ``base_layer``) the way peft's own
quantized LoRA layers do: ``y = base(x) + s · B(A(dropout(x)))`` with ``s = lora_alpha / r``.
:func:`attach_adapters` registers it with ``LoraConfig._register_custom_module`` and builds
the peft model; :func:`init_from_compensation` then loads ProjQ's phase-2 factors so that the
adapted model computes ``Q + B_c A_c`` at step 0: ``lora_A = A_c`` and ``lora_B = B_c / s``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from projq_train.quant.calibrate import QuantizedModule
from projq_train.quant.linear import QuantLinear

ADAPTER = "default"


class QuantLoraLinear(nn.Module, LoraLayer):
    """peft LoRA layer around a frozen :class:`QuantLinear`. Merging is not supported: the base is
    packed; ``projq-train export`` writes merged models instead."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: float = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError("DoRA is not supported on packed QuantLinear bases")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError("adapters cannot be merged into a packed base; use `projq-train export`")

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            if not torch.is_autocast_enabled(x.device.type):  # autocast casts in the matmul: no copy
                x = x.to(lora_A.weight.dtype)
            h = lora_A(self.lora_dropout[name](x))  # (..., r)
            result = result + (lora_B(h) * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def attach_adapters(
    model: nn.Module,
    target_modules: list[str],
    rank: int,
    alpha: float,
    dropout: float,
    ranks: dict[str, int] | None = None,
) -> PeftModel:
    """Freeze ``model`` and add rank-``rank`` LoRA adapters (peft's default init: ``B = 0``) to the
    named linear modules, whether they are ``nn.Linear``, :class:`QuantLinear` or bitsandbytes layers;
    ``ranks``: full module name → its own rank (``quant.allocate_ranks``), as peft's ``rank_pattern``
    (each name escaped: peft matches the keys as regular expressions), with ``alpha_pattern``
    keeping every module's scaling at ``alpha / rank``."""
    own = {re.escape(n): r for n, r in (ranks or {}).items() if r != rank}
    config = LoraConfig(
        r=rank,
        rank_pattern=own,
        alpha_pattern={n: alpha * r / rank for n, r in own.items()},
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, with_quant_linear(config), adapter_name=ADAPTER)


def with_quant_linear(config: LoraConfig) -> LoraConfig:
    """``config`` with :class:`QuantLoraLinear` registered as peft's LoRA layer for
    :class:`QuantLinear` bases (peft's private ``_register_custom_module``: see the canary test)."""
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    return config


def adapter_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """LoRA layers of a peft model by the name of the module they wrap in the base model."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def init_from_compensation(model: PeftModel, modules: dict[str, QuantizedModule]) -> None:
    """Set every adapter to the quantizer's compensation ``B_c A_c`` of its module, divided by the
    adapter's scaling, so the adapted model starts at ``Q + B_c A_c``."""
    layers = adapter_layers(model)
    missing = sorted(set(modules) - set(layers))
    if missing:
        raise ValueError(
            f"no adapter on quantized module(s) {missing[:3]}: they would lose their compensation"
        )
    for name, qm in modules.items():
        layer = layers[name]
        rank = layer.r[ADAPTER]
        if qm.lora_A.shape[0] != rank:
            raise ValueError(
                f"{name}: the artifact's compensation has rank {qm.lora_A.shape[0]}, the adapter rank {rank}"
            )
        lora_A, lora_B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        lora_A.copy_(qm.lora_A.to(lora_A))
        lora_B.copy_((qm.lora_B / layer.scaling[ADAPTER]).to(lora_B))
