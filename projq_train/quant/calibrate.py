"""Layer-by-layer quantization of a Hugging Face decoder model.

The driver captures the inputs of the first decoder layer, then for each layer in turn:
reads its weights from a :class:`~projq_train.weights.WeightSource` when the model is a
skeleton on the meta device (and drops them when done, so at most one decoder layer's float
weights exist at a time), moves it to the compute device, accumulates ``H = XᵀX / N`` for
its linear modules with forward hooks, quantizes them (and computes the low-rank
compensation), writes the step-0 weights ``Q + BA`` back, runs the layer to produce the next
layer's inputs, and moves it back. Only one decoder layer is on the device at a time.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from projq_train.config import SUPPORTED_BITS, QuantConfig
from projq_train.host_memory import release_freed_memory
from projq_train.models import decoder_layers
from projq_train.quant import lowrank_compensation, quantize_weight
from projq_train.quant.allocate import (
    BitConfiguration,
    Grid,
    allocate_bits,
    allocate_ranks,
    check_budget,
    grid_choices,
    rank_choices,
    uniform_storage,
)
from projq_train.quant.layerwise import StopForward, capture_layer_inputs, release_batch, run_layer
from projq_train.quant.pack import PackedWeight
from projq_train.quant.projq import check_rank, hessian_factor, srr_preserved_rank
from projq_train.quant.rotation import rotate, rotate_factors, rotate_hessian, unrotate
from projq_train.quant.rtn import check_grid
from projq_train.quant.sensitivity import (
    compensation_row_weights,
    output_sensitivities,
    weighted_error,
    weighted_tails,
)
from projq_train.weights import (
    WeightSource,
    load_to_device,
    materialize,
    release_weights,
    unload_from_device,
)

log = logging.getLogger(__name__)

# Inside a decoder layer, modules in one group share their input; later groups read
# outputs of earlier ones.
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@dataclass
class QuantizedModule:
    """What the quantizer produced for one linear module."""

    weight: PackedWeight
    lora_B: Tensor  # (out, r)
    lora_A: Tensor  # (r, in)
    preserved_rank: int | None = None  # srr: the k top directions of W kept out of the grid

    def step0_weight(self) -> Tensor:
        """``Q + B A``: the weight the adapted model computes with before training."""
        return self.weight.dequantize() + self.lora_B @ self.lora_A


@dataclass
class ModuleReport:
    """Errors in the H-norm relative to ``‖W‖_H²`` (so 0.01 means 1% of the layer's output energy)."""

    name: str
    shape: tuple[int, int]
    err_quant: float  # ‖W − Q‖_H² / ‖W‖_H²
    err_compensated: float  # ‖W − Q − BA‖_H² / ‖W‖_H²
    tail_fraction: float  # share of the quantization error the adapter cannot remove
    seconds: float
    preserved_rank: int | None = None  # srr: k of the rank r holds W's top part, r − k the error
    bits: int | None = None  # the module's bit width
    err_by_bits: dict[int, float] | None = None  # mixed precision: err Q+BA measured at each width
    loss_by_bits: dict[int, float] | None = None  # and Σ_j F_j (E H Eᵀ)_jj, what the allocation weighs
    phase_seconds: dict[str, float] | None = None  # of `seconds` and the layer's forwards, by phase
    loss_by_rank: dict[int, dict[int, float]] | None = None  # allocate_ranks: width → rank → that loss
    rank: int | None = None  # the module's adapter rank
    group_size: int | None = None  # the module's group size (its input width for one group per row)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has finished its queued work (CUDA runs
    asynchronously: without the wait, a phase's kernels would be timed in whichever phase next
    reads a result back)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _hnorm(E: Tensor, H: Tensor) -> float:
    return torch.einsum("oi,ij,oj->", E, H, E).item()


def target_linears(layer: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    return {n.rsplit(".", 1)[-1]: m for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] in targets}


def check_model_settings(model: nn.Module, cfg: QuantConfig, rank: int) -> None:
    """Fail before any calibration if a module cannot be quantized with these settings and
    compensated at ``rank``."""
    widths = SUPPORTED_BITS if cfg.budget_bits is not None else (cfg.bits,)
    group_sizes = {cfg.group_size, *cfg.budget_group_sizes}
    for li, layer in enumerate(decoder_layers(model)):
        found = target_linears(layer, cfg.target_modules)
        if not found:
            raise ValueError(f"decoder layer {li} has none of the target modules {cfg.target_modules}")
        for name, mod in found.items():
            try:
                for width, group_size in itertools.product(widths, group_sizes):
                    check_grid(width, group_size, mod.in_features)
                check_rank(rank, mod.out_features, mod.in_features)
            except ValueError as e:
                raise ValueError(f"layer {li} {name}: {e}") from None
    if cfg.budget_bits is not None:
        shapes = target_shapes(model, cfg.target_modules)
        check_budget(cfg.budget_bits, shapes, cfg.budget_group_sizes, cfg.scale_bits)
    if cfg.allocate_ranks and rank == 0:
        raise ValueError("quant.allocate_ranks spreads the parameters of adapter.rank: it needs a rank > 0")


def target_shapes(model: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every module to quantize, by full module name."""
    names = {id(m): n for n, m in model.named_modules()}
    return {
        names[id(mod)]: (mod.out_features, mod.in_features)
        for layer in decoder_layers(model)
        for mod in target_linears(layer, targets).values()
    }


@torch.no_grad()
def accumulate_hessians(
    layer: nn.Module, modules: dict[str, nn.Linear], inputs: list[Tensor], kwargs: list[dict]
) -> dict[str, Tensor]:
    """``H = XᵀX / N`` (in, in) fp32 of each module's inputs over all batches; each forward stops
    as soon as every module of ``modules`` has seen its input. Modules that read the same input
    tensor (q/k/v, gate/up) get one shared ``H``, accumulated once."""
    H = {n: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for n, m in modules.items()}
    count = dict.fromkeys(modules, 0)
    seen: set[str] = set()
    shares: dict[str, str] = {}  # module -> the module whose H it reuses
    readers: dict[int, tuple[Tensor, str]] = {}  # this batch: id(input) -> (input, kept alive; first reader)

    def hook(name):
        def fn(mod, args, _out):
            seen.add(name)
            first = readers.setdefault(id(args[0]), (args[0], name))[1]
            if first != name:
                shares[name] = first
            else:
                x = args[0].reshape(-1, mod.in_features).float()  # (tokens, in)
                H[name] += x.T @ x
                count[name] += x.shape[0]
            if len(seen) == len(modules):
                raise StopForward

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        for h, kw in zip(inputs, kwargs, strict=True):
            seen.clear()
            readers.clear()
            try:
                layer(h, **kw)
            except StopForward:
                pass
            readers.clear()
            release_batch(h)
    finally:
        for hd in handles:
            hd.remove()
    own = {n: H[n] / max(count[n], 1) for n in modules if n not in shares}
    return {n: own[shares.get(n, n)] for n in modules}


def _method_options(cfg: QuantConfig, factors: tuple[Tensor, Tensor] | None) -> dict:
    if cfg.method == "rtn":
        return {"scale_bits": cfg.scale_bits}
    opts = {
        "block_size": cfg.block_size,
        "damp": cfg.damp,
        "act_order": cfg.act_order,
        "clip": cfg.clip,
        "scale_bits": cfg.scale_bits,
    }
    if cfg.method == "projq":
        opts.update(tol=cfg.tol, alpha=cfg.projection_strength, mode=cfg.mode, factors=factors)
    return opts


def quantize_module(
    W: Tensor,
    H: Tensor,
    cfg: QuantConfig,
    rank: int,
    bits: int,
    group_size: int,
    factors: tuple[Tensor, Tensor] | None = None,
    timings: dict[str, float] | None = None,
    row_weights: Tensor | None = None,
) -> QuantizedModule:
    """Quantize one weight ``W (out, in)`` to ``bits`` in groups of ``group_size`` with its
    Hessian and compute the rank-``rank`` compensation; ``factors``: ``hessian_factor(H)`` if the
    caller has it; ``timings``: seconds of ``quantization`` and ``compensation`` are added to it;
    ``row_weights``: the compensation's output-channel weights (``quant.compensation: fisher``).
    Under ``cfg.rotate_inputs`` the grid is fitted to ``W Q`` against ``Qᵀ H Q``
    (:mod:`~projq_train.quant.rotation`); the compensation and the returned adapter are in
    ``W``'s basis either way."""
    timings = timings if timings is not None else {}
    t0 = clock(W.device)
    W = W.float()
    rotated = cfg.rotate_inputs
    W_grid, H_grid = (rotate(W), rotate_hessian(H)) if rotated else (W, H)
    if rank == 0:  # no adapter: nothing to shape the error for or to compensate
        qw = quantize_weight(W_grid, H_grid, cfg.method, bits, group_size, 0, 0, **_method_options(cfg, None))
        return QuantizedModule(
            PackedWeight.from_quantized(qw, rotated), W.new_zeros(W.shape[0], 0), W.new_zeros(0, W.shape[1])
        )
    factors = factors if factors is not None else hessian_factor(H)  # for ProjQ and the compensation
    grid_factors = rotate_factors(factors) if rotated else factors
    opts = _method_options(cfg, grid_factors)
    if opts.get("mode") == "srr":
        opts["preserved_rank"] = srr_preserved_rank(
            W_grid, H_grid, rank, bits, group_size, cfg.damp, grid_factors
        )
    qw = quantize_weight(W_grid, H_grid, cfg.method, bits, group_size, rank, cfg.iters, **opts)
    t1 = clock(W.device)
    W_hat = unrotate(qw.dequantize()) if rotated else qw.dequantize()
    B, A = lowrank_compensation(W - W_hat, H, rank, factors, row_weights)
    timings["quantization"] = timings.get("quantization", 0.0) + t1 - t0
    timings["compensation"] = timings.get("compensation", 0.0) + clock(W.device) - t1
    return QuantizedModule(PackedWeight.from_quantized(qw, rotated), B, A, opts.get("preserved_rank"))


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    ids: Tensor,
    cfg: QuantConfig,
    rank: int,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    source: WeightSource | None = None,
    grids: dict[str, Grid] | None = None,
    measure_bits: tuple[int, ...] = (),
    sensitivities: dict[str, Tensor] | None = None,
    ranks: dict[str, int] | None = None,
    measure_ranks: tuple[int, ...] = (),
) -> tuple[dict[str, QuantizedModule], list[ModuleReport]]:
    """Quantize every target linear of ``model`` (on CPU) in place, calibrating on ``ids (n, seqlen)``,
    for adapters of rank ``rank`` (0: no compensation), at ``cfg.bits`` in groups of
    ``cfg.group_size`` or on ``grids[module name]`` (bits, group size), of rank
    ``ranks[module name]`` when given. Under ``cfg.budget_bits`` (and no ``grids``) or
    ``cfg.allocate_ranks`` (and no ``ranks``) a first pass chooses the configuration
    (:func:`allocate_configuration`: a sensitivity pass, then four quantizations per module in
    all under a budget, three more per extra group size of ``cfg.group_size_choices``, two at
    uniform bits) and each report row keeps the errors it measured
    (``err_by_bits``, ``loss_by_bits``, ``loss_by_rank``).
    With ``measure_bits``, each module is also quantized at those widths (from the same inputs)
    and its compensated error at each reported, and its weighted error ``Σ_j F_j (E H Eᵀ)_jj``;
    with ``measure_ranks`` too, the weighted error the best correction of each of those ranks
    would leave of each width's ``W − Q`` (:func:`~projq_train.quant.sensitivity.weighted_tails`).
    ``sensitivities``: module name → output Fisher ``F`` (:mod:`~projq_train.quant.sensitivity`),
    which weighs those errors and, under ``cfg.compensation: fisher``, the compensation; measured
    here first (one forward and backward pass, a phase of the report) when the budget or the
    compensation needs it and none is given.

    After this the model's target weights hold ``Q + BA`` (the adapted model at step 0), and
    the next layer was calibrated on those outputs. With ``source``, ``model`` may be a skeleton
    on the meta device: the embeddings and final norm are read to compute the first layer's
    inputs and dropped, each decoder layer is read when its turn comes and goes back to meta once
    its outputs are computed; the model is left on the meta device. Returns the quantized modules,
    on CPU and keyed by their full module name, and one report row per module.
    """
    check_model_settings(model, cfg, rank)
    if ids.numel() == 0:
        raise ValueError("the calibration set is empty: no token windows to calibrate on")
    device = torch.device(device)
    first_pass, sensitivity_seconds = None, None
    allocating = (cfg.budget_bits is not None and grids is None) or (cfg.allocate_ranks and ranks is None)
    fisher = cfg.compensation == "fisher" and rank > 0
    if sensitivities is None and (allocating or fisher):
        t_sensitivity = clock(device)
        names = list(target_shapes(model, cfg.target_modules))
        sensitivities = output_sensitivities(model, ids, names, device, source)
        sensitivity_seconds = clock(device) - t_sensitivity
    if allocating:
        configuration, first_pass = allocate_configuration(
            model, ids, cfg, rank, device, batch_size, progress, source, sensitivities
        )
        if cfg.budget_bits is not None:
            grids = {n: (b, configuration.group_sizes[n]) for n, b in configuration.bits.items()}
        ranks = configuration.ranks if cfg.allocate_ranks else ranks
    layer_names = {id(m): n for n, m in model.named_modules()}
    dtype = model.model.embed_tokens.weight.dtype
    others = [m for name, m in model.model.named_children() if name != "layers"]
    if source is not None:
        for m in others:
            materialize(m, f"{layer_names[id(m)]}.", source, dtype)
    inputs, kwargs = capture_layer_inputs(model, ids, device, batch_size)
    if source is not None:  # the embeddings served their purpose: the layers run on `inputs`
        for m in others:
            release_weights(m)
    groups = SEQUENTIAL_GROUPS if cfg.true_sequential else (sum(SEQUENTIAL_GROUPS, ()),)
    result: dict[str, QuantizedModule] = {}
    reports: list[ModuleReport] = []
    if measure_bits:  # the first pass of an allocation
        label = f"{cfg.method} first pass, measuring {'/'.join(map(str, measure_bits))} bits"
    else:
        label = f"{cfg.method} w{cfg.bits}" if grids is None else f"{cfg.method} mixed bits"
    bar = tqdm(decoder_layers(model), desc=label, disable=not progress)
    for layer in bar:
        load_to_device(layer, f"{layer_names[id(layer)]}.", source, dtype, device)
        linears = target_linears(layer, cfg.target_modules)
        layer_reports = []
        for group in groups:
            members = {n: linears[n] for n in group if n in linears}
            if not members:
                continue
            t_group = clock(device)
            hessians = accumulate_hessians(layer, members, inputs, kwargs)
            forwards = (clock(device) - t_group) / len(members)  # the group's forwards, shared
            # hessian_factor per distinct H (q/k/v share one)
            factor_of: dict[int, tuple[Tensor, Tensor]] = {}
            for short, mod in members.items():
                t0 = clock(device)
                W, H, name = mod.weight.float(), hessians[short], layer_names[id(mod)]
                width, group_size = (cfg.bits, cfg.group_size) if grids is None else grids[name]
                module_rank = rank if ranks is None else ranks[name]
                wn = _hnorm(W, H)
                phases = {"calibration forwards": forwards, "Hessian factors": 0.0}
                if module_rank > 0 and id(H) not in factor_of:
                    factor_of[id(H)] = hessian_factor(H)
                    phases["Hessian factors"] = clock(device) - t0
                factor = factor_of.get(id(H))
                row_weights = compensation_row_weights(sensitivities[name]) if fisher else None
                measured = {
                    b: quantize_module(W, H, cfg, module_rank, b, group_size, factor, phases, row_weights)
                    for b in measure_bits
                }
                if width not in measured:
                    measured[width] = quantize_module(
                        W, H, cfg, module_rank, width, group_size, factor, phases, row_weights
                    )
                qm = measured[width]
                loss_by_rank = {
                    b: weighted_tails(
                        W - measured[b].weight.dequantize(), factor[0], sensitivities[name], measure_ranks
                    )
                    for b in measure_bits
                    if measure_ranks
                }
                step0 = qm.step0_weight()
                err_q, err_c = _hnorm(W - qm.weight.dequantize(), H) / wn, _hnorm(W - step0, H) / wn
                errors = {b: W - measured[b].step0_weight() for b in measure_bits}
                err_by_bits = {b: _hnorm(E, H) / wn for b, E in errors.items()}
                loss_by_bits = (
                    {b: weighted_error(E, H, sensitivities[name]) for b, E in errors.items()}
                    if sensitivities is not None
                    else {}
                )
                del measured, errors
                seconds = clock(device) - t0
                phases["errors and packing"] = seconds - sum(phases.values()) + forwards
                if sensitivity_seconds is not None:  # the pass before the layers, shared by all modules
                    phases["sensitivity pass"] = sensitivity_seconds / len(sensitivities)
                reports.append(
                    ModuleReport(
                        name,
                        tuple(W.shape),
                        err_q,
                        err_c,
                        err_c / max(err_q, 1e-30),
                        seconds,
                        qm.preserved_rank,
                        width,
                        err_by_bits or None,
                        loss_by_bits or None,
                        phases,
                        loss_by_rank or None,
                        module_rank,
                        qm.weight.group_size,
                    )
                )
                layer_reports.append(reports[-1])
                mod.weight.copy_(step0.to(mod.weight.dtype))
                result[name] = QuantizedModule(
                    qm.weight.to("cpu"), qm.lora_B.cpu(), qm.lora_A.cpu(), qm.preserved_rank
                )
            del hessians, factor_of
            release_freed_memory()  # the group's forward and working matrices
        t_forward = clock(device)
        inputs = run_layer(layer, inputs, kwargs)
        for r in layer_reports:  # the layer's forward for the next layer's inputs, shared
            r.phase_seconds["calibration forwards"] += (clock(device) - t_forward) / len(layer_reports)
        unload_from_device(layer, source)
        release_freed_memory()  # the layer's forward, before the next layer's weights arrive
        bar.set_postfix(err=f"{sum(r.err_compensated for r in reports[-len(linears) :]) / len(linears):.4f}")
    for r in reports if first_pass is not None else ():
        first = first_pass[r.name]
        r.err_by_bits, r.loss_by_bits, r.loss_by_rank = (
            first.err_by_bits,
            first.loss_by_bits,
            first.loss_by_rank,
        )
    log.info("quantized %d modules (%s)", len(result), label)
    return result, reports


@torch.no_grad()
def allocate_configuration(
    model: nn.Module,
    ids: Tensor,
    cfg: QuantConfig,
    rank: int,
    device: torch.device,
    batch_size: int,
    progress: bool,
    source: WeightSource | None,
    sensitivities: dict[str, Tensor],
) -> tuple[BitConfiguration, dict[str, ModuleReport]]:
    """The first pass of mixed precision (``cfg.budget_bits``) and of rank allocation
    (``cfg.allocate_ranks``): given the output Fisher of every module measured on the float model
    (``sensitivities``, from :func:`~projq_train.quant.sensitivity.output_sensitivities`), every
    module is quantized from the same inputs at each width the choice needs (2, 3 and 4 bits under a
    budget, the next layer calibrated on the width whose uniform storage is nearest it; ``cfg.bits``
    otherwise; with ``cfg.first_pass_iters`` ProjQ rounds when set) and its Fisher-weighted error
    measured at each; with ``cfg.group_size_choices``, in one such pass per group size.
    :func:`~projq_train.quant.allocate.allocate_bits` picks the grids (width and group size) that
    add the least to the loss; then
    :func:`~projq_train.quant.allocate.allocate_ranks` the ranks, from the loss the best correction
    of each rank in :func:`~projq_train.quant.allocate.rank_choices` would leave of ``W − Q`` at the
    module's grid. The first pass quantizes for ``rank``, so the losses the widths are chosen by
    (at ``rank``) are those of the quantization most modules get (ProjQ shapes ``Q``'s error for
    the rank it is given: one quantized for a smaller rank judges the grids by a ``Q`` the second
    pass does not make); a rank above or below it is judged by what it would leave of that ``Q``.
    The model's target weights are left as they were (without a weight ``source`` they are copied
    once to restore them). Returns the configuration and each module's first-pass report row at its
    chosen group size."""
    shapes = target_shapes(model, cfg.target_modules)
    if cfg.budget_bits is not None:
        uniform = uniform_storage(shapes, cfg.group_size, cfg.scale_bits)
        widths, group_sizes = SUPPORTED_BITS, cfg.budget_group_sizes
        nearest = min(widths, key=lambda b: abs(uniform[b] - cfg.budget_bits))
    else:
        widths, nearest, group_sizes = (cfg.bits,), cfg.bits, [cfg.group_size]
    choices = rank_choices(rank) if cfg.allocate_ranks else ()
    originals = None if source is not None else {n: model.get_submodule(n).weight.clone() for n in shapes}
    measured: dict[int, dict[str, ModuleReport]] = {}  # group size → module → its first-pass row
    for group_size in group_sizes:
        first = replace(
            cfg,
            bits=nearest,
            budget_bits=None,
            allocate_ranks=False,
            group_size=group_size,
            group_size_choices=None,
            iters=cfg.iters if cfg.first_pass_iters is None else cfg.first_pass_iters,
            first_pass_iters=None,
        )
        _, reports = quantize_model(
            model,
            ids,
            first,
            rank,
            device,
            batch_size,
            progress,
            source,
            None,
            widths,
            sensitivities,
            measure_ranks=choices,
        )
        for name, weight in (originals or {}).items():
            model.get_submodule(name).weight.copy_(weight)
        measured[group_size] = {r.name: r for r in reports}

    def loss(name: str, bits: int, group_size: int) -> float:  # at `rank` when ranks are allocated
        row = measured[group_size][name]
        return row.loss_by_rank[bits][rank] if choices else row.loss_by_bits[bits]

    if cfg.budget_bits is None:
        grids = dict.fromkeys(shapes, (cfg.bits, cfg.group_size))
    else:
        losses = {n: {grid: loss(n, *grid) for grid in grid_choices(group_sizes)} for n in shapes}
        grids = allocate_bits(losses, shapes, group_sizes, cfg.budget_bits, cfg.scale_bits)
    if choices:
        ranks = allocate_ranks(
            {n: measured[grids[n][1]][n].loss_by_rank[grids[n][0]] for n in shapes}, shapes, rank
        )
    else:
        ranks = dict.fromkeys(shapes, rank)
    configuration = BitConfiguration(
        bits={n: b for n, (b, _) in grids.items()},
        ranks=ranks,
        group_sizes={n: shapes[n][1] if g == -1 else g for n, (_, g) in grids.items()},
    )
    return configuration, {n: measured[grids[n][1]][n] for n in shapes}


def stored_bits_per_weight(modules: dict[str, QuantizedModule]) -> float:
    """Average bits per weight the packed tensors hold (codes, zeros, scales)."""
    weights = sum(qm.weight.in_features * qm.weight.out_features for qm in modules.values())
    return sum(qm.weight.storage_bits for qm in modules.values()) / weights


def format_storage(modules: dict[str, QuantizedModule], group_size: int, budget_bits: float | None) -> str:
    """The storage the packed weights reached, counted from their tensors, against the budget
    and what uniform 2, 3 and 4 bits would store (with the same scales)."""
    stored = stored_bits_per_weight(modules)
    shapes = {n: (qm.weight.out_features, qm.weight.in_features) for n, qm in modules.items()}
    scale_bits = next(iter(modules.values())).weight.scale_bits
    uniform = " / ".join(f"{v:.3f}" for v in uniform_storage(shapes, group_size, scale_bits).values())
    against = f" (budget {budget_bits:g})" if budget_bits is not None else ""
    against += ", 8-bit scales" * (scale_bits == 8)
    against += ", inputs rotated" * any(qm.weight.rotated_inputs for qm in modules.values())
    grouped = len({qm.weight.group_size for qm in modules.values()}) > 1  # per row: the input width
    counts = Counter((qm.weight.bits, qm.weight.group_size if grouped else 0) for qm in modules.values())
    mix = "modules: " + ", ".join(
        f"{counts[b, g]} at {b} bits" + (f" g{g}" if grouped else "") for b, g in sorted(counts)
    )
    return f"storage: {stored:.3f} bits per weight{against}, {mix}; uniform 2 / 3 / 4 bits store {uniform}"


def apply_quantized(
    model: nn.Module, modules: dict[str, QuantizedModule], with_adapter: bool = True
) -> nn.Module:
    """Write ``Q`` (or ``Q + BA``) into the model's linear weights: the fake-quantized reference model."""
    named = dict(model.named_modules())
    with torch.no_grad():
        for name, qm in modules.items():
            w = qm.step0_weight() if with_adapter else qm.weight.dequantize()
            named[name].weight.copy_(w.to(named[name].weight.dtype))
    return model


def format_report(reports: list[ModuleReport]) -> str:
    """A fixed-width table of the per-module report with a mean row; with srr, the preserved rank
    ``k`` of each module too, and its width, group size and rank where they differ between modules."""
    srr = any(r.preserved_rank is not None for r in reports)
    mixed = len({r.bits for r in reports}) > 1
    grouped = len({r.group_size for r in reports}) > 1
    ranked = len({r.rank for r in reports}) > 1

    def rank(value: int | None) -> str:  # the rank allocation's column
        return f" {value:>4}" if ranked else ""

    def k(value: int | None) -> str:  # the srr column
        return f" {'' if value is None else value:>4}" if srr else ""

    def width(value: int | None) -> str:  # the mixed-precision column
        return f" {value:>4}" if mixed else ""

    def group(value: int | None) -> str:  # the group-size column
        return f" {value:>5}" if grouped else ""

    head = (
        (f" {'bits':>4}" if mixed else "")
        + (f" {'group':>5}" if grouped else "")
        + (f" {'rank':>4}" if ranked else "")
        + (f" {'k':>4}" if srr else "")
    )
    lines = [f"{'module':<40} {'shape':>12}{head} {'err Q':>9} {'err Q+BA':>9} {'tail %':>7} {'sec':>6}"]
    for r in reports:
        shape = f"{r.shape[0]}x{r.shape[1]}"
        lines.append(
            f"{r.name:<40} {shape:>12}{width(r.bits)}{group(r.group_size)}{rank(r.rank)}"
            f"{k(r.preserved_rank)} {r.err_quant:9.5f} {r.err_compensated:9.5f} "
            f"{100 * r.tail_fraction:7.2f} {r.seconds:6.2f}"
        )
    n = max(len(reports), 1)
    ks = [r.preserved_rank for r in reports if r.preserved_rank is not None]
    mean_k = f" {sum(ks) / len(ks):4.1f}" if ks else k(None)
    mean_bits = (f" {'':>4}" if mixed else "") + (f" {'':>5}" if grouped else "")
    mean_rank = f" {sum(r.rank for r in reports) / n:4.1f}" if ranked else ""
    lines.append(
        f"{'mean':<40} {'':>12}{mean_bits}{mean_rank}{mean_k} {sum(r.err_quant for r in reports) / n:9.5f} "
        f"{sum(r.err_compensated for r in reports) / n:9.5f} "
        f"{100 * sum(r.tail_fraction for r in reports) / n:7.2f} {sum(r.seconds for r in reports):6.2f}"
    )
    phases = Counter()
    for r in reports:
        phases.update(r.phase_seconds or {})
    if phases:
        total = sum(phases.values())
        spent = ", ".join(f"{name} {s:.1f} s ({100 * s / total:.0f} %)" for name, s in phases.items())
        lines.append(f"time per phase: {spent}")
    return "\n".join(lines)
