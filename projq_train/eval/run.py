"""``projq-train eval`` and ``projq-train report``: metrics of any model, and the recovery report.

- :func:`run_eval` scores one model: a fit checkpoint (quantized base + trained adapters), a
  quantization artifact (its packed base, optionally with the initialized adapter ``Q + BA``), or
  any Hugging Face model (hub name, local or GGUF checkpoint, a merged or quantized export).
- :func:`run_report` follows a checkpoint through its stages: the float model, its quantized
  base alone (step 0 without adapter), the base with the adapter as initialized (step 0), and the
  fine-tuned model; and says how much of the quantization gap each stage closed:
  ``(m_quantized − m_stage) / (m_quantized − m_float)`` (100 %: back at the float model; above
  100 %: better than it, which fine-tuning on the task can do; none where quantization did not
  make the metric worse).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from projq_train.artifact import check_base, load_quantized_model
from projq_train.checkpoint import build_trained, load_trained, read_fit_checkpoint
from projq_train.config import ModelConfig
from projq_train.eval.harness import ChoiceMode, EvalSettings, evaluate
from projq_train.eval.tasks import Task, resolve_task
from projq_train.export import load_quantized_export
from projq_train.lora import attach_adapters, init_from_compensation
from projq_train.models import load_model_and_tokenizer, resolve_device

log = logging.getLogger(__name__)
DATA_ROOT = os.environ.get("PROJQ_DATA_ROOT", "data")
COUNTS = ("n", "tokens")  # result entries that are sizes, not metrics
Loaded = tuple[nn.Module, Any, str]  # model, tokenizer, prompt template


def place(model: nn.Module, device: torch.device, dtype: str) -> nn.Module:
    """Move for evaluation: ``auto`` is bfloat16 on CUDA, float32 elsewhere (packed weights and
    their fp16 scales keep their dtypes)."""
    name = ("bfloat16" if device.type == "cuda" else "float32") if dtype == "auto" else dtype
    return model.to(device=device, dtype=getattr(torch, name)).eval()


def artifact_model(path: str | Path, adapter_init: bool) -> tuple[nn.Module, Any]:
    """The packed base of an artifact, with adapters set to its compensation (``Q + BA``) if asked."""
    model, tokenizer, modules, meta = load_quantized_model(path)
    if adapter_init:
        targets, rank = meta["recipe"]["quant"]["target_modules"], meta["recipe"]["adapter"]["rank"]
        if rank == 0:
            raise ValueError(f"{path} has no compensation (rank 0) to initialize an adapter from")
        model = attach_adapters(model, targets, rank, rank, 0.0)
        init_from_compensation(model, modules)
    return model, tokenizer


def hf_model(name_or_path: str, gguf_file: str | None) -> tuple[nn.Module, Any]:
    """A Hugging Face model; a directory written by ``export --format quantized`` loads packed."""
    if gguf_file is None and (Path(name_or_path) / "quantize_config.json").is_file():
        from transformers import AutoTokenizer

        return load_quantized_export(name_or_path), AutoTokenizer.from_pretrained(name_or_path)
    return load_model_and_tokenizer(ModelConfig(name_or_path=name_or_path, gguf_file=gguf_file))


def scores_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table: one row per (task, metric), one column per model/stage."""
    names = list(results)
    rows: dict[tuple[str, str], None] = {}  # (task, metric) in first-seen order
    for r in results.values():
        rows.update({(t, m): None for t, ms in r.items() for m in ms if m not in COUNTS})
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for t, m in rows:
        cells = [results[n].get(t, {}).get(m) for n in names]
        lines.append(f"| {t} | {m} | " + " | ".join("" if v is None else f"{v:.4g}" for v in cells) + " |")
    return "\n".join(lines)


def run_eval(
    tasks: list[str],
    ckpt_path: str | None = None,
    artifact: str | None = None,
    model: str | None = None,
    gguf_file: str | None = None,
    adapter_init: bool = False,
    artifact_dir: str | None = None,
    data_root: str = DATA_ROOT,
    template: Literal["auto", "alpaca", "chat"] = "auto",
    limit: int | None = None,
    choice_mode: ChoiceMode = "loglik",
    seqlen: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    output: str | None = None,
) -> dict[str, dict[str, float]]:
    """Score one model on the tasks and print a table; with ``output``, also write the JSON there.

    Args:
        tasks: Task names (wikitext2, boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy,
            ARC-Challenge, openbookqa, gsm8k), found under ``data_root``, or ``name=path``.
        ckpt_path: A fit checkpoint: its quantized base with the trained adapters.
        artifact: A quantization artifact directory: its packed base.
        model: A Hugging Face model: hub name or local directory (also merged/quantized exports).
        gguf_file: GGUF file inside ``model``.
        adapter_init: With ``artifact``: add the adapters as initialized (``Q + BA``).
        artifact_dir: Where the checkpoint's artifact is (default: the one it was trained with).
        data_root: Folder with the task data (``llm-adapters/dataset``, ``wikitext-2-raw``, ``gsm8k``);
            default ``$PROJQ_DATA_ROOT`` or ``data``.
        template: Prompt template; ``auto``: the checkpoint's training template, else alpaca.
        limit: Score only the first rows of each choice/math task and windows of each text.
        choice_mode: Multiple choice by answer log-likelihood (fast), by generation, or both.
        seqlen: Perplexity window length (default: the model's context, at most 2048 tokens).
        stride: Perplexity window step (default ``seqlen // 2``).
        batch_size: Sequences per forward pass.
        device: auto, cpu, cuda, cuda:1, ...
        dtype: Compute dtype; ``auto``: bfloat16 on CUDA, float32 elsewhere.
        output: JSON file to write the results to.
    """
    if sum(x is not None for x in (ckpt_path, artifact, model)) != 1:
        raise ValueError("give exactly one of --ckpt_path, --artifact or --model")
    if adapter_init and artifact is None:
        raise ValueError("--adapter_init applies to --artifact only")
    resolved = [resolve_task(spec, data_root) for spec in tasks]  # bad task names fail before loading
    trained_template = "alpaca"
    if ckpt_path is not None:
        trained = load_trained(ckpt_path, artifact_dir)
        net, tokenizer, trained_template = trained.model, trained.tokenizer, trained.template
    elif artifact is not None:
        net, tokenizer = artifact_model(artifact, adapter_init)
    else:
        net, tokenizer = hf_model(model, gguf_file)
    template = trained_template if template == "auto" else template
    net = place(net, resolve_device(device), dtype)
    settings = EvalSettings(limit, choice_mode, seqlen, stride, batch_size)
    results = evaluate(net, tokenizer, resolved, template, settings, progress=True)
    print(scores_table({ckpt_path or artifact or model: results}))
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=2))
    return results


def gap_closed(stages: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float | None]]:
    """Per stage and ``task/metric``: ``(m_quantized − m_stage) / (m_quantized − m_float)`` in
    percent; ``None`` where quantization did not make the metric worse (no gap to close)."""
    fp, q = stages["float"], stages["quantized"]
    out = {}
    for stage, results in stages.items():
        out[stage] = {}
        for task, metrics in results.items():
            for metric, value in metrics.items():
                if metric in COUNTS or metric == "unparsed" or metric not in fp.get(task, {}):
                    continue
                gap = q[task][metric] - fp[task][metric]
                worse = gap > 0 if metric == "perplexity" else gap < 0
                # + 0.0 turns -0.0 into 0.0 (no "-0 %" on the plot)
                out[stage][f"{task}/{metric}"] = (
                    100 * (q[task][metric] - value) / gap + 0.0 if worse else None
                )
    return out


def plot_recovery(report: dict[str, Any], path: str | Path) -> None:
    """One panel per ``task/metric``: its value at each stage, the float model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    keys = [k for k in report["gap_closed"]["fine-tuned"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        task, metric = key.split("/")
        names = [s for s in stages if s != "float"]
        values = [stages[s][task][metric] for s in names]
        ax.bar(range(len(names)), values, color=["#b0b0b0", "#7fa7d9", "#2060b0"][: len(names)])
        ax.axhline(stages["float"][task][metric], color="black", linestyle="--", label="float")
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        closed = report["gap_closed"]["fine-tuned"][key]
        title = key if closed is None else f"{key}\nfine-tuned closes {closed:.0f}% of the gap"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stage_models(ckpt_path: str, artifact_dir: str | None) -> dict[str, Callable[[], Loaded] | None]:
    """A loader per stage of a checkpoint, each building its model afresh; ``initialized`` is None
    when the adapter started at ``B = 0`` (the standard init), where step 0 is the quantized model."""
    ckpt = read_fit_checkpoint(ckpt_path, artifact_dir)
    template, artifact, init = ckpt.template, ckpt.artifact, ckpt.adapter.init
    check_base(artifact, ckpt.base)  # the float stage must be the model the artifact was made from

    def fine_tuned() -> Loaded:
        trained = build_trained(ckpt)
        return trained.model, trained.tokenizer, template

    return {
        "float": lambda: (*load_model_and_tokenizer(ckpt.base), template),
        "quantized": lambda: (*artifact_model(artifact, False), template),
        "initialized": (
            (lambda: (*artifact_model(artifact, True), template)) if init == "compensation" else None
        ),
        "fine-tuned": fine_tuned,
    }


def run_report(
    ckpt_path: str,
    tasks: list[str],
    output: str,
    artifact_dir: str | None = None,
    data_root: str = DATA_ROOT,
    limit: int | None = None,
    choice_mode: ChoiceMode = "loglik",
    seqlen: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
) -> dict[str, Any]:
    """The recovery report of a fit checkpoint: ``recovery.json``, ``recovery.png`` and a table.

    Args:
        ckpt_path: A fit checkpoint.
        tasks: Tasks, as for ``projq-train eval``.
        output: Directory for ``recovery.json`` and ``recovery.png``.
        artifact_dir: Where the checkpoint's artifact is (default: the one it was trained with).
        data_root: Folder with the task data (see ``projq-train eval``).
        limit: Score only the first rows of each choice/math task and windows of each text.
        choice_mode: Multiple choice by answer log-likelihood (fast), by generation, or both.
        seqlen: Perplexity window length (default: the model's context, at most 2048 tokens).
        stride: Perplexity window step (default ``seqlen // 2``).
        batch_size: Sequences per forward pass.
        device: auto, cpu, cuda, cuda:1, ...
        dtype: Compute dtype; ``auto``: bfloat16 on CUDA, float32 elsewhere.
    """
    resolved = [resolve_task(spec, data_root) for spec in tasks]
    settings = EvalSettings(limit, choice_mode, seqlen, stride, batch_size)
    plotting = importlib.util.find_spec("matplotlib") is not None
    if not plotting:
        log.warning("matplotlib is not installed: no recovery.png (pip install 'projq-train[plots]')")
    stages = {}
    for stage, loader in stage_models(ckpt_path, artifact_dir).items():
        log.info("recovery report: evaluating the %s model", stage)
        if loader is None:
            stages[stage] = stages["quantized"]
        else:
            stages[stage] = evaluate_loaded(loader, resolved, device, dtype, settings)
    report = {"checkpoint": ckpt_path, "stages": stages, "gap_closed": gap_closed(stages)}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recovery.json").write_text(json.dumps(report, indent=2))
    if plotting:
        plot_recovery(report, out / "recovery.png")
    print(scores_table(stages))
    return report


def evaluate_loaded(
    loader: Callable[[], Loaded],
    tasks: list[Task],
    device: str,
    dtype: str,
    settings: EvalSettings,
) -> dict[str, dict[str, float]]:
    """Build a model, score it, and free it before the next one is built."""
    model, tokenizer, template = loader()
    model = place(model, resolve_device(device), dtype)
    results = evaluate(model, tokenizer, tasks, template, settings)
    del model
    gc.collect()
    return results
