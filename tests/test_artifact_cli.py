"""Artifacts (round trip, reuse, atomic writes) and the quantize command."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import projq_train.artifact as artifact
import projq_train.cli as cli
from projq_train.artifact import (
    artifact_hash,
    find_artifact,
    load_artifact,
    load_quantized_model,
    model_hash,
    save_artifact,
)
from projq_train.config import CalibrationConfig, ModelConfig, QuantConfig
from projq_train.data.calibration import calibration_tokens
from projq_train.models import load_model_and_tokenizer
from projq_train.quant.calibrate import apply_quantized, quantize_model
from projq_train.quant.linear import QuantLinear
from tests.conftest import TINY

TINY_RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-quantize.yaml"


@pytest.fixture(scope="module")
def quantized_tiny():
    """A tiny model quantized in memory, with what an artifact needs."""
    mcfg = ModelConfig(config=TINY["llama"])
    model, tok = load_model_and_tokenizer(mcfg)
    base = model_hash(model)
    ids = calibration_tokens(CalibrationConfig(nsamples=4, seqlen=64), tok)
    qcfg = QuantConfig(method="projq", bits=3, group_size=32, rank=8, iters=2)
    modules, reports = quantize_model(model, ids, qcfg, progress=False)
    meta = {"base_model_hash": base, "recipe": {"model": asdict(mcfg)}}
    return model, modules, artifact_hash(base, ids, asdict(qcfg)), meta, ids


def test_artifact_round_trip_reproduces_quantized_model(tmp_path, quantized_tiny):
    model, modules, full_hash, meta, ids = quantized_tiny
    path = save_artifact(tmp_path, full_hash, modules, meta)
    assert path.name == full_hash[:16] and find_artifact(tmp_path, full_hash) == path
    loaded, meta_back = load_artifact(path)
    assert meta_back["codes_layout"] == "gptq-int32-packed" and set(meta_back["versions"]) >= {
        "torch",
        "transformers",
    }
    stored = load_file(str(path / "quantized.safetensors"))
    assert stored["model.layers.0.mlp.down_proj.qweight"].dtype == torch.int32
    for name, qm in modules.items():
        for key, t in qm.weight.tensors().items():
            assert torch.equal(loaded[name].weight.tensors()[key], t), (name, key)
        assert torch.equal(loaded[name].lora_B @ loaded[name].lora_A, qm.lora_B @ qm.lora_A)
    rebuilt, _, rebuilt_modules, _ = load_quantized_model(path)
    quant_linears = [m for m in rebuilt.modules() if isinstance(m, QuantLinear)]
    assert len(quant_linears) == len(modules) == 14
    assert not any(isinstance(m, nn.Linear) for m in rebuilt.model.layers.modules())
    fake_quantized = apply_quantized(
        load_model_and_tokenizer(ModelConfig(**meta["recipe"]["model"]))[0],
        rebuilt_modules,
        with_adapter=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, fake_quantized(ids).logits)


def test_artifact_of_an_older_format_is_refused_with_a_clear_message(tmp_path, quantized_tiny):
    _, modules, full_hash, meta, _ = quantized_tiny
    path = save_artifact(tmp_path, full_hash, modules, meta)
    recorded = json.loads((path / "metadata.json").read_text())
    recorded["format_version"] = 1
    (path / "metadata.json").write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="artifact format 1 is not 2.*quantize again"):
        load_artifact(path)


def test_artifact_refuses_a_different_base_model(tmp_path, quantized_tiny):
    _, modules, full_hash, meta, _ = quantized_tiny
    path = save_artifact(tmp_path, full_hash, modules, meta)
    recorded = json.loads((path / "metadata.json").read_text())
    recorded["recipe"]["model"]["seed"] = 1  # a different random model
    (path / "metadata.json").write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="is not the one this artifact was made from"):
        load_quantized_model(path)


def test_crashed_write_leaves_nothing_trusted(tmp_path, quantized_tiny, monkeypatch):
    _, modules, full_hash, meta, _ = quantized_tiny

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_artifact(tmp_path, full_hash, modules, meta)
    assert find_artifact(tmp_path, full_hash) is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not a complete projq-train artifact"):
        load_artifact(tmp_path / full_hash[:16])


def test_quantize_command_writes_then_reuses(tmp_path, monkeypatch, capsys):
    args = ["quantize", "--config", str(TINY_RECIPE), "--artifact_dir", str(tmp_path), "--quant.iters", "1"]
    cli.main(args)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    meta = json.loads((Path(out["artifact"]) / "metadata.json").read_text())
    assert meta["recipe"]["quant"]["iters"] == 1 and len(meta["report"]) == 14

    def must_not_run(*a, **k):
        raise AssertionError("quantized again although the artifact exists")

    monkeypatch.setattr(artifact, "quantize_model", must_not_run)
    cli.main(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quant": {"bitz": 3}}, "bitz"),
        ({"quant": {"bits": 5}}, "quant.bits must be one of"),
        ({"quant": {"method": "awq"}}, "method"),
        ({"calibration": {"nsamples": 0}}, "must be positive"),
        ({"colibration": {"nsamples": 2}}, "colibration"),
    ],
)
def test_malformed_recipe_is_one_clear_error(tmp_path, capsys, change, message):
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    for section, values in change.items():
        recipe.setdefault(section, {}).update(values)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--config", str(bad), "--artifact_dir", str(tmp_path / "a")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_unknown_subcommand_is_refused():
    with pytest.raises(SystemExit, match="usage: projq-train"):
        cli.main(["quantise"])
