"""Exports of a fit checkpoint: peft adapter, merged model, re-quantized GPTQ layout, refusals."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import projq_train.cli as cli
from projq_train.artifact import read_metadata
from projq_train.checkpoint import load_trained
from projq_train.config import ModelConfig
from projq_train.export import load_peft_export, load_quantized_export, run_export
from projq_train.integrity import contents_digest
from projq_train.lora import adapter_layers
from projq_train.models import load_model_and_tokenizer
from projq_train.quant.linear import QuantLinear
from tests.conftest import flip_a_bit_of
from tests.test_fit import TINY_FIT, fit_args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of the tiny recipe after a few steps (adapters moved away from their init),
    whose base is the tiny model saved as a local float checkpoint."""
    root = tmp_path_factory.mktemp("fit")
    config = yaml.safe_load(TINY_FIT.read_text())["model"]["base"]["config"]
    model, tokenizer = load_model_and_tokenizer(ModelConfig(config=config))
    model.save_pretrained(root / "float-base")
    tokenizer.save_pretrained(root / "float-base")
    base = [f"--model.base.name_or_path={root / 'float-base'}", "--model.base.config=null"]
    cli.main(["fit", "--config", str(TINY_FIT), *fit_args(root, 4), *base, "--trainer.val_check_interval=4"])
    return root / "checkpoints" / "last.ckpt"


def export(checkpoint, tmp_path, fmt, **kwargs):
    return run_export(checkpoint, fmt, tmp_path / fmt, eval_samples=2, eval_seqlen=64, **kwargs)


def test_peft_export_reloads_with_peft_and_matches_the_trained_model(checkpoint, tmp_path):
    report = export(checkpoint, tmp_path, "peft")
    out = tmp_path / "peft"
    assert {"adapter_model.safetensors", "adapter_config.json", "projq_artifact.json"} <= {
        p.name for p in out.iterdir()
    }
    assert report["logit_rel_error"] < 1e-6 and report["top1_agreement"] == 1.0
    reloaded = load_peft_export(out)
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == 14
    assert json.loads((out / "fidelity.json").read_text()) == report


def test_peft_export_can_be_moved_and_loads_on_its_float_base_with_auto_peft(checkpoint, tmp_path):
    from peft import AutoPeftModelForCausalLM

    export(checkpoint, tmp_path, "peft")
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.move(tmp_path / "peft", moved)
    packed = load_peft_export(moved)  # the packed base travels inside the export
    on_float = AutoPeftModelForCausalLM.from_pretrained(moved)  # the base recorded for transformers
    assert json.loads((moved / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (checkpoint.parents[1] / "float-base").resolve()
    )
    trained = {k: v for k, v in packed.state_dict().items() if "lora_" in k}
    loaded = {k: v for k, v in on_float.state_dict().items() if "lora_" in k}
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    float_base = AutoModelForCausalLM.from_pretrained(checkpoint.parents[1] / "float-base")
    under = {k.replace(".base_layer", ""): v for k, v in on_float.get_base_model().state_dict().items()}
    for name, weight in float_base.state_dict().items():  # under the adapters: the float model itself
        torch.testing.assert_close(under[name], weight, rtol=0, atol=0)


def test_merged_export_loads_without_projq_train(checkpoint, tmp_path):
    report = export(checkpoint, tmp_path, "merged", dtype="float32")
    assert report["logit_rel_error"] < 1e-4
    ids = torch.randint(3, 259, (1, 12))
    trained = load_trained(checkpoint).model
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}).eval()\n"
        f"AutoTokenizer.from_pretrained({str(tmp_path / 'merged')!r})\n"
        f"ref = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad():\n"
        "    logits = model(input_ids=ref['ids']).logits\n"
        "torch.testing.assert_close(logits, ref['logits'], atol=1e-4, rtol=1e-4)\n"
        "assert not any(m.startswith('projq_train') for m in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_merged_bf16_export_drifts_only_by_rounding(checkpoint, tmp_path):
    report = export(checkpoint, tmp_path, "merged")
    assert report["dtype"] == "bfloat16" and 0 < report["logit_rel_error"] < 0.05


@pytest.mark.parametrize("bits", [4, 2])
def test_quantized_export_writes_the_gptq_layout_and_reloads(checkpoint, tmp_path, bits):
    report = export(checkpoint, tmp_path, "quantized", bits=bits)
    out = tmp_path / "quantized"
    qconfig = json.loads((out / "quantize_config.json").read_text())
    assert qconfig["bits"] == bits and qconfig["checkpoint_format"] == "gptq_v2"
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qconfig
    model = load_quantized_export(out)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.qweight.dtype == torch.int32
    assert q_proj.qweight.shape == (128 * bits // 32, 128)
    assert report["bits"] == bits and report["logit_rel_error"] > 0 and report["ppl_exported"] < float("inf")


def test_quantized_export_drifts_less_at_more_bits(checkpoint, tmp_path):
    drift = {b: export(checkpoint, tmp_path / str(b), "quantized", bits=b)["logit_rel_error"] for b in (2, 4)}
    assert drift[4] < drift[2]


def test_max_drift_fails_the_export_but_keeps_the_files(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="exceeds --max_drift"):
        export(checkpoint, tmp_path, "merged", max_drift=1e-9)
    assert (tmp_path / "merged" / "fidelity.json").is_file()


def test_max_drift_fails_on_a_nan_drift(checkpoint, tmp_path, monkeypatch):
    import projq_train.export as export_module

    monkeypatch.setattr(export_module, "fidelity", lambda *a, **k: {"logit_rel_error": float("nan")})
    with pytest.raises(ValueError, match="exceeds --max_drift"):
        export(checkpoint, tmp_path, "peft", max_drift=0.5)


class RunsCode:
    """Unpickling this would create ``marker``: what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_checkpoint_is_refused_without_running_its_code(checkpoint, tmp_path, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    marker = tmp_path / "code-ran"
    ckpt["hyper_parameters"]["payload"] = RunsCode(marker)
    crafted = tmp_path / "crafted.ckpt"
    torch.save(ckpt, crafted)
    text = tmp_path / "wiki.test.raw"
    text.write_text("some text to score " * 50)
    for command in (
        ["export", f"--ckpt_path={crafted}", "--format=peft", f"--output={tmp_path / 'out'}"],
        ["eval", f"--ckpt_path={crafted}", f"--tasks=[wikitext2={text}]"],
    ):
        with pytest.raises(SystemExit, match="holds objects other than tensors and plain data"):
            cli.main(command)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_corrupt_or_non_finite_checkpoints_are_refused_before_anything_is_written(checkpoint, tmp_path):
    data = checkpoint.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.ckpt is not a readable checkpoint"):
        export(truncated, tmp_path, "peft")
    ckpt = torch.load(checkpoint, weights_only=True)
    name = next(k for k in ckpt["state_dict"] if "lora_B" in k)
    ckpt["state_dict"][name][0, 0] = float("nan")
    ckpt["projq"]["checksum"] = contents_digest(ckpt)  # written so, not corrupted afterwards
    poisoned = tmp_path / "nan.ckpt"
    torch.save(ckpt, poisoned)
    with pytest.raises(ValueError, match=r"nan.ckpt .*holds NaN or infinite values; nothing is exported"):
        export(poisoned, tmp_path, "merged")
    assert not (tmp_path / "peft").exists() and not (tmp_path / "merged").exists()


def test_export_refuses_a_missing_or_mismatched_artifact(checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=True)
    artifact = next((checkpoint.parents[1] / "artifacts").iterdir())
    copy = tmp_path / "artifacts" / artifact.name
    shutil.copytree(artifact, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["hash"] = "f" * 64
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is not the artifact"):
        load_trained(checkpoint, artifact_dir=tmp_path / "artifacts")
    with pytest.raises(FileNotFoundError, match="is missing"):
        load_trained(checkpoint, artifact_dir=tmp_path / "nowhere")
    assert ckpt["projq"]["base_id"] == artifact.name


def test_export_command_prints_the_report_and_errors_clearly(checkpoint, tmp_path, capsys):
    args = ["export", f"--ckpt_path={checkpoint}", "--format=peft", f"--output={tmp_path / 'p'}"]
    cli.main([*args, "--eval_samples=2", "--eval_seqlen=64"])
    assert json.loads(capsys.readouterr().out)["format"] == "peft"
    before = {p: p.read_bytes() for p in (tmp_path / "p").rglob("*") if p.is_file()}
    with pytest.raises(
        SystemExit, match="exists and is not empty; choose another --output or pass --overwrite"
    ):
        cli.main(args)  # nothing in it is touched
    assert {p: p.read_bytes() for p in (tmp_path / "p").rglob("*") if p.is_file()} == before
    cli.main([*args, "--eval_samples=2", "--eval_seqlen=64", "--overwrite=true"])
    with pytest.raises(SystemExit, match="is missing"):
        cli.main([*args[:-1], f"--output={tmp_path / 'q'}", f"--artifact_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(SystemExit):
        cli.main([*args, "--format=onnx"])


def test_quantized_export_of_a_model_with_tied_embeddings(tmp_path):
    root = tmp_path / "fit"
    config = {**yaml.safe_load(TINY_FIT.read_text())["model"]["base"]["config"], "tie_word_embeddings": True}
    cli.main(
        ["fit", "--config", str(TINY_FIT), *fit_args(root, 2), f"--model.base.config={json.dumps(config)}"]
    )
    report = export(root / "checkpoints" / "last.ckpt", tmp_path, "quantized", bits=4)
    model = load_quantized_export(tmp_path / "quantized")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # closer to the trained logits than zero logits are (the top-1 agreement of a 4-bit tiny random
    # model is chaotic: 0.5 on one machine, above it on another)
    assert 0 < report["logit_rel_error"] < 1 and report["ppl_exported"] < float("inf")


def test_flipped_bits_in_checkpoints_and_exports_are_refused_naming_the_file(checkpoint, tmp_path, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    flipped = tmp_path / "flipped.ckpt"
    shutil.copy(checkpoint, flipped)
    flip_a_bit_of(flipped, next(v for k, v in ckpt["state_dict"].items() if "lora_B" in k))
    with pytest.raises(ValueError, match="flipped.ckpt: its contents differ from what was written"):
        export(flipped, tmp_path, "peft")
    with pytest.raises(SystemExit):  # validate: refused before the model is built
        cli.main(
            [
                "validate",
                "--config",
                str(TINY_FIT),
                *fit_args(checkpoint.parents[1], 4),
                f"--ckpt_path={flipped}",
            ]
        )
    assert capsys.readouterr().err.startswith(f"error: {flipped}: its contents differ from what was written")

    export(checkpoint, tmp_path, "peft")
    adapter = tmp_path / "peft" / "adapter_model.safetensors"
    listed = json.loads((tmp_path / "peft" / "projq_checksums.json").read_text()).keys()
    assert {adapter.name, "base/quantized.safetensors", "base/float.safetensors"} <= listed
    flip_a_bit_of(adapter, next(v for k, v in load_file(str(adapter)).items() if "lora_B" in k))
    with pytest.raises(ValueError, match="adapter_model.safetensors: its contents differ"):
        load_peft_export(tmp_path / "peft")


def test_a_mixed_precision_base_packs_trains_resumes_exports_and_is_estimated(tmp_path, capsys):
    """Widths and group sizes under a bit budget, ranks under the adapter-parameter budget, 8-bit
    scales and rotated inputs (the quantized export re-quantizes with fp16 scales, unrotated)."""
    mixed = [
        "--model.quant.bits=null",
        "--model.quant.budget_bits=3.0",
        "--model.quant.group_size_choices=[32,64,-1]",
        "--model.quant.method=gptq",
        "--model.quant.allocate_ranks=true",
        "--model.quant.scale_bits=8",
        "--model.quant.rotate_inputs=true",
    ]
    cli.main(["fit", "--config", str(TINY_FIT), *fit_args(tmp_path, 2), *mixed])
    cli.main(["fit", "--config", str(TINY_FIT), *fit_args(tmp_path, 4), *mixed, "--ckpt_path=last"])
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 4
    trained = load_trained(checkpoint)
    widths = {m.bits for m in trained.model.modules() if isinstance(m, QuantLinear)}
    assert len(widths) > 1 and widths <= {2, 3, 4}  # packed layers of several widths in one model
    scales = {m.scales.dtype for m in trained.model.modules() if isinstance(m, QuantLinear)}
    assert scales == {torch.float8_e4m3fn}  # through fit, checkpoint and resume
    assert all(m.rotated_inputs for m in trained.model.modules() if isinstance(m, QuantLinear))
    configuration = read_metadata(trained.artifact)["configuration"]  # recorded with the artifact
    assert set(configuration["bits"].values()) == widths
    grids = {
        n: (m.bits, m.group_size) for n, m in trained.model.named_modules() if isinstance(m, QuantLinear)
    }
    grids = {n.removeprefix("base_model.model.").removesuffix(".base_layer"): g for n, g in grids.items()}
    assert {n: (configuration["bits"][n], configuration["group_sizes"][n]) for n in grids} == grids
    assert len({g for _, g in grids.values()}) > 1  # and of several group sizes
    layers = adapter_layers(trained.model)
    ranks = {n: layer.r["default"] for n, layer in layers.items()}
    assert {layer.scaling["default"] for layer in layers.values()} == {16 / 4}  # alpha / rank for all
    assert ranks == configuration["ranks"] and len(set(ranks.values())) > 1  # adapters of several ranks
    sizes = {n: layer.in_features + layer.out_features for n, layer in layers.items()}
    assert sum(r * sizes[n] for n, r in ranks.items()) <= 4 * sum(sizes.values())  # rank 4's parameters
    peft_report = export(checkpoint, tmp_path, "peft")  # peft's rank_pattern carries the ranks
    assert peft_report["logit_rel_error"] < 1e-6 and peft_report["top1_agreement"] == 1.0
    merged_report = export(checkpoint, tmp_path, "merged", dtype="float32")  # plain weights, W's basis
    assert merged_report["logit_rel_error"] < 1e-4
    # estimate shows it and counts the packed weights at those widths, byte for byte
    estimate = ["estimate", "--config", str(TINY_FIT), *fit_args(tmp_path, 4), *mixed, "--json"]
    capsys.readouterr()  # what the fits printed
    cli.main([*estimate, "--artifact", str(trained.artifact)])
    shown = json.loads(capsys.readouterr().out)
    assert shown["configuration"]["bits"] == configuration["bits"]
    packed = [
        t
        for m in trained.model.modules()
        if isinstance(m, QuantLinear)
        for t in m.packed().tensors().values()
    ]
    assert shown["fit"]["host"]["packed_weights"] == sum(t.numel() * t.element_size() for t in packed)
    cli.main([*estimate[:-1], "--artifact", str(trained.artifact)])
    text = capsys.readouterr().out
    assert "widths " in text and "layer   0  q " in text and str(trained.artifact) in text
    assert "ranks  " in text and f" r{ranks['model.layers.0.self_attn.q_proj']} " in text
    with pytest.raises(SystemExit):  # not this recipe's artifact: one line
        cli.main([*estimate, "--artifact", str(trained.artifact), "--model.adapter.rank=8"])
    assert capsys.readouterr().err.strip().endswith("group size 64 and rank 4; the recipe has 64 and 8")
    with pytest.raises(SystemExit):  # another model of the same modules: one line
        cli.main([*estimate, "--artifact", str(trained.artifact), "--model.base.config.vocab_size=300"])
    assert "was quantized from another model (llama, 2 layers, hidden 128, vocab" in capsys.readouterr().err
    report = export(checkpoint, tmp_path, "quantized")
    qconfig = json.loads((tmp_path / "quantized" / "quantize_config.json").read_text())
    assert qconfig["dynamic"] and all(rule.startswith("+:^model\\.layers") for rule in qconfig["dynamic"])
    reloaded = load_quantized_export(tmp_path / "quantized")
    by_name = {n: (m.bits, m.group_size) for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)}
    assert {m.scales.dtype for m in reloaded.modules() if isinstance(m, QuantLinear)} == {torch.float16}
    assert not any(m.rotated_inputs for m in reloaded.modules() if isinstance(m, QuantLinear))
    assert by_name == grids  # each module re-quantized on its own grid, read back from `dynamic`
    assert report["bits"] == {n: b for n, (b, _) in by_name.items()}
    assert 0 < report["logit_rel_error"] < 1 and report["ppl_exported"] < float("inf")
