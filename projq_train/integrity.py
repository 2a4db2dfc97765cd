"""Checksums of what projq-train writes, verified when it reads them back.

- Artifacts: ``metadata.json`` records the sha256 of ``quantized.safetensors`` and
  ``float.safetensors`` (:func:`file_checksums`); loading verifies them before reading a tensor.
- Checkpoints: ``projq.checksum`` is a sha256 over every tensor and value of the checkpoint
  (:func:`contents_digest`), taken as the last step of writing it; ``fit --ckpt_path``,
  ``validate``, ``test``, ``export``, ``eval`` and ``report`` verify it when they read the file.
- Exports: :data:`EXPORT_CHECKSUMS` lists the sha256 of each tensor file of the export; the
  export's readers verify it.

A file whose contents changed after it was written (a flipped bit, a truncated copy, an edit) is
refused with one line naming the file; it never loads as a silently different model. A file's
digest is computed once per process while its size and modification time stay the same
(:func:`projq_train.weights.file_digest`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from projq_train.weights import file_digest

EXPORT_CHECKSUMS = "projq_checksums.json"


class CorruptFileError(ValueError):
    """A file's contents are not what was written."""


def file_checksums(folder: Path, names: list[str]) -> dict[str, str]:
    """``{name: sha256}`` of the files ``folder/name``."""
    return {name: file_digest([folder / name]) for name in names}


def verify_file_checksums(folder: Path, checksums: dict[str, str]) -> None:
    """Refuse the first file of ``checksums`` (relative to ``folder``) whose contents differ."""
    for name, expected in checksums.items():
        path = folder / name
        if not path.is_file():
            raise CorruptFileError(f"{path} is missing")
        if file_digest([path]) != expected:
            raise CorruptFileError(
                f"{path}: its contents differ from what was written (checksum mismatch: corrupt, "
                f"truncated or modified); it is not loaded"
            )


def write_export_checksums(folder: Path) -> None:
    """Record the checksum of every ``*.safetensors`` file in an export folder."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors"))
    (folder / EXPORT_CHECKSUMS).write_text(json.dumps(file_checksums(folder, names), indent=2))


def verify_export_checksums(folder: Path) -> None:
    listed = folder / EXPORT_CHECKSUMS
    if not listed.is_file():
        raise CorruptFileError(f"{folder} has no {EXPORT_CHECKSUMS}: not a complete projq-train export")
    verify_file_checksums(folder, json.loads(listed.read_text()))


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}|".encode())
        for key in sorted(value, key=repr):
            h.update(f"{key!r}:".encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}|".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(f"V{value!r}|".encode())


def contents_digest(checkpoint: dict[str, Any]) -> str:
    """sha256 over every tensor (dtype, shape, bytes) and value of ``checkpoint``, walked in a
    fixed order, without ``checkpoint["projq"]["checksum"]`` itself."""
    projq = {k: v for k, v in checkpoint.get("projq", {}).items() if k != "checksum"}
    h = hashlib.sha256()
    _feed(h, {**checkpoint, "projq": projq})
    return h.hexdigest()


def verify_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose contents differ from those it was written with (one without a
    checksum, written before checksums existed, is accepted)."""
    expected = checkpoint.get("projq", {}).get("checksum")
    if expected is not None and contents_digest(checkpoint) != expected:
        raise CorruptFileError(
            f"{path}: its contents differ from what was written (checksum mismatch: corrupt or "
            f"modified); it is not loaded"
        )
