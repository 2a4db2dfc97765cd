"""The models ``projq-train eval`` and ``report`` score: a fit checkpoint's stages (float,
quantized, initialized, fine-tuned), an artifact's packed base, or any Hugging Face model, each
placed on the device and dtype of the evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from projq_train.artifact import check_base, load_quantized_model
from projq_train.checkpoint import build_trained, read_fit_checkpoint
from projq_train.config import ModelConfig
from projq_train.export import load_quantized_export
from projq_train.lora import attach_adapters, init_from_compensation
from projq_train.models import load_model_and_tokenizer
from projq_train.quant.allocate import BitConfiguration

Loaded = tuple[nn.Module, Any, str]  # model, tokenizer, prompt template


def place(model: nn.Module, device: torch.device, dtype: str) -> nn.Module:
    """Move for evaluation: ``auto`` is bfloat16 on CUDA, float32 elsewhere (packed weights and
    their fp16 scales keep their dtypes)."""
    name = ("bfloat16" if device.type == "cuda" else "float32") if dtype == "auto" else dtype
    return model.to(device=device, dtype=getattr(torch, name)).eval()


def artifact_model(path: str | Path, adapter_init: bool) -> tuple[nn.Module, Any]:
    """The packed base of an artifact, with adapters set to its compensation (``Q + BA``) if asked."""
    model, tokenizer, modules, meta = load_quantized_model(path)
    if adapter_init:
        targets, rank = meta["recipe"]["quant"]["target_modules"], meta["recipe"]["adapter"]["rank"]
        if rank == 0:
            raise ValueError(f"{path} has no compensation (rank 0) to initialize an adapter from")
        model = attach_adapters(model, targets, rank, rank, 0.0, BitConfiguration.of(modules).ranks)
        init_from_compensation(model, modules)
    return model, tokenizer


def hf_model(name_or_path: str, gguf_file: str | None) -> tuple[nn.Module, Any]:
    """A Hugging Face model; a directory written by ``export --format quantized`` loads packed."""
    if gguf_file is None and (Path(name_or_path) / "quantize_config.json").is_file():
        from transformers import AutoTokenizer

        return load_quantized_export(name_or_path), AutoTokenizer.from_pretrained(name_or_path)
    return load_model_and_tokenizer(ModelConfig(name_or_path=name_or_path, gguf_file=gguf_file))


def stage_models(ckpt_path: str, artifact_dir: str | None) -> dict[str, Callable[[], Loaded] | None]:
    """A loader per stage of a checkpoint, each building its model afresh; ``initialized`` is None
    when the adapter started at ``B = 0`` (the standard init), where step 0 is the quantized model."""
    ckpt = read_fit_checkpoint(ckpt_path, artifact_dir)
    template, artifact, init = ckpt.template, ckpt.artifact, ckpt.adapter.init
    check_base(artifact, ckpt.base)  # the float stage must be the model the artifact was made from

    def fine_tuned() -> Loaded:
        trained = build_trained(ckpt)
        return trained.model, trained.tokenizer, template

    return {
        "float": lambda: (*load_model_and_tokenizer(ckpt.base), template),
        "quantized": lambda: (*artifact_model(artifact, False), template),
        "initialized": (
            (lambda: (*artifact_model(artifact, True), template)) if init == "compensation" else None
        ),
        "fine-tuned": fine_tuned,
    }
