"""`projq-train estimate` for every 7B/8B GPU recipe, as the table in README.

The recipes name hub models, which this machine cannot reach, so the script writes each
model's published ``config.json`` (the architecture fields the estimate reads) into
``runs/model-configs/<model>/`` and points the recipe there with an override; no weights are
involved. Prints a markdown table of the per-GPU peaks against the GPU the recipes are meant for.

    python benchmarks/estimate_recipes.py [--device_memory 24GB]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from projq_train.estimate import main as estimate
from projq_train.estimate import parse_memory

ROOT = Path(__file__).parents[1]
CONFIGS = {  # the hub repositories' config.json, architecture fields
    "meta-llama/Llama-2-7b-hf": LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen2.5-7B": Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=131072,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen3-8B": Qwen3Config(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
}
GiB = 1 << 30


def config_dir(repo: str) -> Path:
    path = ROOT / "runs" / "model-configs" / repo.replace("/", "--")
    CONFIGS[repo].save_pretrained(path)
    return path


def run(recipe: Path, repo: str) -> dict:
    out = io.StringIO()
    args = ["--config", str(recipe), "--model.base.name_or_path", str(config_dir(repo)), "--json"]
    with contextlib.redirect_stdout(out):
        estimate(args)
    return json.loads(out.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device_memory", default="24GB", help="the GPU the recipes are meant for")
    args = ap.parse_args()
    limit = parse_memory(args.device_memory)
    lines = [
        f"| recipe | batch × tokens | fit peak per GPU | of which activations | quantize at setup | "
        f"fits {args.device_memory} |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for recipe in sorted(ROOT.glob("recipes/*-[78]b-*-w[23].yaml")):
        text = recipe.read_text()
        repo = next(r for r in CONFIGS if f"name_or_path: {r}" in text)
        est = run(recipe, repo)
        fit, quant = est["fit"], est["quantize"]
        acts = fit["device"]["activations"] + fit["device"].get("checkpoint_recompute", 0)
        d = fit["details"]
        fits = "yes" if max(fit["peak_bytes"], quant["peak_bytes"]) <= limit else "no"
        lines.append(
            f"| {recipe.stem} | {d['batch_size']} × {d['seq_len']} | {fit['peak_bytes'] / GiB:.2f} GiB | "
            f"{acts / GiB:.2f} GiB | {quant['peak_bytes'] / GiB:.2f} GiB | {fits} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
