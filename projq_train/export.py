"""Exports of a fine-tuned checkpoint, each checked against the trained model.

- ``peft``: ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's own files; the base
  is the float model, so ``AutoPeftModelForCausalLM`` loads the adapter on it), the packed base in
  ``base/`` (the artifact) and ``projq_artifact.json`` naming both; :func:`load_peft_export`
  rebuilds the packed base and loads the adapter with ``PeftModel.from_pretrained``.
- ``merged``: ``Ŵ + s·BA`` written as a plain Hugging Face ``save_pretrained`` directory (with
  tokenizer and generation config) in bf16/fp16/fp32; it loads with ``AutoModelForCausalLM``
  alone.
- ``quantized``: the merged weights quantized again (GPTQ or RTN, calibrated afresh on the
  recipe's calibration set, since fine-tuning changed every layer's inputs) and written in the
  GPTQ checkpoint layout: ``<module>.qweight/.qzeros/.scales/.g_idx`` in ``model.safetensors``,
  ``quantize_config.json`` and a ``quantization_config`` in ``config.json``. Zero points are
  stored as they are (``checkpoint_format: gptq_v2``; the v1 ``zero − 1`` convention cannot
  represent a zero point of 0, which asymmetric grids use). :func:`load_quantized_export` loads it.

The fidelity check compares logits of the exported and the trained model on held-out token
windows: relative logit error ``‖Z_e − Z_t‖ / ‖Z_t‖``, top-1 agreement and perplexity of both.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from projq_train.artifact import load_quantized_model, read_metadata
from projq_train.checkpoint import Trained, load_trained
from projq_train.config import CalibrationConfig, QuantConfig
from projq_train.data.calibration import calibration_tokens
from projq_train.eval.harness import perplexity
from projq_train.integrity import verify_export_checksums, write_export_checksums
from projq_train.lora import ADAPTER, adapter_layers, with_quant_linear
from projq_train.quant.allocate import BitConfiguration
from projq_train.quant.calibrate import quantize_model, target_shapes
from projq_train.quant.linear import QuantLinear, swap_in_quant_linears
from projq_train.quant.pack import PACKED_KEYS, PackedWeight
from projq_train.weights import local_folder

Format = Literal["peft", "merged", "quantized"]
ARTIFACT_REF = "projq_artifact.json"
PACKED_BASE = "base"  # the artifact inside a peft export
GPTQ_FILE = "model.safetensors"


@torch.no_grad()
def merged_weights(model: PeftModel) -> dict[str, Tensor]:
    """``Ŵ + s·B A (out, in)`` in float32 for every adapted module, by its name in the base model."""
    merged = {}
    for name, layer in adapter_layers(model).items():
        base = layer.get_base_layer()
        w = base.packed().dequantize() if isinstance(base, QuantLinear) else base.weight.float()
        delta = layer.lora_B[ADAPTER].weight.float() @ layer.lora_A[ADAPTER].weight.float()
        merged[name] = w + layer.scaling[ADAPTER] * delta
    return merged


def merged_model(trained: Trained, dtype: torch.dtype) -> nn.Module:
    """A plain Hugging Face model (no quantization config) holding the merged weights; every other
    tensor comes from the trained model's base, which is already loaded."""
    base = trained.model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):  # e.g. a GGUF checkpoint: the export is plain weights
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = merged_weights(trained.model)
    state = {}
    for key in model.state_dict():
        path, _, attr = key.rpartition(".")
        if attr == "weight" and path in weights:
            state[key] = weights[path]
        else:  # unadapted tensors, and the bias of an adapted layer (on its base layer)
            module = base.get_submodule(path)
            state[key] = getattr(module.get_base_layer() if isinstance(module, LoraLayer) else module, attr)
    model.load_state_dict(state)
    return model.to(dtype).eval()


def export_peft(trained: Trained, output: Path) -> None:
    """peft's adapter files, with ``base_model_name_or_path`` the float base as transformers
    resolves it (an absolute folder or a hub name; none for a model built from a config), and the
    packed base inside the export (``base/``: the artifact, hard-linked where the file system
    allows, else copied), so the folder can be moved."""
    trained.model.save_pretrained(output)
    base = trained.base
    try:
        local = base.name_or_path and local_folder(base.name_or_path)
    except FileNotFoundError:  # the float base moved since training: recorded as it was given
        local = None
    config_file = output / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    adapter_config["base_model_name_or_path"] = str(local.resolve()) if local else base.name_or_path
    config_file.write_text(json.dumps(adapter_config, indent=2))
    shutil.copytree(trained.artifact, output / PACKED_BASE, copy_function=link_or_copy, dirs_exist_ok=True)
    ref = {
        "artifact": PACKED_BASE,  # relative to the export folder
        "float_base": {
            "name_or_path": adapter_config["base_model_name_or_path"],
            "gguf_file": base.gguf_file,
        },
        "metadata": json.loads((trained.artifact / "metadata.json").read_text()),
    }
    (output / ARTIFACT_REF).write_text(json.dumps(ref, indent=2))


def link_or_copy(source: str, target: str) -> None:
    if os.path.exists(target):  # exporting again with --overwrite
        if os.path.samefile(source, target):
            return
        os.remove(target)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def load_peft_export(path: str | Path) -> PeftModel:
    """The packed quantized base inside the export with the exported adapter loaded by
    ``PeftModel.from_pretrained`` (our LoRA layer registered for ``QuantLinear``)."""
    path = Path(path)
    verify_export_checksums(path)
    ref = json.loads((path / ARTIFACT_REF).read_text())
    base, _, _, _ = load_quantized_model(path / ref["artifact"])
    config = with_quant_linear(LoraConfig.from_pretrained(path))
    return PeftModel.from_pretrained(base, path, config=config).eval()


def export_merged(trained: Trained, output: Path, dtype: torch.dtype) -> nn.Module:
    model = merged_model(trained, dtype)
    model.save_pretrained(output)
    trained.tokenizer.save_pretrained(output)
    return model


def export_quantized(
    trained: Trained,
    output: Path,
    method: Literal["gptq", "rtn"],
    bits: int | dict[str, int],
    group_size: int | dict[str, int],
    device: torch.device,
) -> nn.Module:
    """Quantize the merged model again (no adapter) and write the GPTQ layout; returns the loaded
    export. ``bits``, ``group_size``: one for all modules, or one per module (a mixed-precision
    base's), written as the most common value plus GPTQModel's ``dynamic`` per-module overrides."""
    model = merged_model(trained, torch.float32)
    targets = trained.quant.target_modules
    names = list(target_shapes(model, targets))
    widths = bits if isinstance(bits, dict) else dict.fromkeys(names, bits)
    sizes = group_size if isinstance(group_size, dict) else dict.fromkeys(names, group_size)
    default_bits, default_size = (Counter(v.values()).most_common(1)[0][0] for v in (widths, sizes))
    quant = QuantConfig(method=method, bits=default_bits, group_size=default_size, target_modules=targets)
    ids = calibration_tokens(trained.calibration, trained.tokenizer)
    batch_size = trained.calibration.batch_size
    grids = {n: (widths[n], sizes[n]) for n in names}
    modules, _ = quantize_model(model, ids, quant, 0, device, batch_size, progress=False, grids=grids)
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():  # tied weights (e.g. lm_head = embeddings) are saved once
        if k.removesuffix(".weight") not in modules and v.data_ptr() not in seen:
            tensors[k] = v
            seen.add(v.data_ptr())
    for name, qm in modules.items():
        tensors.update({f"{name}.{key}": t for key, t in qm.weight.tensors().items()})
    overrides = dynamic_overrides(modules, default_bits, default_size)
    qconfig = {
        "quant_method": "gptq",
        "bits": default_bits,
        **({"dynamic": overrides} if overrides else {}),
        "group_size": default_size,
        "desc_act": quant.act_order,
        "sym": False,
        "true_sequential": quant.true_sequential,
        "damp_percent": quant.damp,
        "checkpoint_format": "gptq_v2",
        "modules_in_block_to_quantize": None,
    }
    output.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(output / GPTQ_FILE), metadata={"format": "pt"}
    )
    config = model.config.to_dict() | {"quantization_config": qconfig}
    (output / "config.json").write_text(json.dumps(config, indent=2))
    (output / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
    trained.tokenizer.save_pretrained(output)
    write_export_checksums(output)
    return load_quantized_export(output)


def dynamic_overrides(
    modules: dict[str, Any], default_bits: int, default_size: int
) -> dict[str, dict[str, int]]:
    """GPTQModel's ``dynamic`` overrides of the quantized ``modules`` (name → ``QuantizedModule``)
    not at ``default_bits`` or ``default_size``: ``{"+:^<escaped name>$": {"bits": b,
    "group_size": g}}`` with the values that differ."""
    overrides = {}
    for name, qm in modules.items():
        own = {"bits": qm.weight.bits, "group_size": qm.weight.group_size}
        default_group = qm.weight.in_features if default_size == -1 else default_size
        differ = {k: v for k, v in own.items() if v != {"bits": default_bits, "group_size": default_group}[k]}
        if differ:
            overrides[f"+:^{re.escape(name)}$"] = differ
    return overrides


def module_grid(name: str, qconfig: dict[str, Any]) -> tuple[int, int]:
    """A module's bits and group size in a GPTQ config: each from its first matching positive
    ``dynamic`` rule that sets it, else the config's own."""
    grid = {"bits": None, "group_size": None}
    for rule, override in (qconfig.get("dynamic") or {}).items():
        if rule.startswith("+:") and re.match(rule[2:], name):
            grid = {k: v if v is not None else override.get(k) for k, v in grid.items()}
    return tuple(qconfig[k] if v is None else v for k, v in grid.items())


def load_quantized_export(path: str | Path) -> nn.Module:
    """A model with packed :class:`QuantLinear` layers from a GPTQ-layout directory written by
    :func:`export_quantized` (``checkpoint_format: gptq_v2``)."""
    path = Path(path)
    verify_export_checksums(path)
    config = AutoConfig.from_pretrained(path)
    qconfig = config.quantization_config
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    if qconfig.get("checkpoint_format") != "gptq_v2":
        raise ValueError(f"{path}: only gptq_v2 checkpoints (zero points stored as is) are supported")
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_file(str(path / GPTQ_FILE))
    names = sorted({k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")})
    weights = {}
    for name in names:
        layer = model.get_submodule(name)
        parts = {key: tensors.pop(f"{name}.{key}") for key in PACKED_KEYS if f"{name}.{key}" in tensors}
        weights[name] = PackedWeight.from_tensors(
            parts, *module_grid(name, qconfig), layer.in_features, layer.out_features
        )
    swap_in_quant_linears(model, weights)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in tensors if k in params}
    missing = [
        k
        for k in missing
        if k.rpartition(".")[0] not in weights  # packed buffers, set above
        and not (k in params and params[k].data_ptr() in loaded)  # tied to a loaded weight
    ]
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")
    return model.eval()


@torch.no_grad()
def fidelity(trained: nn.Module, exported: nn.Module, ids: Tensor, batch_size: int = 4) -> dict[str, float]:
    """Compare the exported model's logits with the trained model's on ``ids (n, T)``."""
    diff = ref = agree = count = 0.0
    for batch in ids.split(batch_size):
        zt = trained(input_ids=batch).logits.float()  # (B, T, V)
        ze = exported(input_ids=batch).logits.float()
        diff += (ze - zt).pow(2).sum().item()
        ref += zt.pow(2).sum().item()
        agree += (ze.argmax(-1) == zt.argmax(-1)).sum().item()
        count += batch.numel()
    T = ids.shape[1]  # the windows, one after the other: each is read and scored on its own
    ppl = {
        key: perplexity(m, ids.flatten(), T, T, batch_size)["perplexity"]
        for key, m in (("trained", trained), ("exported", exported))
    }
    return {
        "logit_rel_error": math.sqrt(diff / ref),
        "top1_agreement": agree / count,
        "ppl_trained": ppl["trained"],
        "ppl_exported": ppl["exported"],
        "windows": ids.shape[0],
        "tokens": ids.numel(),
    }


def held_out_ids(trained: Trained, nsamples: int, seqlen: int) -> Tensor:
    """Token windows from the training data (else the calibration text) with a seed the
    calibration does not use."""
    source = trained.data_path or trained.calibration.dataset
    cfg = CalibrationConfig(dataset=source, template="auto", nsamples=nsamples, seqlen=seqlen, seed=12345)
    return calibration_tokens(cfg, trained.tokenizer)


def run_export(
    ckpt_path: str | Path,
    format: Format,
    output: str | Path,
    artifact_dir: str | None = None,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    method: Literal["gptq", "rtn"] = "gptq",
    bits: int | None = None,
    group_size: int | None = None,
    max_drift: float | None = None,
    eval_samples: int = 8,
    eval_seqlen: int = 256,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export and check; writes ``fidelity.json`` next to the export and returns the report.
    ``output`` must not exist or be empty, unless ``overwrite`` (its files of the same names are
    then replaced)."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ValueError(f"{output} exists and is not empty; choose another --output or pass --overwrite")
    trained = load_trained(ckpt_path, artifact_dir)
    output.mkdir(parents=True, exist_ok=True)
    if format == "peft":
        export_peft(trained, output)
        write_export_checksums(output)
        exported = load_peft_export(output)
    elif format == "merged":
        export_merged(trained, output, getattr(torch, dtype))
        write_export_checksums(output)
        exported = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    else:
        if trained.quant.budget_bits is not None:  # keep each module's grid unless told otherwise
            recorded = BitConfiguration.from_dict(read_metadata(trained.artifact)["configuration"])
            bits = bits or recorded.bits
            group_size = group_size or recorded.group_sizes or None
        bits = bits or trained.quant.bits
        group_size = group_size or trained.quant.group_size
        exported = export_quantized(trained, output, method, bits, group_size, torch.device(device))
    report = {
        "format": format,
        "checkpoint": str(ckpt_path),
        "artifact": str(trained.artifact),
        "output": str(output),
        **({"dtype": dtype} if format == "merged" else {}),
        **({"method": method, "bits": bits, "group_size": group_size} if format == "quantized" else {}),
        **fidelity(trained.model, exported, held_out_ids(trained, eval_samples, eval_seqlen)),
    }
    (output / "fidelity.json").write_text(json.dumps(report, indent=2))
    if max_drift is not None and not report["logit_rel_error"] <= max_drift:  # NaN fails too
        raise ValueError(
            f"export drift {report['logit_rel_error']:.4g} (relative logit error) exceeds --max_drift "
            f"{max_drift}; the files are in {output}, the report in {output / 'fidelity.json'}"
        )
    return report
