"""Tables and plots of evaluation results: one markdown table for any set of models, and the
recovery report's gap closed per stage and its figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from projq_train.eval.harness import COUNTS


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
