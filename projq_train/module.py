"""The LightningModule: a frozen packed base with trainable LoRA adapters (thin glue).

:func:`prepare_model` does the work and is usable without a Trainer: find or make the
quantization artifact (ProjQ/GPTQ/RTN on the training device, streaming the base one decoder
layer at a time) and build the packed model from it alone, or load the float model and quantize
it to NF4 with bitsandbytes; then attach peft LoRA adapters and initialize them.
:class:`ProjQModule` calls it in ``configure_model``, computes the loss from the final hidden
states in chunks (:func:`projq_train.loss.causal_lm_loss_from_hidden`), and keeps checkpoints
adapter-only.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from peft import PeftModel
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.aggregation import MeanMetric

from projq_train.artifact import base_tokenizer, find_or_quantize, load_quantized_model
from projq_train.config import (
    AdapterConfig,
    CalibrationConfig,
    ModelConfig,
    QuantConfig,
    ScheduleConfig,
    check_adapter_settings,
)
from projq_train.data.instruct import IGNORE_INDEX
from projq_train.host_memory import release_during_forward, release_freed_memory, return_free_pages
from projq_train.integrity import contents_digest
from projq_train.lora import attach_adapters, init_from_compensation
from projq_train.loss import causal_lm_loss_from_hidden
from projq_train.models import load_model_and_tokenizer
from projq_train.quant.allocate import BitConfiguration
from projq_train.strategies import shard_model  # importing it registers trainer.strategy: projq_fsdp
from projq_train.swiglu import use_lean_mlps
from projq_train.weights import base_identity, first_nonfinite

log = logging.getLogger(__name__)


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
    tokenizer: Any = None,
) -> tuple[PeftModel, str]:
    """The trainable model and the id of its frozen base (artifact hash, or ``nf4-<base id>``).
    The packed base is built from its artifact alone (found, or made by streaming the base through
    the quantizer); no float copy of a quantized weight is made. With ``wait``, the artifact is
    awaited from another process instead of made; ``tokenizer``: the base's, if loaded already.
    ``device`` is where the quantizer computes and NF4 layers are put; everything else is built on
    the CPU, whatever the default device (Lightning calls ``configure_model`` with the training
    device as the default, and moves the model there afterwards)."""
    check_adapter_settings(quant, adapter)
    with torch.device("cpu"):
        if quant.method == "nf4":
            model, _ = load_model_and_tokenizer(model_cfg)
            base_id = "nf4-" + hashlib.sha256(base_identity(model_cfg).encode()).hexdigest()[:16]
            swap_in_nf4(model, quant.target_modules, getattr(torch, model_cfg.dtype), device)
            modules = {}
        else:
            path = find_or_quantize(
                model_cfg, quant, adapter.rank, calibration, artifact_dir, device, tokenizer, wait=wait
            )
            model, _, modules, _ = load_quantized_model(path)
            base_id = path.name
        ranks = BitConfiguration.of(modules).ranks
        peft_model = attach_adapters(
            model, quant.target_modules, adapter.rank, adapter.alpha, adapter.dropout, ranks
        )
        if adapter.init == "compensation":
            init_from_compensation(peft_model, modules)
    return peft_model, base_id


class NonFiniteTrainingError(FloatingPointError):
    """Training met a NaN or an infinity it may not skip (see ``skip_nonfinite_steps``)."""


@contextmanager
def head_bypassed(model: PeftModel) -> Iterator[nn.Linear]:
    """Within the block the causal LM's ``lm_head`` is an identity, so its output ``logits`` are the
    final hidden states ``(B, T, H)``; yields the head, whose weight the chunked loss uses."""
    base = model.get_base_model()
    head = base.lm_head
    base.lm_head = nn.Identity()
    try:
        yield head
    finally:
        base.lm_head = head


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_states() -> dict[str, Any]:
    """The random generators a training step draws from (the adapters' dropout), for checkpoints."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ProjQModule(L.LightningModule):
    """Fine-tune LoRA adapters on a ProjQ (or GPTQ/RTN/NF4) quantized base.

    Args:
        base: the base model to load (hub name, local path, or a config for a random model).
        quant: how its linear layers are quantized.
        adapter: adapter init, alpha and dropout.
        calibration: text for the quantizer's calibration (unused for nf4 or a cached artifact).
        artifact_dir: root of the content-addressed quantization artifacts.
        optimizer: optimizer over the adapter parameters, e.g. ``torch.optim.AdamW`` or, on CUDA,
            ``bitsandbytes.optim.PagedAdamW8bit``.
        schedule: warmup + cosine learning-rate schedule, stepped every optimizer step (default:
            ``ScheduleConfig()``).
        gradient_checkpointing: recompute decoder activations in the backward pass to save memory.
        skip_nonfinite_steps: the NaN guard. An optimizer step whose loss or gradients hold a NaN
            or an infinity is skipped (its update dropped) this many times; the next one stops the
            run with an error naming the step. A checkpoint with a non-finite adapter weight is
            never written.
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
        skip_nonfinite_steps: int = 0,
    ) -> None:
        super().__init__()
        check_adapter_settings(quant, adapter)
        if skip_nonfinite_steps < 0:
            raise ValueError(f"model.skip_nonfinite_steps must be 0 or more, got {skip_nonfinite_steps}")
        self.save_hyperparameters()  # for loggers and checkpoints; the typed configs are kept below
        self.base_cfg, self.quant, self.adapter, self.calibration = base, quant, adapter, calibration
        self.artifact_dir, self.optimizer_factory = artifact_dir, optimizer
        self.schedule, self.gradient_checkpointing = schedule or ScheduleConfig(), gradient_checkpointing
        self.skip_nonfinite_steps, self.skipped_steps = skip_nonfinite_steps, 0
        self._step_loss: Tensor | None = None
        self._rng_to_restore: dict[str, Any] | None = None  # from a checkpoint, at the next step
        # the data module tokenizes with it (linked by the CLI)
        self.tokenizer = base_tokenizer(base, artifact_dir)
        self.model: PeftModel | None = None
        self.base_id: str | None = None
        self.returns_free_pages = False  # on CPU: during the forward and before each backward
        self.strict_loading = False  # checkpoints hold the adapters only
        self.nll = MeanMetric()  # token-weighted mean loss of an evaluation epoch

    def configure_model(self) -> None:
        if self.model is not None:
            return
        # quantize once: rank 0 finds or makes the artifact; the other ranks wait for it on the
        # file system (no collective, so a long quantization cannot time out a process group).
        # With several nodes, artifact_dir must be on a shared file system.
        strategy = self.trainer.strategy
        rank0 = self.trainer.is_global_zero
        cfgs = (self.base_cfg, self.quant, self.adapter, self.calibration, self.artifact_dir)
        self.model, self.base_id = prepare_model(
            *cfgs, strategy.root_device, wait=not rank0, tokenizer=self.tokenizer
        )
        strategy.barrier("projq-artifact")
        if isinstance(strategy, ModelParallelStrategy):  # projq_fsdp: shard the float tensors, adapters
            shard_model(self.model, strategy.device_mesh["data_parallel"])
        # the packed bases are loaded identically on every rank: DDP need not broadcast them
        frozen = [n for n, _ in self.named_buffers()] + [
            n for n, p in self.named_parameters() if not p.requires_grad
        ]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, frozen)
        self.model.train()  # loaded in eval mode; dropout in the adapters is wanted while training
        release_freed_memory()
        use_lean_mlps(self.model)  # the gated MLPs keep one tensor fewer for backward
        self.returns_free_pages = strategy.root_device.type == "cpu"
        if self.returns_free_pages:  # keep a CPU step's heap fragmentation out of the peak
            release_during_forward(self.model.get_base_model().model.layers)
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)

    def loss(self, batch: dict[str, Tensor], num_tokens: Tensor | None = None) -> Tensor:
        """Next-token loss of ``batch`` from the final hidden states, in chunks of tokens: no
        (B, T, V) logits tensor is ever made (:func:`causal_lm_loss_from_hidden`)."""
        with head_bypassed(self.model) as head:
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # hidden (B, T, H)
        return causal_lm_loss_from_hidden(hidden, head.weight, batch["labels"], num_tokens)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # normalize by the labelled tokens of the whole step across ranks (DDP then averages the
        # gradients), so N processes compute the gradient one process would on the same batch
        local = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()
        per_rank = self.trainer.strategy.reduce(local, reduce_op="sum") / self.trainer.world_size
        loss = self.loss(batch, per_rank)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        self._step_loss = loss.detach()
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # a resumed run draws the dropout masks an uninterrupted run would have drawn from here
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_before_backward(self, loss: Tensor) -> None:
        if self.returns_free_pages:  # the forward's temporaries (the loss chunks) go back first
            return_free_pages()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The NaN guard: skip or stop on a non-finite loss or gradient (every rank decides alike)."""
        checks = [] if self._step_loss is None else [("loss", self._step_loss)]
        if self.trainer.precision != "16-mixed":  # fp16's grad scaler skips inf gradients itself
            checks += [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        bad = first_nonfinite(checks) is not None
        if not self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        step = self.trainer.global_step + 1
        if self.skipped_steps >= self.skip_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"step {step}: the loss or a gradient is NaN or infinite, after {self.skipped_steps} "
                f"such steps skipped (model.skip_nonfinite_steps: {self.skip_nonfinite_steps}); "
                f"training stopped. Lower the learning rate, clip gradients or check the data"
            )
        self.skipped_steps += 1
        log.warning(
            "step %d: the loss or a gradient is NaN or infinite; its update is skipped (%d of %d)",
            step,
            self.skipped_steps,
            self.skip_nonfinite_steps,
        )
        optimizer.zero_grad(set_to_none=True)

    def _evaluate(self, batch: dict[str, Tensor], prefix: str) -> None:
        loss = self.loss(batch)
        self.nll.update(loss, weight=(batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.log(f"{prefix}_loss", loss, prog_bar=True, sync_dist=True)

    def _log_perplexity(self, prefix: str) -> None:
        self.log(f"{prefix}_ppl", self.nll.compute().exp(), prog_bar=True)  # over the whole epoch
        with torch.inference_mode(False):  # fresh states a later fit's validation may update in place
            self.nll.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

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
        if (name := first_nonfinite(checkpoint["state_dict"].items())) is not None:
            raise NonFiniteTrainingError(
                f"step {self.trainer.global_step}: adapter weight {name} is NaN or infinite; "
                f"no checkpoint written. Lower the learning rate or clip gradients"
            )
        checkpoint["projq"] = {"base_id": self.base_id, "rng": rng_states()}
        checkpoint["projq"]["checksum"] = contents_digest(checkpoint)  # the last change to it

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("projq", {}).get("rng")
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
