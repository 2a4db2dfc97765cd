"""Predicted peak memory of ``fit`` and ``quantize`` from a recipe and the model's config alone.

``projq-train estimate --config recipe.yaml [overrides] [--json] [--device_memory 24GB]`` reads
the same recipes and overrides as ``fit`` (or a ``quantize`` recipe), reads the model's
``transformers`` config (the recipe's ``config``, a hub name, a local directory or GGUF metadata;
never a weight), and prints the predicted peak per process by component. The arithmetic is
plain functions of a :class:`ModelShape` and the recipe's dataclasses; the CLI glue is at the end.

What is counted (``t`` = batch x max_seq_length tokens per process, ``h`` hidden size, ``i``
intermediate size, ``L`` decoder layers, ``V`` vocabulary, ``r`` adapter rank):

- packed weights: exactly the :class:`~projq_train.quant.linear.QuantLinear` buffers, ``qweight``
  int32 ``(packed_length(in), out)``, ``qzeros`` int32 ``(groups, packed_length(out))``, ``scales``
  fp16 ``(groups, out)``, ``g_idx`` int32 ``(in,)``, per target module and layer;
- float tensors: embeddings, an untied ``lm_head``, norms, biases and any linear that is not a
  target, in the recipe dtype (``bf16-true``/``16-true`` cast them to 16 bits);
- adapters ``r (in + out)`` per target module and layer, their gradients, optimizer state;
- activations: what autograd keeps for backward, per token and decoder layer
  (:func:`layer_activation_bytes`), with and without gradient checkpointing;
- logits and loss: the chunked linear + cross-entropy of :mod:`projq_train.loss` keeps no logits:
  the final hidden states, the rows with a target and their gradient (3 ``t h``), and about three
  fp32 ``(chunk_rows, V)`` buffers with ``chunk_rows = max(1, 2**24 // V)``;
- quantize (streamed, one decoder layer at a time): that layer's float weights in the recipe
  dtype, fp32 working copies of its largest module and its ``(in, in)`` Hessian matrices, the
  embeddings, the calibration activations (inputs and outputs of the current layer, in the
  recipe dtype) and the packed results with their fp32 compensations; under ``quant.budget_bits``
  or ``quant.compensation: fisher`` also the sensitivity pass before it
  (:mod:`projq_train.quant.sensitivity`): every layer's input hidden states of its tokens, the
  embeddings and head, one decoder layer and one window's forward and backward through it, when
  that phase is the larger.

A CPU run's peak is host memory: a fixed runtime baseline (:data:`RUNTIME_BASELINE_BYTES`) plus
the components, and for ``fit`` the allocator's slack (:data:`CPU_ALLOCATOR_SLACK`). A GPU run's
peak is device memory (``torch.cuda.max_memory_allocated`` semantics: no CUDA context, no
allocator cache); host memory is reported beside it.

The activation count is the bytes of the distinct storages autograd saves in a forward pass of
the packed model with its adapters; ``tests/test_estimate.py`` measures them with
``torch.autograd.graph.saved_tensors_hooks`` on CPU (fp32, bf16 autocast, bf16; dropout 0 and
0.05; with and without checkpointing) and the formulas match byte for byte there. On CUDA, a
dropout keeps a bool mask instead of CPU's noise tensor in the input's dtype (counted); the
attention kernels' padding of the logsumexp and mask is not. The adapter dropout costs, per
adapted module, a copy of its input plus the mask, and the q/k/v and gate/up adapters no longer
share one saved input: on a Llama-2-7B layer (bf16-mixed, CUDA, padded batches) dropout 0.05
raises what each token keeps from 146 KiB to 213 KiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from projq_train.config import (
    SUPPORTED_BITS,
    AdapterConfig,
    CalibrationConfig,
    ModelConfig,
    QuantConfig,
    check_adapter_settings,
)
from projq_train.loss import LOGITS_PER_CHUNK
from projq_train.quant.calibrate import SEQUENTIAL_GROUPS
from projq_train.quant.linear import dequantize_block_rows
from projq_train.quant.pack import packed_storage_bits
from projq_train.quant.rtn import check_grid
from projq_train.quant.sensitivity import SENSITIVITY_TOKENS

# Peak RSS of `python -c "import torch, transformers, lightning, peft,
# transformers.models.llama.modeling_llama"` (torch 2.13 CPU, transformers 5.24, lightning 2.6,
# peft 0.21; Python 3, Linux x86-64) in the default install (`pip install -e ".[gguf]"`: no Triton,
# no matplotlib), measured with `/usr/bin/time -v`: 414,832 / 414,964 / 415,196 KiB in three runs.
# Where Triton and matplotlib are installed (the dev extra), every process imports them (the model
# code imports torch._dynamo, which loads Triton; Lightning's torchmetrics loads matplotlib):
# 514,900 KiB.
RUNTIME_BASELINE_BYTES = 414_964 * 1024
# The same for what `projq-train quantize` imports (no Lightning, no peft): `python -c "import
# projq_train.cli, projq_train.artifact, gguf, safetensors, transformers.models.llama.modeling_llama"`:
# 348,440 / 348,464 / 348,524 KiB (421,100 KiB with Triton installed).
QUANTIZE_RUNTIME_BYTES = 348_464 * 1024

# glibc keeps part of what a training step allocates and frees (activations, gradients, optimizer
# state, the loss's buffers) resident between the trims of projq_train.host_memory. Measured as
# (peak RSS - the other components) / those components at commit b53a1a9, one run each of
# benchmarks/memory.py: SmolLM2 fit 1 x 128 0.54, 4 x 256 0.26, the random 0.49 B model 0.39 and
# 1.24 B model 0.40; the estimate takes 0.3 of them.
CPU_ALLOCATOR_SLACK = 0.3

HALF = 2  # bytes of a bf16/fp16 element
FP32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
# (in, in) matrices a module's quantization holds besides the Hessians of its group:
# H^{1/2} and H^{-1/2} for the compensation; GPTQ adds the damped copy and its inverse Cholesky
# factor; ProjQ the projected Hessian
HESSIAN_WORK_MATRICES = {"rtn": 2, "gptq": 4, "projq": 5}
WEIGHT_WORK_COPIES = 4  # fp32 (out, in) copies of the module being quantized: W, Q, W - Q, Q + BA
SINGLE_STATE = ("adagrad", "rmsprop", "lion", "adadelta")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a supported decoder model, from its ``transformers`` config."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    """``lm_head`` shares the embedding matrix."""
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    """Qwen3: an RMSNorm over each query and key head."""

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        heads = config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=config.model_type,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=config.model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=config.model_type == "qwen3",
        )

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """``name: (in_features, out_features, bias)`` of one decoder layer's linear modules."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q, self.qkv_bias),
            "k_proj": (h, kv, self.qkv_bias),
            "v_proj": (h, kv, self.qkv_bias),
            "o_proj": (q, h, self.o_bias),
            "gate_proj": (h, i, self.mlp_bias),
            "up_proj": (h, i, self.mlp_bias),
            "down_proj": (i, h, self.mlp_bias),
        }

    def float_linear_elements(self, targets: list[str]) -> int:
        """Weight elements of one decoder layer's linears that are not quantized (not in ``targets``)."""
        return sum(n_in * n_out for name, (n_in, n_out, _) in self.linears().items() if name not in targets)

    def layer_float_elements(self) -> int:
        """Elements of one decoder layer's float weights (linears, biases, norms)."""
        linear = sum(n_in * n_out + (n_out if bias else 0) for n_in, n_out, bias in self.linears().values())
        return linear + 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def parameters(self) -> int:
        """Parameters of the float model."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * self.layer_float_elements() + self.vocab * self.hidden + head + self.hidden

    def describe(self) -> str:
        return (
            f"{self.model_type}: {self.layers} layers, hidden {self.hidden}, intermediate "
            f"{self.intermediate}, {self.heads}/{self.kv_heads} heads x {self.head_dim}, vocab {self.vocab}"
            f"{', tied lm_head' if self.tied else ''}; {fmt_count(self.parameters())} parameters"
        )


@dataclass(frozen=True)
class Numerics:
    """Bytes per element of what a training step holds, from Lightning's precision, the recipe
    dtype and the device."""

    weights: int
    """Float tensors of the base (embeddings, norms, lm_head)."""
    adapter: int
    """LoRA parameters (peft keeps them fp32 unless a ``*-true`` precision casts the model)."""
    stream: int
    """Hidden states between layers and the norms' outputs."""
    compute: int
    """Outputs of the matmuls and attention (q, k, v, MLP)."""
    autocast: bool
    on_gpu: bool

    def mask(self, dtype_bytes: int) -> int:
        """Bytes a dropout keeps per element: a bool mask from CUDA's fused kernel, a noise tensor
        in the input's dtype on CPU."""
        return 1 if self.on_gpu else dtype_bytes


def normalize_precision(precision: Any) -> str:
    text = "32-true" if precision is None else str(precision)
    text = PRECISION_ALIASES.get(text, text)
    if text not in SUPPORTED_PRECISIONS:
        raise ValueError(
            f"trainer.precision {precision!r} is not supported by the estimate; "
            f"use one of {', '.join(SUPPORTED_PRECISIONS)}"
        )
    return text


def numerics(precision: str, dtype: str, on_gpu: bool) -> Numerics:
    """``precision``: a normalized Lightning precision; ``dtype``: ``model.base.dtype``."""
    base = DTYPE_BYTES[dtype]
    if precision.endswith("-true") and precision != "32-true":  # the model is cast to 16 bits
        return Numerics(HALF, HALF, HALF, HALF, autocast=False, on_gpu=on_gpu)
    if precision.endswith("-mixed"):  # autocast: matmuls in 16 bits, tensors kept as loaded
        return Numerics(base, FP32, base, HALF, autocast=True, on_gpu=on_gpu)
    return Numerics(base, FP32, base, base, autocast=False, on_gpu=on_gpu)


@dataclass(frozen=True)
class FitSettings:
    """What a ``fit`` recipe says about one training step of one process."""

    batch_size: int
    seq_len: int
    packing: bool
    """Packed batches have no padding, hence no attention mask (SDPA's GQA path, no mask)."""
    gradient_checkpointing: bool
    precision: str = "32-true"
    on_gpu: bool = False
    optimizer: str = "torch.optim.AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    shards: int = 1
    """Processes the float tensors, adapters, gradients and optimizer state are sharded over
    (FSDP); 1 for one process or DDP."""

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class MemoryEstimate:
    """Named components in bytes, on the accelerator (``device``) and in host memory (``host``)."""

    kind: str
    """``fit`` or ``quantize``."""
    on_gpu: bool
    device: dict[str, int]
    host: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def peak_bytes(self) -> int:
        """Device memory for a GPU run; host plus device (all host) for a CPU run."""
        return self.device_bytes if self.on_gpu else self.host_bytes + self.device_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "on_gpu": self.on_gpu,
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "device": dict(self.device),
            "host": dict(self.host),
            "details": dict(self.details),
        }


# --- the arithmetic -------------------------------------------------------------------------


def packed_linear_bytes(
    in_features: int, out_features: int, bits: int, group_size: int, scale_bits: int = 16
) -> int:
    """Bytes of one :class:`QuantLinear`'s packed buffers (``qweight``, ``qzeros``, ``scales``
    (with 8-bit ones ``scale_exponent``), ``g_idx``)."""
    check_grid(bits, group_size, in_features)
    g_idx = in_features * 4  # int32
    return packed_storage_bits(out_features, in_features, bits, group_size, scale_bits) // 8 + g_idx


def bit_widths(quant: QuantConfig) -> str:
    """``3-bit``, or the budget of a mixed-precision recipe."""
    if quant.budget_bits is None:
        return f"{quant.bits}-bit"
    budget = quant.budget_bits
    return f"2/3/4-bit under a budget of {budget:g} bits per weight (widths chosen when quantizing)"


def quantized_linear_bytes(in_features: int, out_features: int, quant: QuantConfig) -> int:
    """Bytes of one quantized linear under ``quant``: packed at ``bits``; under ``budget_bits``
    at most the budget's average (the widths are chosen when quantizing) plus ``g_idx``; NF4."""
    if quant.method == "nf4":
        return nf4_linear_bytes(in_features, out_features)
    if quant.budget_bits is None:
        return packed_linear_bytes(in_features, out_features, quant.bits, quant.group_size, quant.scale_bits)
    for bits, group_size in itertools.product(SUPPORTED_BITS, {quant.group_size, *quant.budget_group_sizes}):
        check_grid(bits, group_size, in_features)
    return math.ceil(quant.budget_bits * in_features * out_features / 8) + in_features * 4


def nf4_linear_bytes(in_features: int, out_features: int) -> int:
    """bitsandbytes NF4 (``Linear4bit`` with nested statistics): 4-bit codes, an 8-bit absmax per
    64 weights, an fp32 absmax per 256 of those."""
    n = in_features * out_features
    return n // 2 + math.ceil(n / 64) + 4 * math.ceil(n / (64 * 256))


def packed_weight_bytes(
    shape: ModelShape, quant: QuantConfig, module_grids: dict[str, tuple[int, int]] | None = None
) -> int:
    """All quantized linears of the model (the target modules of every decoder layer); with
    ``module_grids`` (full module name → (bits, group size), an artifact's configuration) each on
    its own grid."""
    linears = shape.linears()
    if module_grids is not None:
        return sum(
            packed_linear_bytes(*linears[module_position(name)[1]][:2], bits, group_size, quant.scale_bits)
            for name, (bits, group_size) in module_grids.items()
        )
    per_layer = 0
    for name in quant.target_modules:
        n_in, n_out, _ = linears[name]
        try:
            per_layer += quantized_linear_bytes(n_in, n_out, quant)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return shape.layers * per_layer


def float_tensor_bytes(shape: ModelShape, quant: QuantConfig, weight_bytes: int) -> int:
    """Embeddings, an untied lm_head, norms, biases (quantized layers keep theirs) and the linears
    that are not quantized."""
    per_layer = 2 * shape.hidden + (2 * shape.head_dim if shape.qk_norm else 0)
    per_layer += sum(n_out for _, n_out, bias in shape.linears().values() if bias)
    per_layer += shape.float_linear_elements(quant.target_modules)
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    return weight_bytes * (shape.layers * per_layer + embeddings + shape.hidden)


def adapter_parameters(shape: ModelShape, quant: QuantConfig, rank: int) -> int:
    """LoRA parameters: ``r (in + out)`` per target module and layer."""
    linears = shape.linears()
    return shape.layers * sum(rank * (linears[n][0] + linears[n][1]) for n in quant.target_modules)


def optimizer_state_bytes(optimizer: str, args: dict[str, Any], params: int, param_bytes: int) -> int:
    """State of ``optimizer`` (a class path) for ``params`` trainable parameters of ``param_bytes``.

    torch optimizers keep their state in the parameters' dtype: Adam-like 2 tensors (3 with
    amsgrad), SGD 1 with momentum else 0, Adagrad/RMSprop/Lion 1. bitsandbytes 8-bit variants keep
    1 byte per state (Adam-like: 2 bytes per parameter), its 32-bit ones fp32. Unknown: 2 states.
    """
    name = optimizer.rsplit(".", 1)[-1].lower()
    if name.startswith("sgd"):
        states = 1 if args.get("momentum", 0) else 0
    elif any(name.startswith(p) or name.startswith("paged" + p) for p in SINGLE_STATE):
        states = 1
    else:  # Adam-like (and the unknown)
        states = 3 if name.startswith("ademamix") or args.get("amsgrad") else 2
    if "8bit" in name:
        return states * params
    element = FP32 if optimizer.startswith("bitsandbytes") else param_bytes
    return states * params * element


def _adapter_input_bytes(
    shape: ModelShape, quant: QuantConfig, adapter: AdapterConfig, num: Numerics
) -> tuple[int, int]:
    """Per token and layer: bytes LoRA keeps of its inputs, and of ``A x``.

    ``lora_A`` keeps the input its matmul sees: the module input itself, shared by the modules of
    a group (q/k/v, gate/up), when no cast or dropout intervenes; otherwise one copy per module
    (a cast to the adapter's dtype, autocast's cast to 16 bits of an fp32 input, or the dropout's
    output), and with dropout also the dropout's mask. ``o_proj``'s input is the attention output,
    kept by SDPA already.
    """
    linears = shape.linears()
    seen = HALF if num.autocast else num.adapter  # dtype of the input the adapter's matmul keeps
    kept, n_targets = 0, 0
    for group in SEQUENTIAL_GROUPS:
        n = sum(name in quant.target_modules for name in group)
        if n == 0:
            continue
        n_targets += n
        width = linears[group[0]][0]
        a_in = num.stream if group[0] in ("q_proj", "gate_proj") else num.compute
        cast = a_in != seen
        if adapter.dropout > 0:
            dropped = a_in if num.autocast else num.adapter  # the dropout runs on this dtype
            kept += n * width * (seen + num.mask(dropped))
        elif cast:
            kept += n * width * seen
        elif group != ("o_proj",):
            kept += width * a_in
    return kept, n_targets * adapter.rank * seen


def layer_activation_bytes(
    shape: ModelShape,
    quant: QuantConfig,
    adapter: AdapterConfig,
    num: Numerics,
    seq_len: int,
    masked: bool,
) -> dict[str, int]:
    """Bytes autograd keeps per token for backward in one decoder layer (Llama/Qwen/Mistral in
    ``transformers`` with SDPA), by part.

    - norms: each RMSNorm keeps its input in fp32 (the input itself, or its fp32 copy) and the
      ``rsqrt`` (one fp32 per token); its output is not kept (the norm weight is frozen).
    - attention: SDPA keeps q, k, v, its output and an fp32 logsumexp per head. With a padding mask
      ``transformers`` repeats k and v to every query head and SDPA keeps the mask, turned into the
      query's dtype, ``(B, 1, T, T)``: ``T`` elements per token and layer.
    - Qwen3's q/k norms keep their inputs in fp32 and one rsqrt per head.
    - MLP: the gated SiLU (:func:`projq_train.swiglu.swiglu`) keeps gate and up: ``2 i``.
    - adapters: see :func:`_adapter_input_bytes`; the frozen packed matmuls keep nothing.
    """
    h, i, hd = shape.hidden, shape.intermediate, shape.head_dim
    q_width, kv_width = shape.heads * hd, shape.kv_heads * hd
    kv_kept = q_width if masked else kv_width
    parts = {
        "norms": 2 * (FP32 * h + FP32),
        "attention": num.compute * (2 * q_width + 2 * kv_kept) + FP32 * shape.heads,
        "mlp": 2 * i * num.compute,
    }
    if masked:
        parts["attention_mask"] = seq_len * num.compute
    if shape.qk_norm:
        parts["qk_norms"] = FP32 * (q_width + kv_width) + FP32 * (shape.heads + shape.kv_heads)
    parts["adapter_inputs"], parts["adapter_hidden"] = _adapter_input_bytes(shape, quant, adapter, num)
    return parts


def activation_bytes(
    shape: ModelShape,
    quant: QuantConfig,
    adapter: AdapterConfig,
    num: Numerics,
    fit: FitSettings,
    gradient_checkpointing: bool,
) -> tuple[int, int]:
    """``(kept, recompute)``: bytes kept for backward at the end of the forward pass, and, with
    gradient checkpointing, the one decoder layer's activations rebuilt during backward.

    Without checkpointing: ``L`` layers (:func:`layer_activation_bytes`) and the final norm's fp32
    input, less what the first layer keeps of its input (the frozen embeddings' output needs no
    gradient: no norm input, no dropout mask), plus the rotary cos/sin. With it: each layer's input
    hidden states (the embeddings' output is made to require a gradient) and the final norm.
    Under autocast, also the 16-bit copies of the adapter weights and of float (non-target) linear
    weights that the matmuls keep (with checkpointing, one layer's, while it is recomputed).
    """
    t, h = fit.tokens, shape.hidden
    per_layer = sum(layer_activation_bytes(shape, quant, adapter, num, fit.seq_len, not fit.packing).values())
    norm = FP32 * h + FP32  # an RMSNorm's fp32 input and rsqrt
    casts = 0
    if num.autocast:
        casts = adapter_parameters(shape, quant, adapter.rank) * HALF if num.adapter != HALF else 0
        if num.weights != HALF:
            casts += shape.layers * shape.float_linear_elements(quant.target_modules) * HALF
    if gradient_checkpointing:  # the casts happen inside the checkpointed layers: recomputed
        return t * (shape.layers * h * num.stream + norm), t * per_layer + casts // shape.layers
    # the first layer's q/k/v input needs no gradient: no dropout mask, no copy of lora_A's weight
    n_qkv = sum(name in quant.target_modules for name in SEQUENTIAL_GROUPS[0])
    first = t * norm + (n_qkv * adapter.rank * h * HALF if casts else 0)
    if adapter.dropout > 0:
        first += t * n_qkv * h * num.mask(num.stream if num.autocast else num.adapter)
    rotary = 2 * fit.seq_len * shape.head_dim * num.stream  # cos, sin (1, T, head_dim), shared by layers
    return t * (shape.layers * per_layer + norm) - first + rotary + casts, 0


def logits_loss_bytes(shape: ModelShape, tokens: int, num: Numerics) -> int:
    """The chunked linear + cross-entropy: final hidden states, the rows with a target, their
    gradient (each ``(tokens, h)``), and one chunk's fp32 ``(chunk_rows, V)`` buffer, beside which
    a 16-bit ``lm_head`` makes a 16-bit one (the product before its cast, the cast back)."""
    chunk_rows = min(tokens, max(1, LOGITS_PER_CHUNK // shape.vocab))
    chunk_bytes = FP32 + (num.weights if num.weights < FP32 else 0)
    return 3 * tokens * shape.hidden * num.stream + chunk_rows * shape.vocab * chunk_bytes


def estimate_fit(
    shape: ModelShape,
    quant: QuantConfig,
    adapter: AdapterConfig,
    dtype: str,
    fit: FitSettings,
    module_grids: dict[str, tuple[int, int]] | None = None,
) -> MemoryEstimate:
    """Peak of one training step of one process (``dtype``: ``model.base.dtype``; ``module_grids``:
    each module's bits and group size as an artifact recorded them, see
    :func:`artifact_configuration`)."""
    num = numerics(fit.precision, dtype, fit.on_gpu)
    params = adapter_parameters(shape, quant, adapter.rank)
    shards = max(1, fit.shards)
    kept, recompute = activation_bytes(shape, quant, adapter, num, fit, fit.gradient_checkpointing)
    components = {
        "packed_weights": packed_weight_bytes(shape, quant, module_grids),
        "float_tensors": float_tensor_bytes(shape, quant, num.weights) // shards,
        "adapters": params * num.adapter // shards,
        "gradients": params * num.adapter // shards,
        "optimizer_state": optimizer_state_bytes(fit.optimizer, fit.optimizer_args, params, num.adapter)
        // shards,
        "activations": kept,
    }
    if fit.gradient_checkpointing:
        components["checkpoint_recompute"] = recompute
    components["logits_loss"] = logits_loss_bytes(shape, fit.tokens, num)
    if not fit.on_gpu and quant.method != "nf4":
        # the torch backend dequantizes a block of rows at a time: int32 codes, then fp32, then the
        # input's dtype (two of the three at once)
        linears = shape.linears()
        if module_grids:  # (kind, grid) of every module
            grids = {(module_position(n)[1], grid) for n, grid in module_grids.items()}
        else:
            widths = SUPPORTED_BITS if quant.bits is None else (quant.bits,)
            sizes = quant.budget_group_sizes if quant.budget_bits is not None else [quant.group_size]
            grids = set(itertools.product(quant.target_modules, itertools.product(widths, sizes)))
        block = max(
            dequantize_block_rows(linears[kind][0], linears[kind][1], bits, group_size) * linears[kind][1]
            for kind, (bits, group_size) in grids
        )
        components["dequantize_workspace"] = block * 2 * FP32
    other = {gc: sum(activation_bytes(shape, quant, adapter, num, fit, gc)) for gc in (False, True)}
    details = {
        "tokens": fit.tokens,
        "batch_size": fit.batch_size,
        "seq_len": fit.seq_len,
        "gradient_checkpointing": fit.gradient_checkpointing,
        "activations_without_checkpointing": other[False],
        "activations_with_checkpointing": other[True],
        "activation_bytes_per_token_per_layer": layer_activation_bytes(
            shape, quant, adapter, num, fit.seq_len, not fit.packing
        ),
        "adapter_parameters": params,
        "precision": fit.precision,
        "optimizer": fit.optimizer,
        "shards": shards,
    }
    if fit.on_gpu:  # the model is built on the host, then moved to the device
        staging = components["packed_weights"] + components["float_tensors"] + components["adapters"]
        host = {"runtime": RUNTIME_BASELINE_BYTES, "model_staging": staging}
        return MemoryEstimate("fit", True, components, host, details)
    churn = ("activations", "gradients", "optimizer_state", "logits_loss", "dequantize_workspace")
    components["allocator_slack"] = int(CPU_ALLOCATOR_SLACK * sum(components.get(n, 0) for n in churn))
    return MemoryEstimate("fit", False, {}, {"runtime": RUNTIME_BASELINE_BYTES, **components}, details)


def estimate_quantize(
    shape: ModelShape,
    quant: QuantConfig,
    rank: int,
    calibration: CalibrationConfig,
    dtype: str,
    on_gpu: bool,
    runtime: int = RUNTIME_BASELINE_BYTES,
) -> MemoryEstimate:
    """Peak of the streamed quantization for adapters of rank ``rank`` (``dtype``: the recipe dtype
    the layers are read into; ``runtime``: the process's baseline, :data:`QUANTIZE_RUNTIME_BYTES`
    for ``projq-train quantize``, the default for quantizing at ``fit`` setup).

    One decoder layer's float weights; for the module whose quantization holds the most, fp32
    working copies of its weight, the Hessians of its group and the fp32 work matrices (as
    :mod:`projq_train.quant.projq` computes, on CPU and GPU); the calibration inputs and outputs
    of the current layer; one calibration batch through the layer; the embeddings and final norm;
    and every packed weight and fp32 compensation ``r (in + out)`` made so far (all, at the end).
    """
    w = DTYPE_BYTES[dtype]
    linears = shape.linears()
    if quant.method == "nf4":  # bitsandbytes quantizes while `fit` loads the float model
        host = {"runtime": runtime, "float_model": shape.parameters() * w}
        return MemoryEstimate("quantize", on_gpu, {}, host, {"note": "nf4: the float model is loaded whole"})
    n_work = HESSIAN_WORK_MATRICES[quant.method] if rank > 0 else 1
    hessians, working = 0, 0
    for group in SEQUENTIAL_GROUPS if quant.true_sequential else (sum(SEQUENTIAL_GROUPS, ()),):
        members = [n for n in group if n in quant.target_modules]
        for name in members:
            n_in, n_out, _ = linears[name]
            held = sum(linears[m][0] ** 2 for m in members) * FP32 + n_work * n_in * n_in * FP32
            if held + WEIGHT_WORK_COPIES * n_in * n_out * FP32 > hessians + working:
                hessians, working = held, WEIGHT_WORK_COPIES * n_in * n_out * FP32
    tokens = calibration.nsamples * calibration.seqlen
    batch_tokens = min(calibration.batch_size, calibration.nsamples) * calibration.seqlen
    widest = max(n_in for n_in, _, _ in linears.values())
    on_device = {
        "layer_weights": shape.layer_float_elements() * w,
        "module_working_copy": working,
        "hessians": hessians,
        "calibration_activations": 2 * tokens * shape.hidden * w,
        "layer_forward": batch_tokens * ((3 * shape.intermediate + 4 * shape.hidden) * w + widest * FP32),
    }
    results = shape.layers * sum(
        quantized_linear_bytes(linears[n][0], linears[n][1], quant)
        + rank * (linears[n][0] + linears[n][1]) * FP32
        for n in quant.target_modules
    )
    # the embeddings are dropped once the first layer's inputs exist; at the end every float
    # tensor (embeddings, an untied head, norms) is read again and written with the artifact
    floats = float_tensor_bytes(shape, quant, w)
    on_host = {"runtime": runtime, "packed_results": results}
    details = {"calibration_tokens": tokens}
    stored, window = (
        sensitivity_pass_bytes(shape, calibration, w) if quant.measures_sensitivities(rank) else (0, 0)
    )
    if on_gpu:
        on_host["layer_read"] = on_device["layer_weights"]  # read on the host, then moved
        on_host["float_tensors_at_save"] = max(0, floats - on_host["layer_read"])
        if quant.measures_sensitivities(rank):  # the sensitivity pass: inputs on host, head on device
            host_rest = results + on_host["layer_read"] + on_host["float_tensors_at_save"]
            device_rest = sum(on_device.values())
            on_host["sensitivity_pass"] = max(0, stored + floats + on_host["layer_read"] - host_rest)
            on_device["sensitivity_pass"] = max(0, floats + on_device["layer_weights"] + window - device_rest)
        return MemoryEstimate("quantize", True, on_device, on_host, details)
    layer_phase = sum(on_device.values())
    on_host["float_tensors_at_save"] = max(0, floats - layer_phase)  # the later, larger phase
    if quant.measures_sensitivities(rank):  # the sensitivity pass comes first, before any packed result
        quantization_peak = results + max(layer_phase, floats)
        on_host["sensitivity_pass"] = max(
            0, stored + floats + on_device["layer_weights"] + window - quantization_peak
        )
    return MemoryEstimate("quantize", False, {}, {**on_host, **on_device}, details)


def sensitivity_pass_bytes(shape: ModelShape, calibration: CalibrationConfig, w: int) -> tuple[int, int]:
    """The sensitivity pass (mixed precision, Fisher-weighted compensation): every decoder layer's
    input hidden states of its windows (kept on the host), and one window's forward and backward
    through a float decoder layer: autograd's saved inputs of the norms, the q/k/v/o, gate/up and
    down matmuls, SDPA's outputs and, on CPU, its attention weights, twice (their gradients)."""
    windows = min(calibration.nsamples, max(1, SENSITIVITY_TOKENS // calibration.seqlen))
    stored = shape.layers * windows * calibration.seqlen * shape.hidden * w
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    matmuls = 2 * shape.hidden + 2 * q_width + 2 * kv_width + 4 * shape.intermediate
    per_token = w * (matmuls + shape.heads * calibration.seqlen) + 2 * FP32 * (shape.hidden + 1)
    return stored, 2 * calibration.seqlen * per_token


# --- advice -----------------------------------------------------------------------------------


def alternatives(
    shape: ModelShape,
    quant: QuantConfig,
    adapter: AdapterConfig,
    dtype: str,
    fit: FitSettings,
    module_grids: dict[str, tuple[int, int]] | None = None,
) -> list[dict[str, Any]]:
    """The knobs that lower the fit peak, each alone with its predicted peak, then all together
    (``module_grids``, an artifact's grids, hold unless the knob changes the bits)."""
    options: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []  # knob, change, fit/quant fields
    if fit.batch_size > 1:
        b = fit.batch_size // 2
        change = f"--data.init_args.batch_size {b} (double trainer.accumulate_grad_batches to keep the batch)"
        options.append(("halve the batch", change, {"batch_size": b}, {}))
    if fit.seq_len > 1:
        t = fit.seq_len // 2
        options.append(("shorter sequences", f"--data.init_args.max_seq_length {t}", {"seq_len": t}, {}))
    if not fit.gradient_checkpointing:
        change = "--model.gradient_checkpointing true"
        options.append(("gradient checkpointing", change, {"gradient_checkpointing": True}, {}))
    if quant.budget_bits is not None and quant.budget_bits > 2.6:
        change = "--model.quant.budget_bits 2.5"
        options.append(("a smaller bit budget", change, {}, {"budget_bits": 2.5}))
    elif quant.method != "nf4" and quant.bits is not None and quant.bits > 2:
        options.append(("2-bit weights", "--model.quant.bits 2", {}, {"bits": 2}))
    if "8bit" not in fit.optimizer.lower():
        opt = "bitsandbytes.optim.PagedAdamW8bit"
        change = f"--model.optimizer {opt}" + ("" if fit.on_gpu else " (needs CUDA)")
        options.append(("8-bit optimizer", change, {"optimizer": opt, "optimizer_args": {}}, {}))
    if len(options) > 1:
        fit_all = {k: v for _, _, f, _ in options for k, v in f.items()}
        quant_all = {k: v for _, _, _, q in options for k, v in q.items()}
        options.append(("all of the above", "every change above", fit_all, quant_all))
    result = []
    for knob, change, f, q in options:
        grids = None if q else module_grids
        peak = estimate_fit(shape, replace(quant, **q), adapter, dtype, replace(fit, **f), grids).peak_bytes
        result.append({"knob": knob, "change": change, "peak_bytes": peak})
    return result


# --- reading recipes and configs ---------------------------------------------------------------


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_memory(text: str) -> int:
    """``24GB`` (10^9), ``24GiB`` (2^30), ``512MB``, ``512MiB``, or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in UNITS:
        raise ValueError(f"--device_memory {text!r}: give a size such as 24GB, 24GiB or 512MB")
    return int(float(match.group(1)) * UNITS[unit])


def read_shape(model_cfg: ModelConfig) -> ModelShape:
    """The model's shape from its config only: the recipe's ``config``, or a hub name / local
    directory / GGUF file read by ``AutoConfig`` (never a weight)."""
    from projq_train.models import check_architecture, model_config

    if model_cfg.config is not None:  # before transformers, whose unknown-type error lists every type
        check_architecture(SimpleNamespace(model_type=model_cfg.config["model_type"]))
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings: the one error line below says it all
    try:
        config = model_config(model_cfg)
    except Exception as err:  # hub offline, missing directory, unreadable GGUF, unknown model_type
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        if first.startswith("unsupported architecture"):
            raise ValueError(first) from None
        where = model_cfg.name_or_path or f"model_type {model_cfg.config.get('model_type')!r}"
        where += f" ({model_cfg.gguf_file})" if model_cfg.gguf_file else ""
        hint = " (offline? give a local directory or model.base.config)" if "connect" in first else ""
        raise ValueError(f"cannot read the model config of {where}: {first}{hint}") from None
    finally:
        hub_log.setLevel(level)
    return ModelShape.from_config(config)


def _config_paths(argv: list[str]) -> list[str]:
    paths = []
    for k, arg in enumerate(argv):
        if arg == "--config" and k + 1 < len(argv):
            paths.append(argv[k + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def is_quantize_recipe(argv: list[str]) -> bool:
    """A ``quantize`` recipe has top-level ``quant``/``calibration`` and no ``trainer``/``data``."""
    import yaml

    keys: set[str] = set()
    for path in _config_paths(argv):
        if not Path(path).is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
        loaded = yaml.safe_load(Path(path).read_text())
        keys |= set(loaded) if isinstance(loaded, dict) else set()
    return bool(keys & {"quant", "calibration"}) and not keys & {"trainer", "data"}


def _class_path(value: Any, default: str) -> tuple[str, dict[str, Any]]:
    """Class path and init args of a parsed ``class_path/init_args`` value (or a class)."""
    if value is None:
        return default, {}
    if hasattr(value, "class_path"):
        args = value.init_args.as_dict() if getattr(value, "init_args", None) is not None else {}
        return value.class_path, args
    if isinstance(value, str):
        return value, {}
    return f"{value.__module__}.{getattr(value, '__qualname__', type(value).__name__)}", {}


def _on_gpu(accelerator: Any, gpu_option: str) -> tuple[bool, str]:
    """Whether the run is on a GPU, and how that was decided. ``auto`` is Lightning's choice: CUDA
    when this machine has it."""
    name = str(getattr(accelerator, "class_path", accelerator) or "auto").lower()
    if name == "auto":
        import torch

        on_gpu = torch.cuda.is_available()
        how = "CUDA on this machine" if on_gpu else f"no CUDA here; {gpu_option} estimates a GPU run"
        return on_gpu, f"{'GPU' if on_gpu else 'CPU'} (auto: {how})"
    on_gpu = name in ("gpu", "cuda") or "cuda" in name
    return on_gpu, "GPU" if on_gpu else "CPU"


MODULE_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def module_position(name: str) -> tuple[int, str]:
    """``(3, "q_proj")`` for ``model.layers.3.self_attn.q_proj``."""
    match = MODULE_NAME.search(name)
    return int(match.group(1)), match.group(2)


def artifact_configuration(path: str | Path, shape: ModelShape, quant: QuantConfig, rank: int) -> dict:
    """The bit width, group size and rank of every module as an artifact recorded them (its
    ``metadata.json``; no tensor is read), checked against the recipe: the same model type and
    shape (the artifact's ``config.json``), modules, group size and rank.

    Returns ``{"artifact", "bits", "group_sizes", "ranks", "modules_per_width",
    "storage_bits_per_weight"}``; a uniform artifact (no recorded configuration) gives every module
    its ``quant.bits``, one that recorded no group sizes its ``quant.group_size``."""
    from projq_train.artifact import read_metadata

    meta = read_metadata(path)
    made = meta["recipe"]
    own = read_shape(ModelConfig(name_or_path=str(path)))  # the config.json saved with the artifact
    if own != shape:
        raise ValueError(
            f"{path} was quantized from another model ({own.model_type}, {own.layers} layers, hidden "
            f"{own.hidden}, vocab {own.vocab}) than the recipe's ({shape.model_type}, {shape.layers} "
            f"layers, hidden {shape.hidden}, vocab {shape.vocab})"
        )
    if made["quant"]["group_size"] != quant.group_size or made["adapter"]["rank"] != rank:
        raise ValueError(
            f"{path} was quantized at group size {made['quant']['group_size']} and rank "
            f"{made['adapter']['rank']}; the recipe has {quant.group_size} and {rank}"
        )
    recorded = meta.get("configuration")
    if recorded is None:
        names = [r["name"] for r in meta["report"]]
        recorded = {"bits": dict.fromkeys(names, made["quant"]["bits"]), "ranks": dict.fromkeys(names, rank)}
    expected = {(i, kind) for i in range(shape.layers) for kind in quant.target_modules}
    found = {MODULE_NAME.search(n) for n in recorded["bits"]}
    if None in found or {(int(m.group(1)), m.group(2)) for m in found} != expected:
        raise ValueError(
            f"{path} holds {len(recorded['bits'])} quantized modules that are not this recipe's "
            f"{len(expected)} ({shape.layers} layers x {', '.join(quant.target_modules)})"
        )
    widths = sorted(set(recorded["bits"].values()))
    return {
        "artifact": str(path),
        "bits": recorded["bits"],
        "group_sizes": recorded.get("group_sizes") or dict.fromkeys(recorded["bits"], quant.group_size),
        "ranks": recorded["ranks"],
        "modules_per_width": {b: sum(v == b for v in recorded["bits"].values()) for b in widths},
        "storage_bits_per_weight": meta["storage_bits_per_weight"],
    }


def _world_size(trainer: Any) -> int:
    devices, nodes = trainer.devices, trainer.num_nodes or 1
    if isinstance(devices, list | tuple):
        count = len(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    else:
        try:
            count = int(devices)
        except (TypeError, ValueError):  # "auto", -1: not known from the recipe
            count = 1
    return max(1, count) * nodes


def _estimate_arguments(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--device_memory",
        type=str,
        default=None,
        help="memory of one device (GPU run) or of the host (CPU run), e.g. 24GB, 24GiB, 512MB; "
        "when the fit peak is above it, say which knob to turn",
    )
    parser.add_argument(
        "--artifact",
        type=str,
        default=None,
        help="an artifact folder of this recipe: show the bit width of every module it recorded "
        "(under quant.budget_bits, chosen when quantizing) and count the packed weights at those "
        "widths; reads its metadata.json only",
    )


def parse_fit(argv: list[str]) -> tuple[dict[str, Any], Any]:
    """Parse a fit recipe and overrides as ``projq-train fit`` does, without building anything."""
    from projq_train.lightning_cli import trainer_cli

    parser_kwargs = {"prog": "projq-train estimate", "exit_on_error": False}
    cfg = trainer_cli(
        argv, run=False, build=False, add_arguments=_estimate_arguments, parser_kwargs=parser_kwargs
    ).config
    model = cfg.model
    base, quant = ModelConfig(**model.base.as_dict()), QuantConfig(**model.quant.as_dict())
    adapter = AdapterConfig(**model.adapter.as_dict())
    calibration = CalibrationConfig(**model.calibration.as_dict())
    check_adapter_settings(quant, adapter)
    data = cfg.data.init_args if getattr(cfg.data, "init_args", None) is not None else cfg.data
    missing = [k for k in ("batch_size", "max_seq_length") if getattr(data, k, None) is None]
    if missing:
        missing_args = " and ".join(f"data.init_args.{k}" for k in missing)
        raise ValueError(f"the estimate reads {missing_args}; this data module has none")
    optimizer, optimizer_args = _class_path(model.optimizer, "torch.optim.AdamW")
    strategy = str(getattr(cfg.trainer.strategy, "class_path", cfg.trainer.strategy) or "auto").lower()
    on_gpu, device = _on_gpu(cfg.trainer.accelerator, "--trainer.accelerator gpu")
    fit = FitSettings(
        batch_size=data.batch_size,
        seq_len=data.max_seq_length,
        packing=bool(getattr(data, "packing", False)),
        gradient_checkpointing=bool(model.gradient_checkpointing),
        precision=normalize_precision(cfg.trainer.precision),
        on_gpu=on_gpu,
        optimizer=optimizer,
        optimizer_args=optimizer_args,
        shards=_world_size(cfg.trainer) if "fsdp" in strategy else 1,
    )
    recipe = {"base": base, "quant": quant, "adapter": adapter, "calibration": calibration, "fit": fit}
    recipe["rank"] = adapter.rank
    recipe["device"] = f"trainer.accelerator {device}"
    return recipe, cfg


def parse_quantize(argv: list[str]) -> tuple[dict[str, Any], Any]:
    from projq_train.cli import quantize_parser

    parser = quantize_parser()
    parser.prog = "projq-train estimate"
    parser.exit_on_error = False
    _estimate_arguments(parser)
    cfg = parser.parse_args(argv)
    recipe = {
        "base": ModelConfig(**cfg.model.as_dict()),
        "quant": QuantConfig(**cfg.quant.as_dict()),
        "calibration": CalibrationConfig(**cfg.calibration.as_dict()),
        "rank": cfg.adapter.rank,
    }
    recipe["on_gpu"], device = _on_gpu(cfg.device, "--device cuda")
    recipe["device"] = f"device {device}"
    return recipe, cfg


# --- printing ------------------------------------------------------------------------------------

LABELS = {
    "runtime": "runtime (python and the libraries the command imports)",
    "float_tensors_at_save": "float tensors read again for the artifact (beyond the layer phase)",
    "packed_weights": "packed weights",
    "float_tensors": "float tensors (embeddings, norms, lm_head)",
    "adapters": "adapters (LoRA A, B)",
    "gradients": "adapter gradients",
    "allocator_slack": "freed memory the allocator keeps (CPU)",
    "optimizer_state": "optimizer state",
    "activations": "activations kept for backward",
    "checkpoint_recompute": "one layer recomputed in backward",
    "logits_loss": "logits and loss (chunked)",
    "dequantize_workspace": "dequantize workspace (torch backend)",
    "model_staging": "model built on the host, then moved",
    "layer_weights": "one decoder layer's float weights",
    "module_working_copy": "fp32 working copies of the largest module",
    "hessians": "Hessians and GPTQ/ProjQ (in, in) matrices",
    "calibration_activations": "calibration inputs + outputs of a layer",
    "layer_forward": "one calibration batch through the layer",
    "packed_results": "packed weights + compensation made so far",
    "layer_read": "the layer read before its move to the device",
    "float_model": "the whole float model (nf4 loads it)",
    "sensitivity_pass": "the output-Fisher pass (budget, fisher compensation), above the rest",
}


def fmt_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_estimate(est: dict[str, Any], title: str) -> str:
    """One estimate (:meth:`MemoryEstimate.as_dict`) as a table of components."""
    device, host = est["device"], est["host"]
    names = list(dict.fromkeys([*device, *host]))
    width = max(len(LABELS.get(n, n)) for n in names) + 2
    if est["on_gpu"]:
        lines = [f"{title:<{width}}{'device':>12}{'host':>12}"]
        for n in names:
            dev, on_host = (fmt_bytes(d[n]) if n in d else "-" for d in (device, host))
            lines.append(f"  {LABELS.get(n, n):<{width - 2}}{dev:>12}{on_host:>12}")
        total = f"{fmt_bytes(est['device_bytes']):>12}{fmt_bytes(est['host_bytes']):>12}"
    else:
        lines = [f"{title:<{width}}{'host':>12}"]
        lines += [f"  {LABELS.get(n, n):<{width - 2}}{fmt_bytes(host[n]):>12}" for n in names]
        total = f"{fmt_bytes(est['peak_bytes']):>12}"
    return "\n".join([*lines, f"  {'peak':<{width - 2}}{total}"])


def report(result: dict[str, Any]) -> str:
    """The result of :func:`run` as tables and advice."""
    out = [f"model  {result['model']['description']}", f"quant  {result['quant_summary']}"]
    if "configuration" in result:
        c = result["configuration"]
        counts = ", ".join(f"{n} at {b} bits" for b, n in c["modules_per_width"].items())
        out.append(
            f"widths {counts}; {c['storage_bits_per_weight']:.3f} bits per weight stored "
            f"(recorded in {c['artifact']})"
        )
        ranked = len(set(c["ranks"].values())) > 1  # quant.allocate_ranks
        if ranked:
            ranks = list(c["ranks"].values())
            mean = sum(ranks) / len(ranks)
            out.append(f"ranks  {min(ranks)} to {max(ranks)} per module (rN below), mean {mean:.1f}")
        grouped = len(set(c["group_sizes"].values())) > 1  # group_size_choices
        by_layer: dict[int, list[str]] = {}
        for name, bits in c["bits"].items():
            layer, kind = module_position(name)
            rank = f" r{c['ranks'][name]}" if ranked else ""
            group = f"g{c['group_sizes'][name]}" if grouped else ""
            by_layer.setdefault(layer, []).append(f"{kind.removesuffix('_proj')} {bits}{group}{rank}")
        out += [f"  layer {i:>3}  " + " ".join(by_layer[i]) for i in sorted(by_layer)]
    out.append(f"run    {result['device']}")
    fit, quantize = result.get("fit"), result["quantize"]
    where = " (GPU)" if quantize["on_gpu"] else " (CPU run)"
    if fit is not None:
        d = fit["details"]
        out += [f"fit    {result['fit_summary']}", "", format_estimate(fit, "fit, per process" + where)]
        out.append(
            f"  activations at {d['batch_size']} x {d['seq_len']} tokens: "
            f"{fmt_bytes(d['activations_with_checkpointing'])} with gradient checkpointing, "
            f"{fmt_bytes(d['activations_without_checkpointing'])} without; the recipe has it "
            f"{'on' if d['gradient_checkpointing'] else 'off'}"
        )
    title = "quantize at fit setup (no cached artifact)" if fit is not None else "quantize, per process"
    out += ["", format_estimate(quantize, title + where)]
    if "device_memory" in result:
        budget = f"{result['device_memory_text']} ({fmt_bytes(result['device_memory'])}) of " + (
            "device memory" if quantize["on_gpu"] else "host memory"
        )
        runs = [("quantize", quantize, result["quantize_fits"])]
        runs += [("fit", fit, result["fits"])] if fit is not None else []
        out.append("")
        for name, est, fits in runs:
            verdict = "fits in" if fits else "does not fit in"
            out.append(f"{name}: peak {fmt_bytes(est['peak_bytes'])} {verdict} {budget}")
        if result.get("advice"):
            out.append("knobs that lower the fit peak, each alone, then all together:")
            for alt in result["advice"]:
                verdict = "fits" if alt["fits"] else "does not fit"
                peak = fmt_bytes(alt["peak_bytes"])
                out.append(f"  {alt['knob']:<24}{peak:>12}  {verdict:<13} {alt['change']}")
    return "\n".join(out)


def run(argv: list[str]) -> tuple[dict[str, Any], bool]:
    """Parse the recipe and overrides, read the model config and estimate: the JSON-ready result
    and whether ``--json`` was asked for."""
    quantize_only = is_quantize_recipe(argv)
    recipe, cfg = parse_quantize(argv) if quantize_only else parse_fit(argv)
    base, quant = recipe["base"], recipe["quant"]
    shape = read_shape(base)
    packed_weight_bytes(shape, quant)  # a group size that does not divide a layer fails here
    configuration = (
        artifact_configuration(cfg.artifact, shape, quant, recipe["rank"]) if cfg.artifact else None
    )
    module_grids = (
        {n: (b, configuration["group_sizes"][n]) for n, b in configuration["bits"].items()}
        if configuration
        else None
    )
    result: dict[str, Any] = {
        "recipe": "quantize" if quantize_only else "fit",
        "model": {
            **dataclasses.asdict(shape),
            "parameters": shape.parameters(),
            "description": shape.describe(),
        },
        "quant_summary": (
            f"{quant.method} {bit_widths(quant)}, group {quant.group_size}, rank {recipe['rank']} on "
            f"{', '.join(quant.target_modules)}"
        ),
        "device": recipe["device"],
    }
    if configuration:
        result["configuration"] = configuration
    on_gpu = recipe["on_gpu"] if quantize_only else recipe["fit"].on_gpu
    if not quantize_only:
        fit = recipe["fit"]
        result["fit"] = estimate_fit(shape, quant, recipe["adapter"], base.dtype, fit, module_grids).as_dict()
        result["fit_summary"] = (
            f"precision {fit.precision}, batch {fit.batch_size} x "
            f"{fit.seq_len} tokens ({'packed' if fit.packing else 'padded: attention mask'}), gradient "
            f"checkpointing {'on' if fit.gradient_checkpointing else 'off'}, adapter dropout "
            f"{recipe['adapter'].dropout}, optimizer {fit.optimizer}"
            + (f", sharded over {fit.shards}" if fit.shards > 1 else "")
        )
    runtime = QUANTIZE_RUNTIME_BYTES if quantize_only else RUNTIME_BASELINE_BYTES
    result["quantize"] = estimate_quantize(
        shape, quant, recipe["rank"], recipe["calibration"], base.dtype, on_gpu, runtime
    ).as_dict()
    if cfg.device_memory is not None:
        budget = parse_memory(cfg.device_memory)
        result["device_memory"], result["device_memory_text"] = budget, cfg.device_memory
        result["quantize_fits"] = result["quantize"]["peak_bytes"] <= budget
        if not quantize_only:
            result["fits"] = result["fit"]["peak_bytes"] <= budget
            if not result["fits"]:
                advice = alternatives(
                    shape, quant, recipe["adapter"], base.dtype, recipe["fit"], module_grids
                )
                result["advice"] = [{**a, "fits": a["peak_bytes"] <= budget} for a in advice]
    return result, bool(cfg.json)


def main(argv: list[str]) -> None:
    """``projq-train estimate --config recipe.yaml [overrides] [--json] [--device_memory 24GB]``.
    Bad input ends in one ``error:`` line on stderr (exit code 2); not fitting is advice (exit 0)."""
    try:
        result, as_json = run(argv)
    except (ValueError, FileNotFoundError, argparse.ArgumentError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result, indent=2) if as_json else report(result))
