"""Mixed precision under a storage budget, and adapter ranks under a parameter budget.

A :class:`BitConfiguration` maps each quantized module to its bit width, group size and adapter
rank; it is recorded in the artifact, shown in the quantization report, and is what a
configuration-aware adapter takes as input. :func:`allocate_bits` picks each module's grid (bit
width and group size, :data:`Grid`) from its measured cost on every grid (the driver gives it the
compensated error weighted by the output Fisher, an estimate of the loss it adds:
:mod:`projq_train.quant.sensitivity`);
:func:`allocate_ranks` picks the ranks the same way from the cost at every rank in
:func:`rank_choices`, under the parameter count of one rank everywhere. Both are a
multiple-choice knapsack solved exactly by dynamic programming (:func:`least_total_cost`) over
the room above the cheapest choices, counted in units fixed by the model's shapes (not by the
budget), so a larger budget never gives a larger total error. The unit is the greatest common
divisor of the choices' costs (exact: uniform 3 bits fits a budget of its own storage) unless
that makes the axis longer than :data:`MAX_UNITS_PER_MODULE` per module; costs are then rounded
up to coarser units, and the budget still holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from projq_train.config import SUPPORTED_BITS
from projq_train.quant.pack import packed_storage_bits

Grid = tuple[int, int]  # (bits, group size) of a module's quantization grid; group size -1: per row
ALLOCATION_OBJECTIVE = "fisher-weighted output error"  # what the errors given to allocate_bits are
MAX_UNITS_PER_MODULE = 1000  # the storage axis, at most; coarser units round costs up (< 0.1 % of the room)


@dataclass(frozen=True)
class BitConfiguration:
    """Bit width, group size and adapter rank of every quantized module (full module name →
    value; a group size is the effective one: a module's input width for one group per row).
    Artifacts written before group sizes were recorded have none (``group_sizes`` empty): all
    their modules share the recipe's ``quant.group_size``."""

    bits: dict[str, int]
    ranks: dict[str, int]
    group_sizes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {"bits": dict(self.bits), "ranks": dict(self.ranks), "group_sizes": dict(self.group_sizes)}

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, int]]) -> BitConfiguration:
        return cls(bits=dict(d["bits"]), ranks=dict(d["ranks"]), group_sizes=dict(d.get("group_sizes", {})))

    @classmethod
    def of(cls, modules: dict[str, Any]) -> BitConfiguration:
        """The configuration quantized modules (name → ``QuantizedModule``) were made with."""
        return cls(
            bits={n: m.weight.bits for n, m in modules.items()},
            ranks={n: m.lora_A.shape[0] for n, m in modules.items()},
            group_sizes={n: m.weight.group_size for n, m in modules.items()},
        )


def grid_choices(group_sizes: Sequence[int]) -> list[Grid]:
    """The grids a budget chooses from: every supported width at each of ``group_sizes``."""
    return [(b, g) for g in group_sizes for b in SUPPORTED_BITS]


def storage_bits_per_weight(
    shapes: dict[str, tuple[int, int]], grids: dict[str, Grid], scale_bits: int = 16
) -> float:
    """Average stored bits per weight of the modules ``shapes`` (name → (out, in)) on ``grids``
    with scales of ``scale_bits``."""
    stored = sum(packed_storage_bits(o, i, *grids[n], scale_bits) for n, (o, i) in shapes.items())
    return stored / sum(o * i for o, i in shapes.values())


def uniform_storage(
    shapes: dict[str, tuple[int, int]], group_size: int, scale_bits: int = 16
) -> dict[int, float]:
    """What uniform 2, 3 and 4 bits would store per weight at ``group_size``."""
    return {
        b: storage_bits_per_weight(shapes, dict.fromkeys(shapes, (b, group_size)), scale_bits)
        for b in SUPPORTED_BITS
    }


def check_budget(
    budget_bits: float, shapes: dict[str, tuple[int, int]], group_sizes: Sequence[int], scale_bits: int = 16
) -> None:
    """Refuse a budget below all-2-bit storage or above all-4-bit (with several group sizes: each
    module at its cheapest and at its dearest grid), naming the possible range."""
    weights = sum(o * i for o, i in shapes.values())
    costs = [
        [packed_storage_bits(o, i, *grid, scale_bits) for grid in grid_choices(group_sizes)]
        for o, i in shapes.values()
    ]
    low, high = sum(map(min, costs)) / weights, sum(map(max, costs)) / weights
    if not low <= budget_bits <= high:
        sizes = (
            f"group size {group_sizes[0]}" if len(group_sizes) == 1 else f"group sizes {list(group_sizes)}"
        )
        sizes += " with 8-bit scales" * (scale_bits == 8)
        raise ValueError(
            f"quant.budget_bits {budget_bits:g} is outside what 2 to 4 bits can store for this model at "
            f"{sizes}: {math.ceil(low * 1000) / 1000:.3f} (all 2-bit) to "
            f"{math.floor(high * 1000) / 1000:.3f} (all 4-bit)"
        )


def shifted(values: Tensor, by: int) -> Tensor:
    """``values[s − by]`` at every ``s`` (``inf`` where ``s < by``)."""
    return torch.cat(
        [values.new_full((min(by, len(values)),), float("inf")), values[: max(len(values) - by, 0)]]
    )


def least_total_cost(errors: Tensor, costs: Tensor, room: float) -> list[int]:
    """Which choice of each module (a row of ``errors`` and ``costs``, ``(modules, choices)``) gives
    the least total error with the total cost at most ``room`` (an integer) above the cheapest
    choices' (``inf`` errors: choices not allowed). Exact when the unit (the greatest common divisor of the
    costs above each row's cheapest) divides every cost; with coarser units the costs are rounded
    up, so the room still holds. Of equal totals, the cheaper choices."""
    extra = costs - costs.min(dim=1, keepdim=True).values  # cost above the module's cheapest
    most = extra.max(dim=1).values.sum().item()
    unit = float(math.gcd(*(int(c) for c in extra.flatten()))) or 1.0
    if most / unit > MAX_UNITS_PER_MODULE * len(costs):
        unit = math.ceil(most / (MAX_UNITS_PER_MODULE * len(costs)))
    slots = int(room // unit)
    steps = torch.ceil(extra / unit).long()  # (modules, choices) units each choice takes
    order = torch.argsort(costs, dim=1, stable=True)  # cheaper choices first: they win ties
    # best[s]: the least total error of the modules so far within s units; picks: their choices
    best = torch.zeros(slots + 1, dtype=torch.float64)
    picks = torch.empty(len(costs), slots + 1, dtype=torch.int8)  # a few choices per module
    for m in range(len(costs)):
        options = torch.stack([shifted(best, int(steps[m, c])) + errors[m, c] for c in order[m].tolist()])
        best, at = options.min(dim=0)
        picks[m] = order[m][at]
    chosen, s = [0] * len(costs), slots
    for m in reversed(range(len(costs))):
        chosen[m] = int(picks[m, s])
        s -= int(steps[m, chosen[m]])
    return chosen


def allocate_bits(
    errors: dict[str, dict[Grid, float]],
    shapes: dict[str, tuple[int, int]],
    group_sizes: Sequence[int],
    budget_bits: float,
    scale_bits: int = 16,
) -> dict[str, Grid]:
    """The grid of each module (from :func:`grid_choices` of ``group_sizes``, each of which divides
    every module's inputs) that minimizes the total error ``Σ errors[module][grid]`` with the
    average stored bits per weight (:func:`storage_bits_per_weight`, scales of ``scale_bits``) at
    most ``budget_bits`` (:func:`least_total_cost`)."""
    check_budget(budget_bits, shapes, group_sizes, scale_bits)
    names, grids = list(shapes), grid_choices(group_sizes)
    cost = torch.tensor(
        [[packed_storage_bits(*shapes[n], *g, scale_bits) for g in grids] for n in names], dtype=torch.float64
    )
    err = torch.tensor([[errors[n][g] for g in grids] for n in names], dtype=torch.float64)
    weights = sum(o * i for o, i in shapes.values())
    room = (
        math.floor(budget_bits * weights * (1 + 1e-12)) - cost.min(dim=1).values.sum().item()
    )  # above the cheapest
    return {n: grids[c] for n, c in zip(names, least_total_cost(err, cost, room), strict=True)}


def rank_choices(rank: int) -> tuple[int, ...]:
    """The ranks :func:`allocate_ranks` chooses from for an average of ``rank``: a quarter of it
    to twice it, in quarters (at least 1)."""
    return tuple(sorted({max(1, round(rank * k / 4)) for k in range(1, 9)}))


def allocate_ranks(
    errors: dict[str, dict[int, float]], shapes: dict[str, tuple[int, int]], rank: int
) -> dict[str, int]:
    """The adapter rank of each module (from :func:`rank_choices`, at most ``min(out, in)``) that
    minimizes the total error ``Σ errors[module][rank]`` with at most as many adapter parameters
    (``rank · (out + in)`` per module) as ``rank`` everywhere (:func:`least_total_cost`)."""
    names, choices = list(shapes), rank_choices(rank)
    cost = torch.tensor([[r * sum(shapes[n]) for r in choices] for n in names], dtype=torch.float64)
    err = torch.tensor(
        [[errors[n][r] if r <= min(shapes[n]) else math.inf for r in choices] for n in names],
        dtype=torch.float64,
    )
    room = sum(min(rank, *shapes[n]) * sum(shapes[n]) for n in names) - cost[:, 0].sum().item()
    return {n: choices[c] for n, c in zip(names, least_total_cost(err, cost, room), strict=True)}
