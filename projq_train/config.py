"""Typed configuration: every recipe section is one of these dataclasses, checked on creation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SUPPORTED_BITS = (2, 3, 4)  # bit widths of the packed weights (projq_train.quant.pack)
SUPPORTED_SCALE_BITS = (8, 16)  # bits of a packed weight's group scale (projq_train.quant.rtn)
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# settings renamed since the first release (keys under ``model.`` in fit recipes): an old name is
# refused with a pointer to the new one (:func:`renamed_setting_hint`)
RENAMED_KEYS = {"quant.alpha": "quant.projection_strength", "quant.rank": "adapter.rank"}
RENAMED_VALUES = {"adapter.init": {"projq": "compensation"}}


def renamed_setting_hint(key: str, value: Any = None) -> str | None:
    """``'quant.alpha is now quant.projection_strength'`` for a renamed ``key`` (with or without
    the ``model.`` prefix), the same for a renamed ``value`` of ``key``; None for a current one."""
    short = key.removeprefix("model.")
    prefix = key[: len(key) - len(short)]
    if short in RENAMED_KEYS:
        return f"{key} is now {prefix}{RENAMED_KEYS[short]}"
    new_value = RENAMED_VALUES.get(short, {}).get(str(value))
    return None if new_value is None else f"{key}: {value} is now {new_value}"


def renamed_settings(model: dict[str, Any]) -> list[str]:
    """:func:`renamed_setting_hint` of every setting in a ``model`` section (nested dicts)."""
    return [
        hint
        for section, values in model.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if (hint := renamed_setting_hint(f"{section}.{key}", value))
    ]


@dataclass
class ModelConfig:
    """Which base model to load."""

    name_or_path: str | None = None
    """Hugging Face hub name or local directory of the base model."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside ``name_or_path`` (needs ``pip install gguf``)."""
    config: dict[str, Any] | None = None
    """Build a randomly initialized model from this config instead (``model_type`` plus
    ``transformers`` config fields); used for tiny test and demo models."""
    seed: int = 0
    """Seed of the random initialization when ``config`` is given."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model weights are loaded in."""

    def __post_init__(self):
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError(
                "model: give exactly one of `name_or_path` (pretrained) or `config` (random init)"
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a `model_type` (llama, qwen2, qwen3 or mistral)")


@dataclass
class QuantConfig:
    """How the linear layers are quantized and how the adapter is initialized."""

    method: Literal["rtn", "gptq", "projq", "nf4"] = "projq"
    """``rtn`` round-to-nearest, ``gptq``, or ``projq`` (GPTQ with the error pushed into the
    adapter's subspace); ``nf4`` is the QLoRA baseline (bitsandbytes 4-bit NormalFloat, no
    calibration, ``fit`` only)."""
    bits: int | None = None
    """Bits per weight: 2, 3 or 4 (3 when neither this nor ``budget_bits`` is set)."""
    budget_bits: float | None = None
    """Mixed precision instead of ``bits``: the average stored bits per quantized weight, scales
    and zeros included (uniform 3 bits at group 64 store about 3.3). Each module gets 2, 3 or 4
    bits, chosen from its compensated error at each width weighted by how much the loss cares
    about each of its outputs (the output Fisher on the calibration text); the choice is
    recorded in the artifact and shown in the quantization report."""
    allocate_ranks: bool = False
    """Spread the adapter's parameters over the modules by need instead of one ``adapter.rank``
    everywhere: each module gets a rank from a quarter of ``adapter.rank`` to twice it (in
    quarters), with at most as many adapter parameters in all as ``adapter.rank`` everywhere,
    chosen from the loss the compensation of each rank would leave (the output-Fisher-weighted
    error, as ``budget_bits`` weighs). Adds a first pass, as ``budget_bits`` does (they share it);
    the ranks are recorded in the artifact and shown in the quantization report."""
    group_size: int = 128
    """Input columns sharing one scale/zero point; -1 for one group per output row. Under
    ``budget_bits`` also the group size of the uniform widths the report compares with."""
    group_size_choices: list[int] | None = None
    """Under ``budget_bits``: the group sizes (-1: one group per row) each module's grid may take,
    chosen with its width (2, 3 or 4 bits at each of these) by the same measured error per stored
    bit; smaller groups cost more scale and zero storage. ``null``: ``group_size`` only. The first
    pass then quantizes every module at each of them."""
    iters: int = 5
    """ProjQ projection rounds after the initial GPTQ."""
    first_pass_iters: int | None = None
    """ProjQ rounds of the quantizations the first pass of ``budget_bits`` or ``allocate_ranks``
    measures each module's error with (it quantizes each module once per width and group size,
    then the second pass once at the chosen grid with ``iters``). ``null``: ``iters``; fewer make
    the first pass cheaper and the allocation judge every grid by a less refined error (0: by
    plain GPTQ's)."""
    tol: float = 1e-3
    """ProjQ early stop: relative tail improvement (and subspace movement) below this stops."""
    projection_strength: float = 1.0
    """ProjQ: how far the Hessian is projected onto the complement of the error's top-r subspace
    (1.0 is the paper's algorithm; 0.0 is plain GPTQ in ``paper`` mode, and ``refresh`` against
    the plain Hessian)."""
    mode: Literal["paper", "refresh", "srr"] = "paper"
    """ProjQ loop: ``paper`` re-runs GPTQ against the projected Hessian; ``refresh`` quantizes
    ``W − L`` against the projected Hessian, with ``L`` the current best rank-r compensation,
    starting from the top-r part of W;
    ``srr`` (SRR's rank split) keeps the top-k H-weighted part of W out of the grid, k per layer
    by SRR's criterion (shown in the report), and runs the paper loop on the rest at rank r − k.
    ``refresh`` and ``srr`` put part of W in the adapter: they need ``adapter.init: compensation``."""
    compensation: Literal["hessian", "fisher"] = "hessian"
    """The norm the rank-r compensation (the adapter's initialization) is best in: ``hessian``,
    the error of the module's output on the calibration text (GUIDE §2); ``fisher``, that error
    with each output channel weighted by how much the loss cares about it (the output Fisher on
    the calibration text, half of it spread evenly: see ``compensation_row_weights``). ``fisher``
    adds one forward and backward pass of the float model before quantizing (as ``budget_bits``
    does; they share it)."""
    scale_bits: int = 16
    """Bits of each group's scale: 16 (fp16, the GPTQ format) or 8 (an 8-bit e4m3 float times a
    power of two per module, as NVFP4 stores its block scales): uniform 3 bits at group 64 then
    store 3.17 bits per weight instead of 3.30, and ``budget_bits`` counts scales at 8 bits. The
    quantized export re-quantizes with fp16 scales (what GPTQ loaders read)."""
    rotate_inputs: bool = False
    """Quantize each module's weight in a rotated basis of its inputs, ``W Q`` for a fixed
    orthogonal ``Q`` that spreads every input channel over all of them (QuIP#'s incoherence
    processing; :mod:`projq_train.quant.rotation`): flatter rows, smaller grid steps. The packed
    layer rotates its input on the fly (``in · (a + b)`` multiply-adds per token for ``in = a · b``);
    the adapter, the merged and the peft exports stay in the model's own basis; the quantized
    export re-quantizes without the rotation (what GPTQ loaders read)."""
    clip: bool = False
    """GPTQ/ProjQ: pick each group's range by an activation-weighted MSE search over shrunk
    min-max ranges instead of plain min-max."""
    damp: float = 0.01
    """GPTQ dampening, as a fraction of the mean Hessian diagonal (raised automatically if needed)."""
    act_order: bool = False
    """GPTQ: quantize columns in order of decreasing activation energy."""
    block_size: int = 128
    """GPTQ lazy-update block size."""
    true_sequential: bool = True
    """Inside a decoder layer, quantize q/k/v, then o, then gate/up, then down, each with inputs
    from the already-quantized modules before it."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linear modules (by attribute name) to quantize."""

    @property
    def allocates(self) -> bool:
        """Whether quantizing starts with a first pass that chooses each module's configuration
        (``budget_bits``: its grid; ``allocate_ranks``: its rank)."""
        return self.budget_bits is not None or self.allocate_ranks

    def measures_sensitivities(self, rank: int) -> bool:
        """Whether quantizing for adapters of rank ``rank`` starts with the output-Fisher pass:
        ``budget_bits`` and ``allocate_ranks`` allocate by it, ``compensation: fisher`` weighs a
        compensation by it."""
        return self.allocates or (self.compensation == "fisher" and rank > 0)

    @property
    def budget_group_sizes(self) -> list[int]:
        """The group sizes a budget chooses from (``group_size_choices``, else ``group_size``)."""
        return self.group_size_choices or [self.group_size]

    def __post_init__(self):
        if self.budget_bits is not None and self.bits is not None:
            raise ValueError(
                f"quant.budget_bits replaces quant.bits: give one of them (got bits {self.bits} and "
                f"budget_bits {self.budget_bits}; set bits: null to use the budget)"
            )
        if self.budget_bits is None and self.bits is None:
            self.bits = 3
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise ValueError(f"quant.bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.scale_bits not in SUPPORTED_SCALE_BITS:
            raise ValueError(f"quant.scale_bits must be one of {SUPPORTED_SCALE_BITS}, got {self.scale_bits}")
        if self.scale_bits != 16 and self.method == "nf4":
            raise ValueError(
                "quant.scale_bits sets the grid of rtn/gptq/projq; nf4 keeps bitsandbytes' own scales"
            )
        if self.rotate_inputs and self.method == "nf4":
            raise ValueError("quant.rotate_inputs sets the grid of rtn/gptq/projq; nf4 quantizes W as it is")
        if self.budget_bits is not None and self.method == "nf4":
            raise ValueError(
                "quant.method nf4 is a uniform 4-bit format; quant.budget_bits needs rtn/gptq/projq"
            )
        if self.allocate_ranks and self.method == "nf4":
            raise ValueError("quant.allocate_ranks needs a compensation to allocate by: use rtn/gptq/projq")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"quant.group_size must be positive or -1, got {self.group_size}")
        if self.group_size_choices is not None:
            if self.budget_bits is None:
                raise ValueError(
                    "quant.group_size_choices are chosen from under quant.budget_bits; without a budget "
                    "set quant.group_size instead"
                )
            sizes = self.group_size_choices
            if not sizes or any(g != -1 and g <= 0 for g in sizes) or len(set(sizes)) < len(sizes):
                raise ValueError(
                    f"quant.group_size_choices must be distinct group sizes, each positive or -1, got {sizes}"
                )
        if self.iters < 0:
            raise ValueError(f"quant.iters must be >= 0, got {self.iters}")
        if self.first_pass_iters is not None:
            if not self.allocates:
                raise ValueError(
                    "quant.first_pass_iters sets the rounds of the first pass of quant.budget_bits or "
                    "quant.allocate_ranks; without either there is no first pass"
                )
            if self.method != "projq":
                raise ValueError(
                    f"quant.first_pass_iters counts ProjQ rounds; quant.method {self.method} has none"
                )
            if self.first_pass_iters < 0:
                raise ValueError(f"quant.first_pass_iters must be >= 0, got {self.first_pass_iters}")
        if not 0.0 <= self.projection_strength <= 1.0:
            raise ValueError(f"quant.projection_strength must be in [0, 1], got {self.projection_strength}")
        if self.compensation not in ("hessian", "fisher"):
            raise ValueError(f"quant.compensation must be 'hessian' or 'fisher', got {self.compensation!r}")
        if self.compensation == "fisher" and self.method == "nf4":
            raise ValueError(
                "quant.compensation fisher weights a compensation nf4 does not have: use rtn/gptq/projq"
            )
        if self.method == "nf4" and self.bits != 4:
            raise ValueError(f"quant.method nf4 is a 4-bit format; set quant.bits: 4 (got {self.bits})")
        unknown = sorted(set(self.target_modules) - set(DEFAULT_TARGETS))
        if unknown or not self.target_modules:
            raise ValueError(
                f"quant.target_modules must be a non-empty subset of {DEFAULT_TARGETS}, got {unknown}"
            )


@dataclass
class CalibrationConfig:
    """Text the quantizer sees to estimate each layer's input statistics."""

    dataset: str = "builtin:sample"
    """Hub dataset name, a local .json/.jsonl/.parquet/.txt file, or ``builtin:sample`` (a short
    text shipped with the package, for tiny demo models)."""
    split: str = "train"
    """Split to read from a hub dataset."""
    template: Literal["auto", "alpaca", "plain"] = "auto"
    """How rows become text: ``alpaca`` renders instruction/input/output rows through the Alpaca
    prompt; ``plain`` reads a ``text`` field; ``auto`` picks by the fields present."""
    nsamples: int = 128
    """Number of token windows."""
    seqlen: int = 512
    """Tokens per window."""
    seed: int = 0
    """Seed of the window sampling."""
    batch_size: int = 8
    """Windows per forward pass during calibration."""

    def __post_init__(self):
        if self.nsamples <= 0 or self.seqlen <= 0 or self.batch_size <= 0:
            raise ValueError("calibration.nsamples, seqlen and batch_size must be positive")


@dataclass
class AdapterConfig:
    """The LoRA adapters trained on top of the frozen quantized base, on the modules in
    ``quant.target_modules``."""

    rank: int = 32
    """LoRA rank. The quantizer shapes its error for, and computes its compensation at, this rank,
    so it is part of the quantization artifact too; ``quantize`` with 0 makes no compensation."""
    init: Literal["compensation", "standard"] = "compensation"
    """``compensation``: start from the quantizer's low-rank compensation of ``W − Q`` (every
    ``quant.method`` but nf4 computes one), so step 0 computes ``Q + BA``; ``standard``: peft's
    QLoRA init (``B = 0``), step 0 computes ``Q``."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is ``alpha / rank · B A``."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training. 0 by default: an adapter initialized from
    the compensation carries part of the model (``BA``; with ``refresh`` and ``srr`` also W's top
    directions), and dropping its input perturbs that part at every step; the fine-tuned model
    drifts much further from its step 0 with dropout than without (README, "Adapter dropout").
    Dropout also keeps a mask and a dropped copy of each adapted module's input for the backward."""

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"adapter.rank must be >= 0, got {self.rank}")
        if self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"adapter.alpha must be > 0 and dropout in [0, 1), got {self.alpha}, {self.dropout}"
            )


def check_adapter_settings(quant: QuantConfig, adapter: AdapterConfig) -> None:
    """Combinations of quantization and adapter settings that cannot work."""
    if adapter.rank == 0:
        raise ValueError("adapter.rank must be > 0 to fine-tune")
    if adapter.init == "compensation" and quant.method == "nf4":
        raise ValueError(
            "adapter.init compensation needs a compensation from rtn/gptq/projq; use `standard` with nf4"
        )
    if adapter.init == "standard" and quant.method == "projq" and quant.mode in ("refresh", "srr"):
        raise ValueError(
            f"quant.mode {quant.mode} moves the weight's dominant part into the adapter, so Q alone is "
            "far from W; it needs adapter.init compensation (or use quant.mode paper for a standard-init "
            "comparison)"
        )


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio · lr`` at the last step."""

    warmup_steps: int = 10
    """Optimizer steps of linear warmup from 0."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""

    def __post_init__(self):
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("schedule.warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
