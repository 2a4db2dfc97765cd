"""The ``projq-train`` command line.

``projq-train quantize --config recipe.yaml`` calibrates and quantizes a model and writes a
content-addressed artifact (reused when one with the same hash exists).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from jsonargparse import ArgumentParser, Namespace

from projq_train.artifact import (
    artifact_hash,
    find_artifact,
    model_hash,
    save_artifact,
)
from projq_train.config import CalibrationConfig, ModelConfig, QuantConfig
from projq_train.data.calibration import calibration_tokens
from projq_train.models import load_model_and_tokenizer
from projq_train.quant.calibrate import check_model_settings, format_report, quantize_model

log = logging.getLogger("projq_train")
SUBCOMMANDS = ("quantize",)


def quantize_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="projq-train quantize", description="Quantize a model and write an artifact."
    )
    parser.add_argument("--config", action="config", help="recipe YAML")
    parser.add_class_arguments(ModelConfig, "model")
    parser.add_class_arguments(QuantConfig, "quant")
    parser.add_class_arguments(CalibrationConfig, "calibration")
    parser.add_argument("--artifact_dir", type=str, default="artifacts", help="root directory of artifacts")
    parser.add_argument(
        "--device", type=str, default="auto", help="compute device: auto, cpu, cuda, cuda:1, ..."
    )
    return parser


def parse_recipe(parser: ArgumentParser, argv: list[str]) -> tuple[Namespace, Namespace]:
    """Parse and validate: returns the raw namespace and the one with dataclasses instantiated."""
    cfg = parser.parse_args(argv)
    try:
        return cfg, parser.instantiate(cfg)
    except ValueError as e:
        parser.error(str(e))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_quantize(raw: Namespace, cfg: Namespace) -> Path:
    """Load, calibrate and quantize per the recipe; return the artifact directory."""
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    check_model_settings(model, cfg.quant)
    ids = calibration_tokens(cfg.calibration, tokenizer)
    base_hash = model_hash(model)
    full_hash = artifact_hash(base_hash, ids, asdict(cfg.quant))
    existing = find_artifact(cfg.artifact_dir, full_hash)
    if existing is not None:
        log.info("artifact %s already exists for this model, calibration and settings; reusing it", existing)
        return existing
    device = resolve_device(cfg.device)
    modules, reports = quantize_model(model, ids, cfg.quant, device, cfg.calibration.batch_size)
    print(format_report(reports))
    recipe = {k: raw[k].as_dict() for k in ("model", "quant", "calibration")}
    path = save_artifact(
        cfg.artifact_dir,
        full_hash,
        modules,
        {
            "base_model_hash": base_hash,
            "recipe": recipe,
            "calibration_tokens": list(ids.shape),
            "device": str(device),
            "report": [asdict(r) for r in reports],
        },
    )
    log.info("wrote artifact %s", path)
    return path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] not in SUBCOMMANDS:
        sys.exit(
            f"usage: projq-train {{{','.join(SUBCOMMANDS)}}} --config recipe.yaml [--section.key value ...]"
        )
    parser = quantize_parser()
    raw, cfg = parse_recipe(parser, argv[1:])
    path = run_quantize(raw, cfg)
    print(json.dumps({"artifact": str(path)}))


if __name__ == "__main__":
    main()
