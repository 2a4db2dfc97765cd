"""Content-addressed, self-contained quantization artifacts.

An artifact is a directory ``<root>/<hash[:16]>/`` holding everything the quantized model
needs, so it loads without the base model:

- ``quantized.safetensors``: per quantized module the packed weight in the GPTQ layout
  (:mod:`projq_train.quant.pack`): ``<name>.qweight`` / ``.qzeros`` (int32), ``.scales``
  (fp16; e4m3 with an int32 ``.scale_exponent`` under ``quant.scale_bits: 8``), ``.g_idx``
  (int32), and the compensation ``.lora_A`` / ``.lora_B`` (fp32);
- ``float.safetensors``: every other tensor of the base (embeddings, norms, an untied
  ``lm_head``, biases) in the dtype the model computes in (a tied weight is stored once);
- ``config.json`` (the model's ``transformers`` config) and ``tokenizer/``;
- ``metadata.json``: format version, the full hash and the base's identity
  (:func:`projq_train.weights.base_identity`), the complete recipe, library versions,
  per-module bits/group size/shape (and ``rotated_inputs`` for a weight quantized as ``W Q``,
  :mod:`projq_train.quant.rotation`), the quantization report, the stored bits per weight, the
  mixed-precision configuration (:class:`~projq_train.quant.allocate.BitConfiguration`: bits and
  rank per module) when ``quant.budget_bits`` chose the widths, and the checksums of the two
  tensor files, verified (with a check for non-finite values) before either is used.

The hash covers the base's identity, the calibration token ids and the quantization settings,
so a recipe that would produce the same result finds the existing artifact without reading
the base's weights. :func:`load_quantized_model` builds the model on the meta device and fills
it from these files: no float copy of a quantized weight ever exists. Writes go to a temporary
sibling directory renamed into place, so a crash never leaves a directory that looks complete.
A writer holds a lock on its artifact (:func:`artifact_lock`, a file under ``<root>/.locks/``):
a second process that wants the same artifact waits for it instead of quantizing too, while one
that wants another artifact under the same root goes ahead. Before writing, temporary folders of a
killed writer are removed and a folder under the final name that is not the artifact is moved
aside (:func:`clear_leftovers`).

Finding an artifact needs the base's tokenizer (the calibration token ids are part of the
hash). A GGUF file's tokenizer is slow to convert, so the converted one is kept under
``<root>/tokenizers/`` (:func:`base_tokenizer`): a run whose artifact exists never parses the
GGUF file, it only hashes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PretrainedConfig

import projq_train
from projq_train.config import CalibrationConfig, ModelConfig, QuantConfig
from projq_train.data.calibration import calibration_tokens
from projq_train.host_memory import large_blocks_mapped, release_freed_memory
from projq_train.integrity import CorruptFileError, file_checksums, verify_file_checksums
from projq_train.models import build_skeleton, load_tokenizer, model_config, tie_and_check
from projq_train.quant.allocate import ALLOCATION_OBJECTIVE, BitConfiguration
from projq_train.quant.calibrate import (
    QuantizedModule,
    check_model_settings,
    format_report,
    format_storage,
    quantize_model,
    stored_bits_per_weight,
)
from projq_train.quant.linear import swap_in_quant_linears
from projq_train.quant.pack import PACKED_KEYS, PackedWeight
from projq_train.weights import (
    WeightSource,
    base_identity,
    checkpoint_identity,
    first_nonfinite,
    weight_source,
)

log = logging.getLogger(__name__)
FORMAT_VERSION = 4  # 1: unpacked uint8 codes; 2: packed GPTQ layout; 3: self-contained; 4: adapter.rank
TENSORS = "quantized.safetensors"
FLOAT_TENSORS = "float.safetensors"
TOKENIZER = "tokenizer"
METADATA = "metadata.json"
TOKENIZER_CACHE = "tokenizers"  # <root>/tokenizers/<key>/: tokenizers converted from GGUF files
LOCKS = ".locks"  # <root>/.locks/<hash[:16]>: the writer's lock on each artifact


def artifact_hash(base_identity: str, calibration_ids: Tensor, settings: dict[str, Any]) -> str:
    """sha256 of the format version, the base's identity, the calibration token ids and the
    quantization settings."""
    h = hashlib.sha256(f"projq-artifact-v{FORMAT_VERSION}|{base_identity}".encode())
    h.update(calibration_ids.to(torch.int64).contiguous().numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def quantization_settings(quant: QuantConfig, rank: int) -> dict[str, Any]:
    """What the artifact hash and metadata record of how it was quantized: ``quant``, the
    adapter rank its error is shaped and compensated for and, under a bit budget, the objective
    the widths were chosen by (an artifact allocated by another is not reused). The defaults
    ``compensation: hessian``, ``scale_bits: 16`` and ``rotate_inputs: false`` are left out, so
    artifacts made before those keys existed keep their hash.
    A ``refresh`` artifact whose rounds project the Hessian says so (``refresh_rounds``), so one made
    by the earlier rounds, against the plain Hessian, is not reused; nor is an artifact whose ranks
    were allocated from a first pass that quantized for the smallest rank choice (before
    ``first_pass_rank``: the rank shapes ProjQ's ``Q``, and every method's later layers take their
    inputs through the earlier layers' ``Q + BA``)."""
    settings = {**asdict(quant), "rank": rank}
    if quant.compensation == "hessian":
        del settings["compensation"]
    for key in ("allocate_ranks", "group_size_choices", "first_pass_iters"):  # nor later keys' defaults
        if settings[key] is None or settings[key] is False:
            del settings[key]
    if quant.scale_bits == 16:
        del settings["scale_bits"]
    if not quant.rotate_inputs:
        del settings["rotate_inputs"]
    if quant.method == "projq" and quant.mode == "refresh" and quant.projection_strength > 0:
        settings["refresh_rounds"] = "projected"
    if quant.allocates:
        settings["allocation"] = ALLOCATION_OBJECTIVE
    if quant.allocate_ranks:
        settings["first_pass_rank"] = "adapter rank"
    return settings


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
    root: str | Path,
    full_hash: str,
    modules: dict[str, QuantizedModule],
    metadata: dict[str, Any],
    float_tensors: dict[str, Tensor],
    config: PretrainedConfig,
    tokenizer: Any,
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
                **({"rotated_inputs": True} if qm.weight.rotated_inputs else {}),
            }
            for n, qm in modules.items()
        },
        **metadata,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        save_file({k: v.contiguous() for k, v in float_tensors.items()}, str(tmp / FLOAT_TENSORS))
        meta["checksums"] = file_checksums(tmp, [TENSORS, FLOAT_TENSORS])
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp / TOKENIZER)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
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


def read_metadata(path: str | Path) -> dict[str, Any]:
    """An artifact's metadata, after checking the directory is complete and of this format."""
    path = Path(path)
    needed = (METADATA, TENSORS, FLOAT_TENSORS, "config.json", TOKENIZER)
    if not all((path / f).exists() for f in needed):
        raise FileNotFoundError(
            f"{path} is not a complete projq-train artifact (it needs {', '.join(needed)})"
        )
    meta = json.loads((path / METADATA).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: artifact format {meta.get('format_version')} is not {FORMAT_VERSION}, which this "
            f"version of projq-train reads; delete the directory and quantize again"
        )
    return meta


def read_tensor_file(path: Path, name: str, meta: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors of the artifact file ``path/name``, after verifying its checksum (artifacts
    written before checksums existed have none) and before any of them is used: a corrupt or
    non-finite file is one :class:`~projq_train.integrity.CorruptFileError` naming it."""
    if name in meta.get("checksums", {}):
        verify_file_checksums(path, {name: meta["checksums"][name]})
    try:
        tensors = load_file(str(path / name))
    except SafetensorError as err:
        raise CorruptFileError(f"{path / name} is not a readable safetensors file: {err}") from None
    if (bad := first_nonfinite(tensors.items())) is not None:
        raise CorruptFileError(f"{path / name}: tensor {bad} holds NaN or infinite values")
    return tensors


def load_artifact(path: str | Path) -> tuple[dict[str, QuantizedModule], dict[str, Any]]:
    """Read an artifact directory back into quantized modules (on CPU) and its metadata."""
    meta = read_metadata(path)
    t = read_tensor_file(Path(path), TENSORS, meta)
    modules = {}
    for name, info in meta["modules"].items():
        packed = {key: t[f"{name}.{key}"] for key in PACKED_KEYS if f"{name}.{key}" in t}
        weight = PackedWeight.from_tensors(packed, **info)
        modules[name] = QuantizedModule(weight, t[f"{name}.lora_B"], t[f"{name}.lora_A"])
    return modules, meta


def load_quantized_model(
    path: str | Path,
) -> tuple[nn.Module, Any, dict[str, QuantizedModule], dict[str, Any]]:
    """The quantized model of an artifact, without the base: the model is built on the meta
    device, its quantized linears become packed :class:`QuantLinear` layers and every other
    tensor is read from ``float.safetensors``, in the dtype it was quantized in. Returns it (eval
    mode), its tokenizer, the artifact's modules (whose ``lora_A``/``lora_B`` initialize
    adapters) and the metadata."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    modules, meta = load_artifact(path)
    dtype = getattr(torch, meta["recipe"]["model"]["dtype"])
    model = build_skeleton(AutoConfig.from_pretrained(path), dtype)
    floats = read_tensor_file(path, FLOAT_TENSORS, meta)
    model.load_state_dict({k: v.to(dtype) for k, v in floats.items()}, strict=False, assign=True)
    swap_in_quant_linears(model, {name: qm.weight for name, qm in modules.items()})
    tie_and_check(model)
    return model, AutoTokenizer.from_pretrained(path / TOKENIZER), modules, meta


def check_base(path: str | Path, base: ModelConfig) -> None:
    """Refuse ``base`` if it is not the model the artifact at ``path`` was quantized from."""
    if base_identity(base) != read_metadata(path)["base_identity"]:
        raise ValueError(
            f"{path}: the base model {base.name_or_path or 'config'} is not the one this "
            f"artifact was made from"
        )


def float_tensors(model: nn.Module, source: WeightSource, quantized: set[str]) -> dict[str, Tensor]:
    """Every tensor of ``model`` but the weights of the ``quantized`` modules, each stored once:
    those the model holds already, the others read from ``source`` in the model's dtype."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name.removesuffix(".weight") in quantized or id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = source.get(name).to(t.dtype) if t.is_meta else t.detach()
    return out


@contextmanager
def artifact_lock(root: str | Path, full_hash: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<root>/.locks/<hash[:16]>``: a second process that wants
    this artifact waits until the first has written it; one that wants another artifact under
    ``root`` does not wait. The OS releases the lock of a process that dies, so a killed run
    never blocks the next one; the empty lock file stays (removing it would race a waiter)."""
    final, locks = artifact_path(root, full_hash), Path(root) / LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / final.name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is writing artifact %s; waiting for it", final)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def clear_leftovers(root: str | Path, full_hash: str) -> None:
    """Before writing an artifact (its lock held): delete temporary folders a killed writer left,
    and move aside whatever occupies the final name without being this artifact (a partial copy,
    a foreign folder), so it never blocks the write and nothing in it is lost."""
    final = artifact_path(root, full_hash)
    for tmp in Path(root).glob(f".{final.name}.tmp-*"):
        log.warning("removing %s, left by a writer that did not finish", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    if final.exists():
        aside = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("%s is not a complete artifact for this recipe; moved to %s", final, aside)
        os.rename(final, aside)


def base_tokenizer(model_cfg: ModelConfig, artifact_dir: str | Path) -> Any:
    """The base's tokenizer, with a pad token. One converted from a GGUF file (seconds of parsing
    that leave about 100 MiB resident) is cached under ``<artifact_dir>/tokenizers/``, keyed by
    the GGUF file's identity, and read from there afterwards."""
    if not model_cfg.gguf_file:
        return load_tokenizer(model_cfg)
    from transformers import AutoTokenizer

    key = hashlib.sha256(checkpoint_identity(model_cfg).encode()).hexdigest()[:16]
    cache = Path(artifact_dir) / TOKENIZER_CACHE / key
    if cache.is_dir():
        return AutoTokenizer.from_pretrained(cache)
    tokenizer = load_tokenizer(model_cfg)
    release_freed_memory()  # parsing a GGUF tokenizer leaves a lot of freed memory behind
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache.parent))
    try:
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, cache)
    except OSError:
        if not cache.is_dir():  # another process won the race: theirs is the same tokenizer
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return tokenizer


def find_or_quantize(
    model_cfg: ModelConfig,
    quant: QuantConfig,
    rank: int,
    calibration: CalibrationConfig,
    artifact_dir: str | Path,
    device: torch.device,
    tokenizer: Any = None,
    wait: bool = False,
    poll_seconds: float = 5.0,
) -> Path:
    """The artifact for this base, calibration and settings: found under ``artifact_dir``, or made
    by streaming the base one decoder layer at a time through the quantizer on ``device``, and
    saved. Finding it reads only the tokenizer (pass ``tokenizer`` if it is loaded already; else
    :func:`base_tokenizer`), the calibration text and the base's identity; the config is read
    and the settings checked before any quantization. With ``wait``, never quantize: wait until
    another process (rank 0) has written it."""
    if tokenizer is None:
        tokenizer = base_tokenizer(model_cfg, artifact_dir)
    ids = calibration_tokens(calibration, tokenizer)
    identity = base_identity(model_cfg)
    full_hash = artifact_hash(identity, ids, quantization_settings(quant, rank))
    if (existing := find_artifact(artifact_dir, full_hash)) is not None:
        log.info("artifact %s already exists for this model, calibration and settings; reusing it", existing)
        return existing
    config = model_config(model_cfg)
    release_freed_memory()  # parsing a GGUF config leaves freed memory behind
    skeleton = build_skeleton(config, getattr(torch, model_cfg.dtype))
    check_model_settings(skeleton, quant, rank)
    waited = 0.0
    while wait:
        if waited % 60 < poll_seconds:
            log.info("waiting for rank 0 to write artifact %s", artifact_path(artifact_dir, full_hash))
        time.sleep(poll_seconds)
        waited += poll_seconds
        if (existing := find_artifact(artifact_dir, full_hash)) is not None:
            return existing
    with artifact_lock(artifact_dir, full_hash):  # one process quantizes, the others wait here
        if (existing := find_artifact(artifact_dir, full_hash)) is not None:
            log.info("artifact %s was written by another process while this one waited", existing)
            return existing
        clear_leftovers(artifact_dir, full_hash)
        with large_blocks_mapped():  # the quantizer's transients never fragment the host heap
            source = weight_source(model_cfg, skeleton)
            release_freed_memory()
            modules, reports = quantize_model(
                skeleton, ids, quant, rank, device, calibration.batch_size, source=source
            )
            skeleton.tie_weights()  # a tied head is the embedding again, stored once
            floats = float_tensors(skeleton, source, set(modules))
        log.info(
            "quantization report\n%s\n%s",
            format_report(reports),
            format_storage(modules, quant.group_size, quant.budget_bits),
        )
        meta = {
            "base_identity": identity,
            "recipe": {
                "model": asdict(model_cfg),
                "quant": asdict(quant),
                "adapter": {"rank": rank},
                "calibration": asdict(calibration),
            },
            "calibration_tokens": list(ids.shape),
            "device": str(device),
            "report": [asdict(r) for r in reports],
            "configuration": BitConfiguration.of(modules).to_dict() if quant.allocates else None,
            "storage_bits_per_weight": stored_bits_per_weight(modules),
        }
        path = save_artifact(artifact_dir, full_hash, modules, meta, floats, config, tokenizer)
        log.info("wrote artifact %s", path)
        return path
