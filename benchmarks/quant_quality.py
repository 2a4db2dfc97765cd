"""Quantization quality on the real SmolLM2-135M-Instruct (../shared/data).

For each method x bits x rank it runs the product's layer-by-layer driver, then reports the
mean per-module error in the H-norm (relative to ‖W‖_H²) before and after the low-rank
compensation, the compensated-error ratio GPTQ / method (> 1: lower error than GPTQ), the
WikiText-2 perplexity of the quantized model and of quantized + initialized adapter, and the
time spent quantizing modules (the calibration forward passes are the same for every method
and not counted), the compensation's share of the whole quantization (forwards included, from
the report's time per phase), and the wall time of the whole call (for a bit budget: the
sensitivity pass and the first pass at 2, 3 and 4 bits too; ``quant s`` counts the second
pass only).

    python benchmarks/quant_quality.py --bits 2 3 4 --ranks 32 64 --json quant_quality.json
    # mixed precision under storage budgets (average bits per weight, scales and zeros included)
    # against NF4 (bitsandbytes, CPU) and uniform 3 bits, on the first 40 WikiText-2 windows
    python benchmarks/quant_quality.py --bits 3 --variants gptq-clip nf4 --budgets 3.3 2.8 \
        --budget-variants gptq-clip --ppl-windows 40 --json budget.json

``storage``: average stored bits per quantized weight, counted from the packed tensors (NF4: codes,
8-bit absmax per 64 weights, fp32 absmax per 256 blocks). Prints a markdown table (the one
quoted in README).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from projq_train.config import DEFAULT_TARGETS, CalibrationConfig, ModelConfig, QuantConfig
from projq_train.data.calibration import calibration_tokens
from projq_train.estimate import nf4_linear_bytes
from projq_train.eval import harness
from projq_train.models import load_model_and_tokenizer
from projq_train.module import swap_in_nf4
from projq_train.quant.calibrate import (
    apply_quantized,
    quantize_model,
    stored_bits_per_weight,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = {
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq"},
    "gptq-clip": {"method": "gptq", "clip": True},  # the fair baseline for the clipped variants
    "projq": {"method": "projq"},  # the paper's algorithm
    "projq-clip": {"method": "projq", "clip": True},
    "projq-refresh": {"method": "projq", "mode": "refresh", "clip": True},  # our variant
    "projq-srr": {"method": "projq", "mode": "srr", "clip": True},  # SRR's rank split, then the paper loop
    "nf4": {"method": "nf4"},  # bitsandbytes NF4 4-bit (QLoRA's base; its adapter starts at B = 0)
}
SETTINGS = ("group_size", "nsamples", "seqlen", "ppl_windows")  # stored with the rows, shown in the table
DEFAULT_ROUNDS = QuantConfig.iters  # rows quantized with other --iters say so
DEFAULT_STRENGTH = QuantConfig.projection_strength  # rows with another --projection-strength say so


def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity over the non-overlapping windows ``(n, seqlen)``, each read on its own."""
    return harness.perplexity(model, windows.flatten(), windows.shape[1], windows.shape[1], batch_size)[
        "perplexity"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--ranks", nargs="+", type=int, default=[32, 64])
    ap.add_argument(
        "--group-size", type=int, default=64, help="128 does not divide SmolLM2's hidden size 576"
    )
    ap.add_argument("--iters", type=int, default=DEFAULT_ROUNDS, help="quant.iters (rows say so if not 5)")
    ap.add_argument(
        "--projection-strength",
        type=float,
        default=DEFAULT_STRENGTH,
        help="quant.projection_strength (rows say so if not 1.0)",
    )
    ap.add_argument("--budgets", nargs="*", type=float, default=[], help="quant.budget_bits rows")
    ap.add_argument("--budget-variants", nargs="+", default=["gptq-clip"], choices=list(VARIANTS))
    ap.add_argument(
        "--group-size-choices",
        nargs="+",
        type=int,
        help="quant.group_size_choices of the budget rows (named '... groups 32/64/-1 budget')",
    )
    ap.add_argument(
        "--first-pass-iters",
        type=int,
        help="quant.first_pass_iters of the budget and --allocate-ranks rows of projq variants "
        "(named '... first pass 1 round')",
    )
    ap.add_argument(
        "--compensation",
        choices=["hessian", "fisher"],
        default="hessian",
        help="quant.compensation of every quantized row (fisher rows are named '<variant> fisher')",
    )
    ap.add_argument(
        "--allocate-ranks",
        action="store_true",
        help="quant.allocate_ranks on every quantized row (named '<variant>[ fisher] ranks')",
    )
    ap.add_argument(
        "--act-order",
        action="store_true",
        help="quant.act_order on every quantized row (named '<variant> ... act-order')",
    )
    ap.add_argument(
        "--scale-bits",
        type=int,
        choices=[16, 8],
        default=16,
        help="quant.scale_bits of every quantized row (8: named '<variant> ... 8-bit scales')",
    )
    ap.add_argument(
        "--rotate-inputs",
        action="store_true",
        help="quant.rotate_inputs on every quantized row (named '<variant> ... rotated')",
    )
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write all rows here")
    ap.add_argument("--table-from", nargs="+", type=Path, help="only print the table of earlier --json files")
    args = ap.parse_args()
    if args.table_from:
        rows = []
        for f in args.table_from:
            made = json.loads(f.read_text())
            run_settings = made[0].get("settings")  # each file's float row holds its run's settings
            rows += [r if run_settings is None else {"settings": run_settings, **r} for r in made]
        fp = [r for r in rows if r["variant"] == "fp"][:1]
        order = {v: i for i, v in enumerate(VARIANTS)}
        rest = sorted(
            (r for r in rows if r["variant"] != "fp"),
            key=lambda r: (r["bits"], r["rank"], order.get(base_variant(r["variant"]), len(order))),
        )
        print_table(fp + rest, fp[0].get("settings") or {k: vars(args)[k] for k in SETTINGS})
        return
    torch.manual_seed(0)

    mdir = args.data / "models" / "SmolLM2-135M-Instruct-Q4_1-gguf"
    model, tok = load_model_and_tokenizer(
        ModelConfig(name_or_path=str(mdir), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = CalibrationConfig(
        dataset=str(args.data / "datasets" / "alpaca_5000" / "alpaca_5000.json"),
        template="alpaca",
        nsamples=args.nsamples,
        seqlen=args.seqlen,
    )
    ids = calibration_tokens(calib, tok)
    wiki = (args.data / "datasets" / "wikitext-2-raw" / "wiki.test.raw").read_text()
    wiki_ids = tok(wiki, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows = wiki_ids[: args.ppl_windows * 512].view(args.ppl_windows, 512)
    settings = {k: vars(args)[k] for k in SETTINGS}
    rows = [
        {"bits": 16, "rank": 0, "variant": "fp", "ppl_q": perplexity(model, windows), "settings": settings}
    ]
    print(f"float reference perplexity {rows[0]['ppl_q']:.2f}", flush=True)

    runs = [(bits, rank, name, None) for bits in args.bits for rank in args.ranks for name in args.variants]
    runs += [(b, rank, name, b) for b in args.budgets for rank in args.ranks for name in args.budget_variants]
    for bits, rank, name, budget in runs:
        model.load_state_dict(fp_state)
        if name == "nf4":
            rows.append(nf4_row(model, windows, rank))
        else:
            rows.append(quantized_row(model, ids, windows, name, bits, rank, budget, args))
        r = rows[-1]
        print(
            f"{r['variant']} w{r['bits']} r{rank}: err {r['err_q']:.5f} -> {r['err_qba']:.5f}, "
            f"ppl {r['ppl_q']:.2f} -> {r['ppl_qba']:.2f}, {r['quant_seconds']:.0f}s",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))

    print_table(rows, settings)


def quantized_row(model, ids, windows, name: str, bits: float, rank: int, budget: float | None, args) -> dict:
    """Quantize ``model`` in place with a variant (at ``bits``, or under ``budget``) and score it."""
    widths = (
        {"bits": None, "budget_bits": budget, "group_size_choices": args.group_size_choices}
        if budget is not None
        else {"bits": int(bits)}
    )
    settings = {
        "group_size": args.group_size,
        "iters": args.iters,
        "projection_strength": args.projection_strength,
        "compensation": args.compensation,
        "allocate_ranks": args.allocate_ranks,
        "act_order": args.act_order,
        "scale_bits": args.scale_bits,
        "rotate_inputs": args.rotate_inputs,
    }
    variant = VARIANTS[name]
    if variant["method"] == "projq" and (budget is not None or args.allocate_ranks):
        settings["first_pass_iters"] = args.first_pass_iters
    cfg = QuantConfig(**widths, **settings, **variant)
    t0 = time.perf_counter()
    modules, reports = quantize_model(model, ids, cfg, rank, progress=False)
    wall = time.perf_counter() - t0
    n = len(reports)
    return {
        "bits": bits,
        "rank": rank,
        "variant": name
        + " fisher" * (args.compensation == "fisher")
        + " ranks" * args.allocate_ranks
        + " budget" * (budget is not None),
        "config": asdict(cfg),
        "err_q": sum(r.err_quant for r in reports) / n,
        "err_qba": sum(r.err_compensated for r in reports) / n,
        "module_errors": {r.name: r.err_compensated for r in reports},
        "quant_seconds": sum(r.seconds for r in reports),
        "phase_seconds": {p: sum(r.phase_seconds[p] for r in reports) for p in reports[0].phase_seconds},
        "preserved_rank": [r.preserved_rank for r in reports],
        "module_bits": {r.name: r.bits for r in reports},
        "module_group_sizes": {r.name: r.group_size for r in reports},
        "module_ranks": {r.name: r.rank for r in reports},
        "storage": stored_bits_per_weight(modules),
        "wall_seconds": wall,
        "ppl_qba": perplexity(model, windows),
        "ppl_q": perplexity(apply_quantized(model, modules, with_adapter=False), windows),
    }


def nf4_row(model, windows, rank: int) -> dict:
    """bitsandbytes NF4 on a copy of ``model`` (its adapter starts at ``B = 0``: step 0 is ``Q``)."""
    nf4 = copy.deepcopy(model)
    t0 = time.perf_counter()
    swap_in_nf4(nf4, list(DEFAULT_TARGETS), torch.float32, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    shapes = [(m.in_features, m.out_features) for m in nf4.modules() if type(m).__name__ == "Linear4bit"]
    storage = 8 * sum(nf4_linear_bytes(i, o) for i, o in shapes) / sum(i * o for i, o in shapes)
    ppl = perplexity(nf4, windows)
    nan = float("nan")
    return {
        "bits": 4, "rank": rank, "variant": "nf4", "err_q": nan, "err_qba": nan, "module_errors": {},
        "quant_seconds": seconds, "storage": storage, "ppl_q": ppl, "ppl_qba": ppl,
    }  # fmt: skip


def base_variant(label: str) -> str:
    """The ``VARIANTS`` key of a row's label (``<variant>[ fisher][ ranks][ budget]``)."""
    return label.removesuffix(" budget").removesuffix(" ranks").removesuffix(" fisher")


def error_ratio(base: dict | None, row: dict) -> str:
    """base/row compensated error: the mean over modules, and in brackets the geometric mean of
    the per-module ratios (a check that one module does not dominate)."""
    if base is None or not row["module_errors"]:
        return "-"
    per = [base["module_errors"][k] / v for k, v in row["module_errors"].items()]
    return f"{base['err_qba'] / row['err_qba']:.2f} ({math.exp(sum(map(math.log, per)) / len(per)):.2f})"


def fmt_err(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.5f}"


def fmt_ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.1e}"


def calibration_of(row: dict, settings: dict) -> tuple[int, int]:
    """The calibration windows and their length a row was quantized with (its run's settings,
    stored with the rows of ``--table-from`` files; ``settings`` for a row of this run)."""
    made = row.get("settings", settings)
    return made["nsamples"], made["seqlen"]


def comparison_key(row: dict, settings: dict) -> tuple:
    """What a row shares with the GPTQ rows its ratio columns divide by: width, rank, calibration,
    group size, rounding order, scale bits and input rotation (a row of another group size, order,
    scale format or basis has no GPTQ base unless the table holds GPTQ rows made with them)."""
    made = row.get("config", {})
    grid = (
        made.get("group_size", settings["group_size"]),
        made.get("act_order", False),
        made.get("scale_bits", 16),
        made.get("rotate_inputs", False),
    )
    return row["bits"], row["rank"], calibration_of(row, settings), *grid


def print_table(rows: list[dict], settings: dict) -> None:
    """The README table; ``settings``: those of the run that made the rows (stored with the float
    row; the command line's for files written before they were)."""
    by = {(r["variant"], comparison_key(r, settings)): r for r in rows}
    print(
        f"\nSmolLM2-135M-Instruct, group size {settings['group_size']}, calibration "
        f"{settings['nsamples']}x{settings['seqlen']} Alpaca tokens, WikiText-2 perplexity over "
        f"{settings['ppl_windows']}x512 tokens "
        f"(fp: {rows[0]['ppl_q']:.2f})\n"
    )
    print(
        "| bits | rank | method | storage | err Q | err Q+BA | GPTQ / method | GPTQ-clip / method "
        "| ppl Q | ppl Q+BA | quant s | vs GPTQ time | compensation share | wall s |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows[1:]:
        calibration = calibration_of(r, settings)
        key = comparison_key(r, settings)
        g, clipped = by.get(("gptq", key)), by.get(("gptq-clip", key))
        ks = [k for k in r.get("preserved_rank") or [] if k is not None]
        method = r["variant"]
        if r.get("config", {}).get("group_size", settings["group_size"]) != settings["group_size"]:
            method += f" g{r['config']['group_size']}"
        if r.get("config", {}).get("group_size_choices"):
            method += " groups " + "/".join(map(str, r["config"]["group_size_choices"]))
        if r.get("config", {}).get("method") == "projq":
            method += f" {r['config']['iters']} rounds" * (r["config"]["iters"] != DEFAULT_ROUNDS)
            first = r["config"].get("first_pass_iters")
            method += f" first pass {first} round{'s' * (first != 1)}" * (first is not None)
            strength = r["config"].get("projection_strength", DEFAULT_STRENGTH)
            method += f" strength {strength:g}" * (strength != DEFAULT_STRENGTH)
        method += " act-order" * r.get("config", {}).get("act_order", False)
        method += " 8-bit scales" * (r.get("config", {}).get("scale_bits", 16) == 8)
        method += " rotated" * r.get("config", {}).get("rotate_inputs", False)
        if calibration != (settings["nsamples"], settings["seqlen"]):
            method += " calibration {}x{}".format(*calibration)
        method += f" (mean k {sum(ks) / len(ks):.1f})" if ks else ""
        storage = f"{r['storage']:.3f}" if "storage" in r else "-"
        tratio = f"{r['quant_seconds'] / g['quant_seconds']:.2f}x" if g else "-"
        phases = r.get("phase_seconds")
        share = f"{100 * phases['compensation'] / sum(phases.values()):.0f} %" if phases else "-"
        wall = f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else "-"
        print(
            f"| {r['bits']} | {r['rank']} | {method} | {storage} "
            f"| {fmt_err(r['err_q'])} | {fmt_err(r['err_qba'])} "
            f"| {error_ratio(g, r)} | {error_ratio(clipped, r)} "
            f"| {fmt_ppl(r['ppl_q'])} | {fmt_ppl(r['ppl_qba'])} | {r['quant_seconds']:.0f} | {tratio} "
            f"| {share} | {wall} |"
        )


if __name__ == "__main__":
    main()
