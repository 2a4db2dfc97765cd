"""A base model's tensors, read one at a time, and the base's identity.

A :class:`WeightSource` hands out the tensors of a checkpoint by their name in the Hugging Face
model (``model.layers.3.mlp.up_proj.weight``), each read when asked for, so a caller can hold
one decoder layer at a time:

- :class:`SafetensorsSource`: ``*.safetensors`` files (one or sharded), memory-mapped;
- :class:`GGUFSource`: a GGUF file, memory-mapped; each tensor is dequantized when read (and
  q/k rows un-permuted as ``transformers`` does when it loads the whole file);
- :class:`RandomInitSource`: a model built from a config (tests, demos, scale measurements):
  every tensor is drawn from a generator seeded by the model seed and the tensor's name, so it
  is the same whichever order or subset is read.

:func:`base_identity` names the base without materializing it: a sha256 streamed over the
weight files of a local checkpoint, the commit of a hub repository, or the config and seed of
a random model; plus the dtype the model computes in.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from projq_train.config import ModelConfig

HASH_CHUNK = 1 << 24  # bytes read per step when hashing a file
FINITE_CHECK_ELEMENTS = 2**24  # elements per isfinite call (64 MiB of fp32)


class WeightSource(Protocol):
    def get(self, name: str) -> Tensor:
        """The tensor ``name`` (on CPU, in the checkpoint's own dtype)."""


class SafetensorsSource:
    """Tensors of one or several ``.safetensors`` files, read lazily through mmap."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def get(self, name: str) -> Tensor:
        if name not in self._where:
            raise KeyError(f"tensor {name} is not in the checkpoint")
        return self._where[name].get_tensor(name)


class GGUFSource:
    """Tensors of a GGUF file by their Hugging Face names, dequantized to float32 when read. The
    bytes of a tensor are read with ``pread`` rather than through the reader's memory map, so
    pages already read do not stay resident in the process."""

    def __init__(self, path: Path, skeleton: nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        reader = GGUFReader(str(path))  # its parsed metadata is large: only the tensor index is kept
        arch = reader.fields["general.architecture"]
        arch = bytes(arch.parts[arch.data[0]]).decode()
        heads = {k: getattr(skeleton.config, k) for k in ("num_attention_heads", "num_key_value_heads")}
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=heads)
        self._mapping = get_gguf_hf_weights_map(skeleton, self._processor)
        self._tensors = {
            self._mapping[t.name]: (
                t.name,
                t.tensor_type,
                t.data.dtype,
                t.data.shape,
                int(t.n_bytes),
                int(t.data_offset),
            )
            for t in reader.tensors
            if t.name in self._mapping
        }
        self._path = path

    def get(self, name: str) -> Tensor:
        if name not in self._tensors:
            raise KeyError(f"tensor {name} is not in the GGUF file")
        gguf_name, qtype, dtype, shape, n_bytes, offset = self._tensors[name]
        with open(self._path, "rb") as f:
            raw = bytearray(os.pread(f.fileno(), n_bytes, offset))  # writable: no copy below
        data = np.frombuffer(raw, dtype=dtype).reshape(shape)  # as stored (quantized), rows first
        weights = self._processor.process(
            weights=_dequantize_by_rows(data, qtype), name=gguf_name, tensor_key_mapping=self._mapping
        ).weights
        return torch.from_numpy(np.ascontiguousarray(weights))


def _dequantize_by_rows(data: np.ndarray, qtype, rows: int = 4096) -> np.ndarray:
    """``gguf.dequantize`` a block of rows at a time into one float32 array, so its temporaries
    stay the size of a block (for an embedding they would be several times the result)."""
    from gguf import dequantize

    if data.ndim < 2 or data.shape[0] <= rows:
        return dequantize(data, qtype)
    first = dequantize(data[:rows], qtype)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:rows] = first
    for start in range(rows, data.shape[0], rows):
        out[start : start + rows] = dequantize(data[start : start + rows], qtype)
    return out


class RandomInitSource:
    """The random model of a config: linear and embedding weights ~ N(0, initializer_range²)
    (the embedding's padding row zero), norm weights 1, biases 0; each tensor from its own
    generator seeded by ``seed`` and the tensor's name."""

    def __init__(self, skeleton: nn.Module, seed: int) -> None:
        self._shapes = {n: t.shape for n, t in skeleton.state_dict().items()}
        self._config = skeleton.config
        self._seed = seed

    def get(self, name: str) -> Tensor:
        if name not in self._shapes:
            raise KeyError(f"tensor {name} is not in the model")
        shape = self._shapes[name]
        if name.endswith("bias"):
            return torch.zeros(shape)
        if "norm" in name.rpartition(".")[0].rpartition(".")[2]:
            return torch.ones(shape)
        gen = torch.Generator().manual_seed(self._seed * 1_000_003 + zlib.crc32(name.encode()))
        t = torch.empty(shape).normal_(0.0, self._config.initializer_range, generator=gen)
        pad = getattr(self._config, "pad_token_id", None)
        if name.endswith("embed_tokens.weight") and pad is not None and 0 <= pad < shape[0]:
            t[pad] = 0
        return t


def local_folder(name: str) -> Path | None:
    """The local folder ``name`` is, or ``None`` for a hub name (``org/name``). A name that can only
    be a path (absolute, starting with ``.`` or ``~``, or with more than one ``/``) must exist."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model.name_or_path {name}: no such folder")
    return None


def local_weight_files(cfg: ModelConfig) -> list[Path] | None:
    """The weight files of a local checkpoint (``None`` for a hub name or a random model)."""
    if cfg.config is not None or (root := local_folder(cfg.name_or_path)) is None:
        return None
    if cfg.gguf_file:
        path = root / cfg.gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return [path]
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / s for s in shards]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{root} holds no .safetensors weights (projq-train streams safetensors or GGUF; save a "
            f"PyTorch .bin checkpoint again with `save_pretrained(dir, safe_serialization=True)`)"
        )
    return files


def hub_snapshot(repo: str, patterns: list[str]) -> Path:
    """The local snapshot directory of a hub repository holding the files matching ``patterns``
    (downloaded if they are not cached); its name is the repository commit."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, no access: one line for the user
        raise FileNotFoundError(
            f"model {repo!r} is neither a local directory nor a reachable Hugging Face hub repository "
            f"({type(err).__name__})"
        ) from None


def file_digest(paths: list[Path]) -> str:
    """sha256 over the names, sizes and bytes of ``paths``, streamed in chunks; computed once per
    process for files whose size and modification time have not changed."""
    return _file_digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths))


@functools.lru_cache(maxsize=8)
def _file_digest(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, size, _ in files:
        h.update(f"{Path(name).name}|{size}|".encode())
        with open(name, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def checkpoint_identity(cfg: ModelConfig) -> str:
    """What the base checkpoint is, without loading it: ``random:<sha256 of config and seed>``,
    ``files:<sha256 of the weight files>`` or ``hub:<repo>@<commit>``."""
    if cfg.config is not None:
        spec = json.dumps({"config": cfg.config, "seed": cfg.seed}, sort_keys=True)
        return "random:" + hashlib.sha256(spec.encode()).hexdigest()
    if (files := local_weight_files(cfg)) is not None:
        return "files:" + file_digest(files)
    return f"hub:{cfg.name_or_path}@{hub_snapshot(cfg.name_or_path, ['config.json']).name}"


def base_identity(cfg: ModelConfig) -> str:
    """The base model as it is computed: :func:`checkpoint_identity`, then ``|<dtype>``."""
    return f"{checkpoint_identity(cfg)}|{cfg.dtype}"


def first_nonfinite(named_tensors: Iterable[tuple[str, Tensor]]) -> str | None:
    """The name of the first floating tensor holding a NaN or an infinity (of a sharded DTensor,
    this rank's shard is checked), or None. Checked :data:`FINITE_CHECK_ELEMENTS` at a time:
    ``isfinite`` of a whole tensor makes several temporaries of its size (2.7 GiB for a 1 GiB fp32
    embedding, which made the peak of a whole 1B-parameter fit)."""
    for name, t in named_tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_floating_point() and local.element_size() == 1:  # fp8 (8-bit scales): no isfinite
            local = local.float()
        if local.is_floating_point() and not all(
            bool(torch.isfinite(chunk).all()) for chunk in local.reshape(-1).split(FINITE_CHECK_ELEMENTS)
        ):
            return name
    return None


def weight_source(cfg: ModelConfig, skeleton: nn.Module) -> WeightSource:
    """Where the tensors of ``cfg``'s base come from (``skeleton``: the model on the meta device)."""
    if cfg.config is not None:
        return RandomInitSource(skeleton, cfg.seed)
    files = local_weight_files(cfg)
    if files is None:
        patterns = [cfg.gguf_file] if cfg.gguf_file else ["*.safetensors", "*.json"]
        root = hub_snapshot(cfg.name_or_path, patterns)
        files = local_weight_files(ModelConfig(name_or_path=str(root), gguf_file=cfg.gguf_file))
    if cfg.gguf_file:
        return GGUFSource(files[0], skeleton)
    return SafetensorsSource(files)


def release_weights(module: nn.Module) -> None:
    """Move ``module``'s weights (parameters and persistent buffers) to the meta device, where
    :func:`materialize` can fill them again; computed buffers (a rotary embedding's ``inv_freq``,
    not in the checkpoint) stay."""
    stored = module.state_dict(keep_vars=True)
    computed = {name: b for name, b in module.named_buffers() if name not in stored}
    module.to("meta")
    for name, buffer in computed.items():
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner).register_buffer(leaf, buffer, persistent=False)


def materialize(module: nn.Module, prefix: str, source: WeightSource, dtype: torch.dtype) -> None:
    """Fill every tensor of ``module`` still on the meta device from ``source`` (names under
    ``prefix``), in ``dtype``. Tensors already materialized are left alone; a tensor shared under
    two names (tied embeddings) is read once, under its first name (re-tie the others after)."""
    state, seen = {}, set()
    for name, t in module.state_dict(keep_vars=True).items():
        if t.is_meta and id(t) not in seen:
            state[name] = source.get(prefix + name).to(dtype)
        seen.add(id(t))
    module.load_state_dict(state, strict=False, assign=True)


def load_to_device(
    module: nn.Module, prefix: str, source: WeightSource | None, dtype: torch.dtype, device: torch.device
) -> None:
    """Bring ``module`` to ``device`` for its turn in a streamed pass: its tensors read from
    ``source`` first (a skeleton on the meta device; :func:`materialize`), or, without a source,
    the weights it already holds."""
    if source is not None:
        materialize(module, prefix, source, dtype)
    module.to(device)


def unload_from_device(module: nn.Module, source: WeightSource | None) -> None:
    """End ``module``'s turn: back to the meta device when its weights came from ``source``
    (:func:`release_weights`), else back to the CPU."""
    if source is not None:
        release_weights(module)
    else:
        module.to("cpu")
