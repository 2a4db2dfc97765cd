"""End to end on the real SmolLM2-135M-Instruct: quantize, evaluate, fine-tune, evaluate again.

For each bit width and quantizer (RTN, GPTQ, ProjQ in the paper's loop, ``projq-refresh`` and
``projq-srr`` in those modes; group size 64, clipped grids, rank 32 unless ``--rank`` says
otherwise — the settings of ``recipes/smollm2-135m-alpaca-w3.yaml``), each storage budget
(``--budgets``: mixed 2/3/4 bits under ``quant.budget_bits``), and bitsandbytes NF4
(``--methods nf4``, QLoRA's base, standard init only), and each adapter init:

- ``standard``: the QLoRA init (``B = 0``), so before training the model is the quantized base ``Q``;
- ``compensation``: the adapter starts at the quantizer's low-rank compensation, ``Q + BA``
  (for ProjQ this is its point; for RTN/GPTQ it is the activation-aware SVD of their error);

the model is scored before and after a short LoRA fine-tune on a mix of the LLM-Adapters training
sets present (boolq, ARC-Easy, ARC-Challenge, openbookqa): WikiText-2 perplexity (side by side
windows) and commonsense accuracy by answer log-likelihood on the first rows of each test set.
The float model is scored once. Each finished variant is added to the JSON at once, and a run
skips the variants already there, so a long run can be split (``--methods``) or resumed.

    # the README table (2 CPU cores: about 2 hours, quantization of the 9 bases included)
    python benchmarks/end_to_end.py --json e2e.json --plot docs/end_to_end.png
    python benchmarks/end_to_end.py --json e2e.json --methods rtn gptq --bits 3 4
    python benchmarks/end_to_end.py --table-from e2e.json --plot docs/end_to_end.png
    # mixed precision at the storage of uniform 3 bits and below, against NF4 and uniform 3 bits
    python benchmarks/end_to_end.py --json budget.json --methods gptq --bits 3 --budgets 3.3 2.8
    python benchmarks/end_to_end.py --json budget.json --methods nf4

Quantization artifacts are cached under ``--artifact-dir`` (``projq-train quantize`` with the same
settings makes the same ones).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import time
from pathlib import Path

import lightning as L
import torch

from projq_train.artifact import find_or_quantize
from projq_train.config import AdapterConfig, CalibrationConfig, ModelConfig, QuantConfig, ScheduleConfig
from projq_train.data.calibration import load_rows
from projq_train.data.instruct import InstructionData
from projq_train.eval.harness import EvalSettings, evaluate
from projq_train.eval.models import artifact_model
from projq_train.eval.tasks import resolve_task
from projq_train.models import load_model_and_tokenizer
from projq_train.module import ProjQModule, swap_in_nf4

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODEL = ModelConfig(
    name_or_path=str(SHARED / "models" / "SmolLM2-135M-Instruct-Q4_1-gguf"),
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
)
CALIBRATION = CalibrationConfig(
    dataset=str(SHARED / "datasets" / "alpaca_5000" / "alpaca_5000.json"), template="alpaca", nsamples=32
)
TRAIN_SETS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
COMMONSENSE = ("boolq", "ARC-Easy", "openbookqa")  # scored; ARC-Challenge left out for time
INITS = ("standard", "compensation")  # adapter.init
METHODS = ("rtn", "gptq", "projq", "projq-refresh", "projq-srr", "nf4")  # projq-<mode>: quant.mode
RANK = 32  # adapter rank, and the compensation's, unless --rank says otherwise (then in the keys)
LR = 5e-4  # the fine-tune's peak learning rate, unless --lr says otherwise (then in the keys)
DROPOUT = 0.05  # the adapter's dropout in the fine-tune, unless --dropout says otherwise (then in the keys)
ITERS = QuantConfig.iters  # quant.iters, unless --iters says otherwise (then in the keys)
STRENGTH = QuantConfig.projection_strength  # unless --projection-strength says otherwise (then in the keys)
COLORS = {
    "rtn": "tab:gray",
    "gptq": "tab:blue",
    "projq": "tab:red",
    "projq-refresh": "tab:purple",
    "projq-srr": "tab:orange",
    "nf4": "tab:green",
}
log = logging.getLogger("end-to-end")


def quant_config(
    method: str,
    width: float,
    budget: bool,
    compensation: str = "hessian",
    allocate_ranks: bool = False,
    iters: int = ITERS,
    strength: float = STRENGTH,
    group_size_choices: list[int] | None = None,
    first_pass_iters: int | None = None,
    scale_bits: int = 16,
    rotate_inputs: bool = False,
) -> QuantConfig:
    """``width`` bits, or (``budget``) the storage budget ``quant.budget_bits`` (over the grids of
    ``group_size_choices``, when given); ``iters``, ``strength``, ``first_pass_iters``,
    ``scale_bits`` and ``rotate_inputs``: ``quant.iters``, ``quant.projection_strength``, (for a
    ProjQ base with a first pass) ``quant.first_pass_iters``, ``quant.scale_bits`` and
    ``quant.rotate_inputs``."""
    if method == "nf4":
        return QuantConfig(method="nf4", bits=4)
    method, _, mode = method.partition("-")
    widths = (
        {"bits": None, "budget_bits": width, "group_size_choices": group_size_choices}
        if budget
        else {"bits": int(width)}
    )
    settings = {
        "group_size": 64,
        "iters": iters,
        "projection_strength": strength,
        "mode": mode or "paper",
        "clip": True,
        "compensation": compensation,
        "allocate_ranks": allocate_ranks,
        "scale_bits": scale_bits,
        "rotate_inputs": rotate_inputs,
    }
    if method == "projq" and (budget or allocate_ranks):
        settings["first_pass_iters"] = first_pass_iters
    return QuantConfig(method=method, **widths, **settings)


def variant_key(
    method: str,
    width: float,
    budget: bool,
    quant: QuantConfig,
    rank: int = RANK,
    lr: float = LR,
    dropout: float = DROPOUT,
) -> str:
    """``gptq-w3`` (uniform 3 bits), ``gptq-b3.3`` (a budget of 3.3 bits per weight), ``nf4-w4``;
    then what ``quant`` (:func:`quant_config`'s) and the adapter change from the defaults:
    ``projq-srr-b3.3-r64-fisher`` at adapter rank 64 with ``quant.compensation: fisher``,
    ``...-ranks`` with ``quant.allocate_ranks``, ``...-iters10`` and ``...-strength0.97`` for
    ``quant.iters`` and ``quant.projection_strength`` other than :data:`ITERS` and :data:`STRENGTH`,
    ``...-groups64.192.row`` for ``quant.group_size_choices`` (``row``: -1), ``...-firstpass1`` for
    ``quant.first_pass_iters``, ``...-scale8`` for ``quant.scale_bits: 8``, ``...-rotated`` for
    ``quant.rotate_inputs``; then the fine-tune's
    settings, ``...-lr0.0001`` for a learning rate other than :data:`LR` and ``...-dropout0`` for a
    dropout other than :data:`DROPOUT`."""
    choices = quant.group_size_choices or []
    quantization = (
        f"-r{rank}" * (rank != RANK)
        + "-fisher" * (quant.compensation == "fisher")
        + "-ranks" * quant.allocate_ranks
        + f"-iters{quant.iters}" * (quant.iters != ITERS)
        + f"-strength{quant.projection_strength:g}" * (quant.projection_strength != STRENGTH)
        + ("-groups" + ".".join("row" if g == -1 else str(g) for g in choices)) * bool(choices)
        + f"-firstpass{quant.first_pass_iters}" * (quant.first_pass_iters is not None)
        + "-scale8" * (quant.scale_bits == 8)
        + "-rotated" * quant.rotate_inputs
    )
    fine_tune = f"-lr{lr:g}" * (lr != LR) + f"-dropout{dropout:g}" * (dropout != DROPOUT)
    return f"{method}-{'b' if budget else 'w'}{width:g}{quantization}{fine_tune}"


def split_key(key: str) -> tuple[str, str | None, str | None]:
    """(the quantization's key, lr, dropout) of a :func:`variant_key`; None where the default."""
    match = re.fullmatch(r"(.+?)(?:-lr([0-9.e+-]+?))?(?:-dropout([0-9.e+-]+))?", key)
    return match[1], match[2], match[3]


def parse_key(key: str) -> tuple[str, float, bool]:
    """(label, width, budget) of a :func:`variant_key`; the label is the method, then ``r<rank>`` when
    the rank is not :data:`RANK`, ``fisher`` for a Fisher-weighted compensation, ``ranks`` for
    allocated ranks, ``<n> rounds`` and ``strength <s>`` for other ``quant.iters`` and projection
    strength, ``groups 64/192/-1`` for group-size choices, ``first pass <n> rounds`` for
    ``quant.first_pass_iters``, ``8-bit scales`` for ``quant.scale_bits: 8``, ``rotated`` for
    ``quant.rotate_inputs``, ``lr <lr>`` for another learning rate and ``dropout <p>`` for another
    dropout."""
    rest, lr, dropout = split_key(key)
    rotated = rest.endswith("-rotated")
    rest = rest.removesuffix("-rotated")
    eight_bit_scales = rest.endswith("-scale8")
    rest = rest.removesuffix("-scale8")
    first = re.search(r"-firstpass(\d+)$", rest)
    rest = rest.removesuffix(first[0]) if first else rest
    groups = re.search(r"-groups([0-9.row]+)$", rest)
    rest = rest.removesuffix(groups[0]) if groups else rest
    strength = re.search(r"-strength([0-9.]+)$", rest)
    rest = rest.removesuffix(strength[0]) if strength else rest
    iters = re.search(r"-iters(\d+)$", rest)
    rest = rest.removesuffix(iters[0]) if iters else rest
    ranks = rest.endswith("-ranks")
    rest = rest.removesuffix("-ranks")
    fisher = rest.endswith("-fisher")
    rest = rest.removesuffix("-fisher")
    head, last = rest.rsplit("-", 1)
    rank = last if last[0] == "r" and last[1:].isdigit() else None
    method, width = (head if rank else rest).rsplit("-", 1)
    label = (
        method
        + f" {rank}" * bool(rank)
        + " fisher" * fisher
        + " ranks" * ranks
        + (f" {iters[1]} rounds" if iters else "")
        + (f" strength {strength[1]}" if strength else "")
        + (" groups " + groups[1].replace("row", "-1").replace(".", "/") if groups else "")
        + (f" first pass {first[1]} round{'s' * (first[1] != '1')}" if first else "")
        + " 8-bit scales" * eight_bit_scales
        + " rotated" * rotated
        + f" lr {lr}" * bool(lr)
        + f" dropout {dropout}" * bool(dropout)
    )
    return label, float(width[1:]), width[0] == "b"


def training_file(out: Path, rows_per_set: int, seed: int = 0) -> Path:
    """A shuffled mix of the first ``rows_per_set`` rows of each LLM-Adapters training set."""
    rows = []
    for name in TRAIN_SETS:
        rows += load_rows(str(SHARED / "datasets" / "llm-adapters" / "dataset" / name / "train.json"))[
            :rows_per_set
        ]
    random.Random(seed).shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(json.dumps(r) for r in rows))
    return out


def score(model, tokenizer, args) -> dict:
    tasks = [resolve_task(t, SHARED / "datasets") for t in ("wikitext2", *COMMONSENSE)]
    t0 = time.perf_counter()
    windows = EvalSettings(limit=args.ppl_windows, seqlen=args.seqlen, stride=args.seqlen, batch_size=4)
    text = evaluate(model, tokenizer, tasks[:1], settings=windows, progress=False)
    rows = EvalSettings(limit=args.rows, choice_mode="loglik", batch_size=8)
    choice = evaluate(model, tokenizer, tasks[1:], settings=rows, progress=False)
    results = {**text, **choice}
    mean = sum(choice[t]["acc_loglik"] for t in COMMONSENSE) / len(COMMONSENSE)
    results["commonsense_mean"] = {"acc_loglik": mean}
    log.info("scored in %.0f s: %s", time.perf_counter() - t0, summary(results))
    return results


def summary(results: dict) -> str:
    return (
        f"ppl {results['wikitext2']['perplexity']:.2f}, acc {results['commonsense_mean']['acc_loglik']:.3f}"
    )


def fine_tune(quant: QuantConfig, init: str, train: Path, args) -> tuple[ProjQModule, dict]:
    """Train the adapters for ``args.steps`` steps; returns the trained module and training stats."""
    L.seed_everything(0, verbose=False)
    module = ProjQModule(
        MODEL,
        quant,
        AdapterConfig(rank=args.rank, init=init, alpha=float(args.rank), dropout=args.dropout),
        CALIBRATION,
        artifact_dir=args.artifact_dir,
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),
        schedule=ScheduleConfig(warmup_steps=3, min_lr_ratio=0.1),
    )
    data = InstructionData(
        str(train),
        format="commonsense",
        max_seq_length=256,
        batch_size=8,
        val_fraction=0.0,
        tokenizer=module.tokenizer,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    stats = {
        "steps": trainer.global_step,
        "fit_seconds": time.perf_counter() - t0,
        "final_train_loss": float(trainer.callback_metrics["train_loss"]),
    }
    return module, stats


def step0_of_another_fine_tune(results: dict, key: str) -> dict:
    """The step-0 fields (artifact, quantization time, the quantized and initialized models'
    scores) of an entry of ``results`` with ``key``'s quantization fine-tuned at another learning
    rate or dropout: step 0 depends on neither. Empty when there is none."""
    quantization = split_key(key)[0]
    for other, entry in results.items():
        if (
            other not in ("float", "settings")
            and split_key(other)[0] == quantization
            and "quantized" in entry
        ):
            return {
                k: entry[k]
                for k in ("artifact", "quantize_wall_seconds", "quantized", "initialized")
                if k in entry
            }
    return {}


def run(args) -> dict:
    results = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    save = lambda: Path(args.json).write_text(json.dumps(results, indent=2))  # noqa: E731
    results.setdefault("settings", {k: v for k, v in vars(args).items() if k not in ("json", "table_from")})
    if "float" not in results:
        model, tok = load_model_and_tokenizer(MODEL)
        results["float"] = score(model, tok, args)
        save()
    train = training_file(Path(args.runs_dir) / "train.jsonl", args.rows_per_set)
    variants = [(m, b, False) for b in args.bits for m in args.methods if m != "nf4"]
    variants += [(m, b, True) for b in args.budgets for m in args.methods if m != "nf4"]
    variants += [("nf4", 4, False)] if "nf4" in args.methods else []  # 4 bits, whatever --bits says
    for method, width, budget in variants:
        compensation = "hessian" if method == "nf4" else args.compensation
        allocate_ranks = args.allocate_ranks and method != "nf4"
        quant = quant_config(
            method,
            width,
            budget,
            compensation,
            allocate_ranks,
            args.iters,
            args.projection_strength,
            args.group_size_choices if budget else None,
            args.first_pass_iters,
            args.scale_bits,
            args.rotate_inputs,
        )
        key = variant_key(method, width, budget, quant, args.rank, args.lr, args.dropout)
        entry = results.setdefault(key, {})
        if "quantized" not in entry:
            entry.update(step0_of_another_fine_tune(results, key))
        if "quantized" not in entry:
            t0 = time.perf_counter()
            if method == "nf4":  # no artifact: bitsandbytes quantizes the loaded model
                model, tok = load_model_and_tokenizer(MODEL)
                swap_in_nf4(model, quant.target_modules, torch.float32, torch.device("cpu"))
                entry["quantize_wall_seconds"] = time.perf_counter() - t0
                entry["quantized"] = score(model, tok, args)
            else:  # the artifact `fit` makes at setup and finds again in fine_tune
                cpu = torch.device("cpu")
                path = find_or_quantize(MODEL, quant, args.rank, CALIBRATION, args.artifact_dir, cpu)
                entry["artifact"], entry["quantize_wall_seconds"] = path.name, time.perf_counter() - t0
                for stage, with_adapter in (("quantized", False), ("initialized", True)):
                    model, tok = artifact_model(path, with_adapter)
                    entry[stage] = score(model, tok, args)
            save()
        nf4_inits = ("standard",) if args.inits else ()  # NF4 has no compensation to start from
        for init in args.inits if method != "nf4" else nf4_inits:
            if f"fine-tuned/{init}" in entry:
                continue
            log.info("%s, %s init: fine-tuning", key, init)
            module, stats = fine_tune(quant, init, train, args)
            entry[f"fine-tuned/{init}"] = score(module.model, module.tokenizer, args) | stats
            save()
    return results


def table(results: dict) -> str:
    fp = results["float"]
    lines = [
        f"float model: WikiText-2 perplexity {fp['wikitext2']['perplexity']:.2f}, commonsense accuracy "
        f"{fp['commonsense_mean']['acc_loglik']:.3f}",
        "",
        "| bits | quantizer | adapter init | ppl before | ppl after | acc before | acc after | "
        + " | ".join(f"{t} after" for t in COMMONSENSE)
        + " |",
        "|---:|---|---|---:|---:|---:|---:|" + "---:|" * len(COMMONSENSE),
    ]
    keys = sorted((k for k in results if k not in ("float", "settings")), key=lambda k: (parse_key(k)[1], k))
    for key in keys:
        method, width, budget = parse_key(key)
        entry = results[key]
        for init in INITS if method.split(" ")[0] != "nf4" else ("standard",):
            before = entry["quantized" if init == "standard" else "initialized"]
            after = entry.get(f"fine-tuned/{init}")
            cells = [
                f"{width:g}",
                f"{method} budget" if budget else method,
                init,
                f"{before['wikitext2']['perplexity']:.2f}",
                f"{after['wikitext2']['perplexity']:.2f}" if after else "not run",
                f"{before['commonsense_mean']['acc_loglik']:.3f}",
                f"{after['commonsense_mean']['acc_loglik']:.3f}" if after else "not run",
                *(f"{after[t]['acc_loglik']:.3f}" if after else "" for t in COMMONSENSE),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """WikiText-2 perplexity before and after fine-tuning, and accuracy after, against bits; one
    line per quantizer and adapter init (budgets: points at their storage, hollow markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    keys = [k for k in results if k not in ("float", "settings")]
    panels = [("before", "perplexity"), ("after", "perplexity"), ("after", "acc_loglik")]
    for series in dict.fromkeys(parse_key(k)[::2] for k in keys):  # (method, budget)
        method, budget = series
        for init, style in (("standard", "--"), ("compensation", "-")):
            stage = {
                "before": "quantized" if init == "standard" else "initialized",
                "after": f"fine-tuned/{init}",
            }
            for ax, (when, metric) in zip(axes, panels, strict=True):
                task = "wikitext2" if metric == "perplexity" else "commonsense_mean"
                points = sorted(
                    (parse_key(k)[1], results[k][stage[when]][task][metric])
                    for k in keys
                    if parse_key(k)[::2] == series and stage[when] in results[k]
                )
                if points:
                    label = f"{method}{' budget' if budget else ''}, {init} init"
                    color = COLORS[method.split(" ")[0]]
                    marker = {"marker": "o", "markerfacecolor": "none" if budget else color}
                    ax.plot(*zip(*points, strict=True), style, color=color, label=label, **marker)
    fp = results["float"]
    for ax, (when, metric) in zip(axes, panels, strict=True):
        task = "wikitext2" if metric == "perplexity" else "commonsense_mean"
        ax.axhline(fp[task][metric], color="black", lw=0.8, label="float (no fine-tune)")
        name = "WikiText-2 perplexity" if metric == "perplexity" else "commonsense accuracy"
        ax.set(xlabel="bits", ylabel=f"{name} ({when} fine-tuning)", xticks=[2, 3, 4])
        if metric == "perplexity":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "SmolLM2-135M: before and after a short LoRA fine-tune on LLM-Adapters commonsense sets", fontsize=9
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="*", default=[2, 3, 4])
    parser.add_argument(
        "--budgets", type=float, nargs="*", default=[], help="quant.budget_bits of mixed-precision bases"
    )
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "projq"], choices=METHODS)
    parser.add_argument(
        "--inits",
        nargs="*",
        default=list(INITS),
        choices=list(INITS),
        help="none: score before fine-tuning only",
    )
    parser.add_argument(
        "--compensation",
        choices=["hessian", "fisher"],
        default="hessian",
        help="quant.compensation of the quantized bases (their keys end in -fisher)",
    )
    parser.add_argument(
        "--rank", type=int, default=RANK, help="adapter rank (keys end in -r<rank> if not 32)"
    )
    parser.add_argument(
        "--allocate-ranks",
        action="store_true",
        help="quant.allocate_ranks for the quantized bases (their keys end in -ranks)",
    )
    parser.add_argument(
        "--iters", type=int, default=ITERS, help="quant.iters (keys end in -iters<n> if not 5)"
    )
    parser.add_argument(
        "--projection-strength",
        type=float,
        default=STRENGTH,
        help="quant.projection_strength (keys end in -strength<s> if not 1)",
    )
    parser.add_argument(
        "--group-size-choices",
        type=int,
        nargs="+",
        help="quant.group_size_choices of the budget bases (keys end in -groups<sizes>)",
    )
    parser.add_argument(
        "--first-pass-iters",
        type=int,
        help="quant.first_pass_iters of the ProjQ bases with a first pass (keys end in -firstpass<n>)",
    )
    parser.add_argument(
        "--scale-bits",
        type=int,
        choices=[16, 8],
        default=16,
        help="quant.scale_bits of the quantized bases (keys end in -scale8 for 8)",
    )
    parser.add_argument(
        "--rotate-inputs",
        action="store_true",
        help="quant.rotate_inputs of the quantized bases (keys end in -rotated)",
    )
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps (batch 8)")
    parser.add_argument(
        "--lr",
        type=float,
        default=LR,
        help="peak learning rate (keys end in -lr<lr> if not 5e-4); with a --json that holds the same "
        "quantization at another rate, its step-0 scores are reused",
    )
    parser.add_argument(
        "--dropout",
        type=float,
        default=DROPOUT,
        help="adapter.dropout of the fine-tune (keys end in -dropout<p> if not 0.05); step-0 scores "
        "are reused as for --lr",
    )
    parser.add_argument("--rows-per-set", type=int, default=500, help="training rows from each training set")
    parser.add_argument("--rows", type=int, default=40, help="test rows scored per commonsense task")
    parser.add_argument("--ppl-windows", type=int, default=4, help="WikiText-2 windows scored")
    parser.add_argument("--seqlen", type=int, default=512, help="WikiText-2 window length")
    parser.add_argument("--artifact-dir", default="artifacts")
    parser.add_argument("--runs-dir", default="runs/bench-e2e")
    parser.add_argument(
        "--json", default="e2e.json", help="results file (read first: finished variants are skipped)"
    )
    parser.add_argument("--plot", help="PNG file for the plot")
    parser.add_argument(
        "--table-from", nargs="+", help="print the table (and plot) of earlier JSONs, run nothing"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.table_from:  # runs split by --methods: the variants of every file, the float model of the first
        results = {}
        for path in reversed(args.table_from):
            results.update(json.loads(Path(path).read_text()))
    else:
        results = run(args)
    print(table(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
