"""The LightningModule: a frozen packed base with trainable LoRA adapters (thin glue).

:func:`prepare_model` does the work and is usable without a Trainer: load the base model,
find or make the quantization artifact (ProjQ/GPTQ/RTN on the training device) or quantize to
NF4 with bitsandbytes, swap the linear layers for packed :class:`QuantLinear` layers, attach
peft LoRA adapters and initialize them. :class:`ProjQModule` calls it in ``configure_model``,
computes the loss with :func:`causal_lm_loss`, and keeps checkpoints adapter-only.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from peft import PeftModel
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.text import Perplexity

from projq_train.artifact import model_hash, quantize_or_load
from projq_train.config import (
    AdapterConfig,
    CalibrationConfig,
    ModelConfig,
    QuantConfig,
    ScheduleConfig,
    check_adapter_settings,
)
from projq_train.data.instruct import IGNORE_INDEX
from projq_train.lora import attach_adapters, init_from_compensation
from projq_train.models import load_model_and_tokenizer, load_tokenizer
from projq_train.quant.linear import swap_in_quant_linears
from projq_train.strategies import shard_model  # importing it registers trainer.strategy: projq_fsdp


def swap_in_nf4(model: nn.Module, target_modules: list[str], compute_dtype: torch.dtype, device) -> None:
    """Replace the target linears of the decoder layers by bitsandbytes NF4 ``Linear4bit`` layers
    (the QLoRA baseline), quantized on ``device``."""
    try:
        import bitsandbytes as bnb

        for name, old in list(model.model.layers.named_modules()):
            if not isinstance(old, nn.Linear) or name.rpartition(".")[2] not in target_modules:
                continue
            new = bnb.nn.Linear4bit(
                old.in_features, old.out_features, old.bias is not None, compute_dtype, quant_type="nf4"
            )
            new.weight = bnb.nn.Params4bit(old.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), child, new.to(device))
    except (ImportError, RuntimeError, NotImplementedError) as err:
        raise RuntimeError(f"quant.method nf4 needs bitsandbytes with a backend for {device}: {err}") from err


def prepare_model(
    model_cfg: ModelConfig,
    quant: QuantConfig,
    adapter: AdapterConfig,
    calibration: CalibrationConfig,
    artifact_dir: str | Path,
    device: torch.device,
    wait: bool = False,
) -> tuple[PeftModel, str]:
    """The trainable model and the id of its frozen base (artifact hash, or ``nf4-<model hash>``).
    With ``wait``, the artifact is awaited from another process instead of made."""
    check_adapter_settings(quant, adapter)
    model, tokenizer = load_model_and_tokenizer(model_cfg)
    if quant.method == "nf4":
        base_id = f"nf4-{model_hash(model)}"
        swap_in_nf4(model, quant.target_modules, getattr(torch, model_cfg.dtype), device)
        modules = {}
    else:
        path, modules = quantize_or_load(
            model, tokenizer, model_cfg, quant, calibration, artifact_dir, device, wait=wait
        )
        base_id = path.name
        swap_in_quant_linears(model, {name: qm.weight for name, qm in modules.items()})
    peft_model = attach_adapters(model, quant.target_modules, quant.rank, adapter.alpha, adapter.dropout)
    if adapter.init == "projq":
        init_from_compensation(peft_model, modules)
    return peft_model, base_id


def causal_lm_loss(logits: Tensor, labels: Tensor, num_tokens: Tensor | float | None = None) -> Tensor:
    """Next-token cross-entropy: ``logits (B, T, V)`` predict ``labels (B, T)`` shifted by one;
    positions labelled ``-100`` (prompt, padding) are ignored. Summed and divided by
    ``num_tokens`` (default: the labelled tokens of this batch, i.e. the mean)."""
    targets = labels[:, 1:].flatten()
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (num_tokens if num_tokens is not None else (targets != IGNORE_INDEX).sum())


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ProjQModule(L.LightningModule):
    """Fine-tune LoRA adapters on a ProjQ (or GPTQ/RTN/NF4) quantized base.

    Args:
        base: the base model to load (hub name, local path, or a config for a random model).
        quant: how its linear layers are quantized; ``quant.rank`` is the adapter rank.
        adapter: adapter init, alpha and dropout.
        calibration: text for the quantizer's calibration (unused for nf4 or a cached artifact).
        artifact_dir: root of the content-addressed quantization artifacts.
        optimizer: optimizer over the adapter parameters, e.g. ``torch.optim.AdamW`` or, on CUDA,
            ``bitsandbytes.optim.PagedAdamW8bit``.
        schedule: warmup + cosine learning-rate schedule, stepped every optimizer step (default:
            ``ScheduleConfig()``).
        gradient_checkpointing: recompute decoder activations in the backward pass to save memory.
    """

    def __init__(
        self,
        base: ModelConfig,
        quant: QuantConfig,
        adapter: AdapterConfig,
        calibration: CalibrationConfig,
        artifact_dir: str = "artifacts",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        schedule: ScheduleConfig | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_adapter_settings(quant, adapter)
        self.save_hyperparameters()  # for loggers and checkpoints; the typed configs are kept below
        self.base_cfg, self.quant, self.adapter, self.calibration = base, quant, adapter, calibration
        self.artifact_dir, self.optimizer_factory = artifact_dir, optimizer
        self.schedule, self.gradient_checkpointing = schedule or ScheduleConfig(), gradient_checkpointing
        self.tokenizer = load_tokenizer(base)  # the data module tokenizes with it (linked by the CLI)
        self.model: PeftModel | None = None
        self.base_id: str | None = None
        self.strict_loading = False  # checkpoints hold the adapters only
        self.ppl = Perplexity(ignore_index=IGNORE_INDEX)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        # quantize once: rank 0 finds or makes the artifact; the other ranks wait for it on the
        # file system (no collective, so a long quantization cannot time out a process group).
        # With several nodes, artifact_dir must be on a shared file system.
        strategy = self.trainer.strategy
        rank0 = self.trainer.is_global_zero
        cfgs = (self.base_cfg, self.quant, self.adapter, self.calibration, self.artifact_dir)
        self.model, self.base_id = prepare_model(*cfgs, strategy.root_device, wait=not rank0)
        strategy.barrier("projq-artifact")
        if isinstance(strategy, ModelParallelStrategy):  # projq_fsdp: shard the float tensors, adapters
            shard_model(self.model, strategy.device_mesh["data_parallel"])
        # the packed bases are loaded identically on every rank: DDP need not broadcast them
        frozen = [n for n, _ in self.named_buffers()] + [
            n for n, p in self.named_parameters() if not p.requires_grad
        ]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, frozen)
        self.model.train()  # loaded in eval mode; dropout in the adapters is wanted while training
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # normalize by the labelled tokens of the whole step across ranks (DDP then averages the
        # gradients), so N processes compute the gradient one process would on the same batch
        local = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()
        per_rank = self.trainer.strategy.reduce(local, reduce_op="sum") / self.trainer.world_size
        loss = causal_lm_loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"], per_rank)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def _evaluate(self, batch: dict[str, Tensor], prefix: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.ppl(logits[:, :-1].float(), batch["labels"][:, 1:])
        self.log(f"{prefix}_loss", causal_lm_loss(logits, batch["labels"]), prog_bar=True, sync_dist=True)
        self.log(f"{prefix}_ppl", self.ppl, prog_bar=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        schedule = partial(
            warmup_cosine,
            warmup_steps=self.schedule.warmup_steps,
            total_steps=int(self.trainer.estimated_stepping_batches),
            min_lr_ratio=self.schedule.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self._trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["projq"] = {"base_id": self.base_id}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("projq", {}).get("base_id")
        if saved != self.base_id:
            raise ValueError(
                f"this checkpoint was trained on quantized base {saved}, but the recipe gives "
                f"{self.base_id}; resume with the recipe (model, quant, calibration) it was made with"
            )
        # projq_fsdp loads the weights (and drops them from `checkpoint`) before this hook; the base
        # id fixes the adapter names (rank and target modules are part of it)
        trainable = self._trainable_names()
        missing = sorted(trainable - set(checkpoint.get("state_dict", trainable)))
        if missing:
            raise ValueError(f"checkpoint lacks adapter weights {missing[:3]} ({len(missing)} in all)")
