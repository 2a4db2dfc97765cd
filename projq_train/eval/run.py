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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from projq_train.checkpoint import load_trained
from projq_train.eval.harness import ChoiceMode, EvalSettings, evaluate
from projq_train.eval.models import Loaded, artifact_model, hf_model, place, stage_models
from projq_train.eval.tables import gap_closed, plot_recovery, scores_table
from projq_train.eval.tasks import DATA_ROOT, Task, resolve_task
from projq_train.models import resolve_device

log = logging.getLogger(__name__)


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
