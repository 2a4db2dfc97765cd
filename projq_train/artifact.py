"""Content-addressed quantization artifacts.

An artifact is a directory ``<root>/<hash[:16]>/`` holding

- ``quantized.safetensors``: per quantized module the packed weight in the GPTQ layout
  (:mod:`projq_train.quant.pack`): ``<name>.qweight`` / ``.qzeros`` (int32), ``.scales``
  (fp16), ``.g_idx`` (int32), and the compensation ``.lora_A`` / ``.lora_B`` (fp32);
- ``metadata.json``: format version, the full hash and the base model's hash, the complete
  recipe, library versions, per-module bits/group size/shape and the quantization report.

The hash covers the base model's tensors, the calibration token ids and the quantization
settings, so a recipe that would produce the same result finds the existing artifact.
Writes go to a temporary sibling directory renamed into place, so a crash never leaves a
directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import projq_train
from projq_train.config import CalibrationConfig, ModelConfig, QuantConfig
from projq_train.data.calibration import calibration_tokens
from projq_train.quant.calibrate import QuantizedModule, check_model_settings, format_report, quantize_model
from projq_train.quant.linear import swap_in_quant_linears
from projq_train.quant.pack import PackedWeight

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 1: unpacked uint8 codes; 2: packed GPTQ layout
TENSORS = "quantized.safetensors"
METADATA = "metadata.json"


def model_hash(model: nn.Module) -> str:
    """sha256 over every tensor of the model's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def artifact_hash(base_model_hash: str, calibration_ids: Tensor, settings: dict[str, Any]) -> str:
    """sha256 of the format version, the base model hash, the calibration token ids and the
    quantization settings."""
    h = hashlib.sha256(f"projq-artifact-v{FORMAT_VERSION}|{base_model_hash}".encode())
    h.update(calibration_ids.to(torch.int64).contiguous().numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def artifact_path(root: str | Path, full_hash: str) -> Path:
    return Path(root) / full_hash[:16]


def find_artifact(root: str | Path, full_hash: str) -> Path | None:
    """The complete artifact with this hash under ``root``, or None."""
    path = artifact_path(root, full_hash)
    meta = path / METADATA
    if meta.is_file() and json.loads(meta.read_text()).get("hash") == full_hash:
        return path
    return None


def library_versions() -> dict[str, str]:
    import transformers

    return {
        "projq_train": projq_train.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def save_artifact(
    root: str | Path, full_hash: str, modules: dict[str, QuantizedModule], metadata: dict[str, Any]
) -> Path:
    """Write the artifact atomically; if another process finished the same one first, keep theirs."""
    final = artifact_path(root, full_hash)
    final.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, qm in modules.items():
        tensors.update({f"{name}.{key}": t for key, t in qm.weight.tensors().items()})
        tensors.update({f"{name}.lora_A": qm.lora_A, f"{name}.lora_B": qm.lora_B})
    meta = {
        "format_version": FORMAT_VERSION,
        "hash": full_hash,
        "codes_layout": "gptq-int32-packed",
        "versions": library_versions(),
        "modules": {
            n: {
                "bits": qm.weight.bits,
                "group_size": qm.weight.group_size,
                "in_features": qm.weight.in_features,
                "out_features": qm.weight.out_features,
            }
            for n, qm in modules.items()
        },
        **metadata,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        (tmp / METADATA).write_text(json.dumps(meta, indent=2))
        for f in (TENSORS, METADATA):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            if find_artifact(root, full_hash) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def load_artifact(path: str | Path) -> tuple[dict[str, QuantizedModule], dict[str, Any]]:
    """Read an artifact directory back into quantized modules (on CPU) and its metadata."""
    path = Path(path)
    if not (path / METADATA).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete projq-train artifact (missing {METADATA} or {TENSORS})"
        )
    meta = json.loads((path / METADATA).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: artifact format {meta.get('format_version')} is not {FORMAT_VERSION}, which this "
            f"version of projq-train reads; delete the directory and quantize again"
        )
    t = load_file(str(path / TENSORS))
    modules = {}
    for name, info in meta["modules"].items():
        packed = {key: t[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales", "g_idx")}
        weight = PackedWeight.from_tensors(packed, **info)
        modules[name] = QuantizedModule(weight, t[f"{name}.lora_B"], t[f"{name}.lora_A"])
    return modules, meta


def load_quantized_model(
    path: str | Path,
) -> tuple[nn.Module, Any, dict[str, QuantizedModule], dict[str, Any]]:
    """The base model with its quantized linears replaced by packed :class:`QuantLinear` layers,
    its tokenizer, the artifact's modules (whose ``lora_A``/``lora_B`` initialize adapters) and
    the metadata.

    The base model named in the artifact's recipe is loaded and must hash to the model the
    artifact was made from.
    """
    from projq_train.models import load_model_and_tokenizer

    modules, meta = load_artifact(path)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(**meta["recipe"]["model"]))
    if model_hash(model) != meta["base_model_hash"]:
        raise ValueError(
            f"{path}: the base model {meta['recipe']['model']} is not the one this artifact was made from"
        )
    swap_in_quant_linears(model, {name: qm.weight for name, qm in modules.items()})
    return model, tokenizer, modules, meta


def quantize_or_load(
    model: nn.Module,
    tokenizer: Any,
    model_cfg: ModelConfig,
    quant: QuantConfig,
    calibration: CalibrationConfig,
    artifact_dir: str | Path,
    device: torch.device,
    wait: bool = False,
    poll_seconds: float = 5.0,
) -> tuple[Path, dict[str, QuantizedModule]]:
    """The artifact for this model, calibration and settings: found under ``artifact_dir``, or made
    by calibrating and quantizing ``model`` on ``device`` (which rewrites its linear weights to the
    step-0 weights ``Q + BA``) and saved. With ``wait``, never quantize: wait until another
    process (rank 0) has written it. Returns its directory and its modules."""
    check_model_settings(model, quant)
    ids = calibration_tokens(calibration, tokenizer)
    base_hash = model_hash(model)
    full_hash = artifact_hash(base_hash, ids, asdict(quant))
    existing = find_artifact(artifact_dir, full_hash)
    waited = 0.0
    while existing is None and wait:
        if waited % 60 < poll_seconds:
            log.info("waiting for rank 0 to write artifact %s", artifact_path(artifact_dir, full_hash))
        time.sleep(poll_seconds)
        waited += poll_seconds
        existing = find_artifact(artifact_dir, full_hash)
    if existing is not None:
        log.info("artifact %s already exists for this model, calibration and settings; reusing it", existing)
        return existing, load_artifact(existing)[0]
    modules, reports = quantize_model(model, ids, quant, device, calibration.batch_size)
    log.info("quantization report\n%s", format_report(reports))
    meta = {
        "base_model_hash": base_hash,
        "recipe": {"model": asdict(model_cfg), "quant": asdict(quant), "calibration": asdict(calibration)},
        "calibration_tokens": list(ids.shape),
        "device": str(device),
        "report": [asdict(r) for r in reports],
    }
    path = save_artifact(artifact_dir, full_hash, modules, meta)
    log.info("wrote artifact %s", path)
    return path, modules
