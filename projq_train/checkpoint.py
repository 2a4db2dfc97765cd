"""Reading fit checkpoints: one reader for every subcommand, and the run identity.

A fit checkpoint holds the adapter weights only (the packed base is the artifact named by
``projq.base_id``), the settings the model was built with (``hyper_parameters``: base, quant,
adapter, calibration, optimizer, schedule) and the data module's (``datamodule_hyper_parameters``),
the loop and optimizer states, the data position (:class:`~projq_train.data.instruct.InstructionData`)
and the random generators (``projq.rng``).

Files are unpickled with ``weights_only=True`` only (:func:`read_checkpoint_file`): a crafted
checkpoint cannot run code.

**Run identity.** ``fit --ckpt_path``, ``validate`` and ``test`` refuse a checkpoint whose model
or data settings differ from the recipe and overrides given (:func:`identity_differences`), before
anything is built or quantized. Settings that may change on resume are :data:`MAY_CHANGE`; every
trainer setting (``max_steps``, ``val_check_interval``, ``log_every_n_steps``, callbacks,
logger, ...) may too, since the trainer section is not part of the model; ``validate`` and
``test`` may also set other optimizer and schedule settings (:data:`NOT_EVALUATED`).
"""

from __future__ import annotations

import itertools
import json
import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn

from projq_train.artifact import load_quantized_model
from projq_train.config import (
    AdapterConfig,
    CalibrationConfig,
    ModelConfig,
    QuantConfig,
    renamed_settings,
)
from projq_train.integrity import verify_checkpoint
from projq_train.lora import attach_adapters
from projq_train.quant.allocate import BitConfiguration
from projq_train.weights import first_nonfinite

# model and data settings a resumed, validated or tested run may set differently from its checkpoint
MAY_CHANGE = (
    "model.artifact_dir",  # where artifacts are looked up; the artifact itself must be the same
    "model.gradient_checkpointing",  # recomputes activations: the same gradients
    "model.skip_nonfinite_steps",
    "data.batch_size",  # per process: with other devices the global batch can stay the same
    "data.val_path",
    "data.test_path",
    "data.num_workers",
)
NOT_EVALUATED = ("model.optimizer.", "model.schedule.")  # also free for validate and test


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """A ``.ckpt`` file's contents, unpickled with ``weights_only=True``: tensors and plain data
    only, so a crafted file cannot run code; anything else is one clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds objects other than tensors and plain data; projq-train does not load it "
            f"(unpickling it could run code from the file)"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt): {err}") from err


def check_finite(model: nn.Module, source: str | Path) -> None:
    """Refuse a model with a NaN or infinite value in any floating tensor (``source``: where its
    tensors came from, for the message)."""
    if (
        name := first_nonfinite(itertools.chain(model.named_parameters(), model.named_buffers()))
    ) is not None:
        raise ValueError(f"{source}: tensor {name} holds NaN or infinite values; nothing is exported")


@dataclass
class FitCheckpoint:
    """What a fit checkpoint holds, read without building a model: the settings it was trained
    with, its (checked) artifact and its adapter weights."""

    path: Path
    base: ModelConfig
    quant: QuantConfig
    adapter: AdapterConfig
    calibration: CalibrationConfig
    artifact: Path
    data_path: str | None  # the training data, for held-out fidelity windows
    template: str  # the prompt template of the training data
    adapter_state: dict[str, Tensor]  # trained adapter tensors by their key in the peft model


@dataclass
class Trained(FitCheckpoint):
    """A fine-tuned model rebuilt from a checkpoint, with the settings it was made with."""

    model: PeftModel
    tokenizer: Any


def _typed(cls, value):
    return value if isinstance(value, cls) else cls(**value)


def read_fit_checkpoint(ckpt_path: str | Path, artifact_dir: str | Path | None = None) -> FitCheckpoint:
    """The settings and adapter weights of a fit checkpoint. Refuses a checkpoint whose artifact
    is missing or is not the one it was trained on (no silent re-quantization)."""
    ckpt = read_checkpoint_file(ckpt_path)
    verify_checkpoint(ckpt, ckpt_path)
    hp, base_id = ckpt.get("hyper_parameters", {}), ckpt.get("projq", {}).get("base_id")
    if base_id is None or "base" not in hp:
        raise ValueError(f"{ckpt_path} is not a projq-train fit checkpoint")
    check_current_settings(ckpt, ckpt_path)
    if base_id.startswith("nf4-"):
        raise ValueError(
            f"{ckpt_path} was trained on an NF4 (bitsandbytes) base; export supports rtn/gptq/projq"
        )
    artifact = Path(artifact_dir or hp.get("artifact_dir", "artifacts")) / base_id
    if not (artifact / "metadata.json").is_file():
        raise FileNotFoundError(
            f"the quantized base {artifact} of {ckpt_path} is missing; re-create it by running "
            f"`projq-train quantize` with the recipe's model/quant/calibration, or pass --artifact_dir"
        )
    if not json.loads((artifact / "metadata.json").read_text()).get("hash", "").startswith(base_id):
        raise ValueError(f"{artifact} is not the artifact {base_id} that {ckpt_path} was trained on")
    data = ckpt.get("datamodule_hyper_parameters") or {}
    return FitCheckpoint(
        path=Path(ckpt_path),
        base=_typed(ModelConfig, hp["base"]),
        quant=_typed(QuantConfig, hp["quant"]),
        adapter=_typed(AdapterConfig, hp["adapter"]),
        calibration=_typed(CalibrationConfig, hp["calibration"]),
        artifact=artifact,
        data_path=data.get("path"),
        template=data.get("template", "alpaca"),
        adapter_state={k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()},
    )


def build_trained(ckpt: FitCheckpoint) -> Trained:
    """The packed base of the checkpoint's artifact plus its trained adapters."""
    model, tokenizer, modules, _ = load_quantized_model(ckpt.artifact)
    targets, adapter = ckpt.quant.target_modules, ckpt.adapter
    ranks = BitConfiguration.of(modules).ranks
    peft_model = attach_adapters(model, targets, adapter.rank, adapter.alpha, adapter.dropout, ranks)
    missing = [k for k in peft_model.state_dict() if ".lora_" in k and k not in ckpt.adapter_state]
    if missing:
        raise ValueError(f"{ckpt.path} lacks adapter weights {missing[:3]} ({len(missing)} in all)")
    peft_model.load_state_dict(ckpt.adapter_state, strict=False)
    check_finite(peft_model, f"{ckpt.path} with the artifact {ckpt.artifact}")
    settings = {f.name: getattr(ckpt, f.name) for f in fields(ckpt)}
    return Trained(**settings, model=peft_model.eval(), tokenizer=tokenizer)


def load_trained(ckpt_path: str | Path, artifact_dir: str | Path | None = None) -> Trained:
    """:func:`build_trained` of :func:`read_fit_checkpoint`."""
    return build_trained(read_fit_checkpoint(ckpt_path, artifact_dir))


def check_current_settings(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint written with settings renamed since (its artifact format is older too)."""
    if old := renamed_settings(checkpoint.get("hyper_parameters", {})):
        raise ValueError(
            f"{path} was written by an earlier projq-train ({'; '.join(old)}); this version does not "
            f"read its quantized base: fine-tune again, or use the release that wrote it"
        )


def newest_last_checkpoint(dirs: list[Path]) -> Path | None:
    """The most recently written ``last*.ckpt`` in ``dirs``: what ``--ckpt_path last`` resumes."""
    found = [p for d in dirs for p in Path(d).glob("last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _flat(settings: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        if key.startswith("_"):  # Lightning's bookkeeping (_instantiator, _class_path)
            continue
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def identity_differences(
    checkpoint: dict[str, Any], model: dict[str, Any], data: dict[str, Any], training: bool = True
) -> list[str]:
    """The model and data settings (``model``: the recipe's ``model`` section; ``data``: its data
    module's ``init_args``) that differ from those ``checkpoint`` was trained with, as
    ``key: checkpoint value -> given value``. Not compared: keys in :data:`MAY_CHANGE`, keys that
    only one side has, and unless ``training`` (validate, test) the optimizer and schedule."""
    ignored = MAY_CHANGE if training else (*MAY_CHANGE, *NOT_EVALUATED)
    saved = {
        **_flat(checkpoint.get("hyper_parameters", {}), "model."),
        **_flat(checkpoint.get("datamodule_hyper_parameters", {}), "data."),
    }
    given = {**_flat(model, "model."), **_flat(data, "data.")}
    return [
        f"{key}: {saved[key]!r} -> {given[key]!r}"
        for key in sorted(saved.keys() & given.keys())
        if not key.startswith(ignored) and not same_setting(saved[key], given[key])
    ]


def same_setting(saved: Any, given: Any) -> bool:
    """Equal, or one local path: checkpoints written before recipe paths were resolved against the
    recipe (:func:`projq_train.cli.resolve_recipe_paths`) hold them relative to the working
    directory, as given then."""
    if saved == given:
        return True
    return (
        isinstance(saved, str)
        and isinstance(given, str)
        and Path(given).is_absolute()
        and Path(saved).exists()
        and Path(saved).resolve() == Path(given)
    )
