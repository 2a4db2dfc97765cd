"""Artifacts (round trip, reuse, atomic writes) and the quantize command."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import projq_train.artifact as artifact
import projq_train.cli as cli
import projq_train.models as models
import projq_train.quant.calibrate as calibrate
import projq_train.weights as weights
from projq_train.artifact import (
    check_base,
    find_artifact,
    find_or_quantize,
    load_artifact,
    load_quantized_model,
    save_artifact,
)
from projq_train.config import AdapterConfig, CalibrationConfig, ModelConfig, QuantConfig
from projq_train.data.calibration import calibration_tokens
from projq_train.integrity import CorruptFileError, file_checksums
from projq_train.models import decoder_layers, load_model_and_tokenizer
from projq_train.module import prepare_model
from projq_train.quant.calibrate import apply_quantized, quantize_model
from projq_train.quant.linear import QuantLinear
from tests.conftest import TINY, artifact_root_entries, flip_a_bit_of

TINY_RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-quantize.yaml"


MODEL = ModelConfig(config=TINY["llama"])
CALIB = CalibrationConfig(nsamples=4, seqlen=64)
QUANT, RANK = QuantConfig(method="projq", bits=3, group_size=32, iters=2), 8


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """An artifact made by streaming the tiny model, recording how many decoder layers held float
    weights whenever a layer was read."""
    held = []
    real = calibrate.materialize

    def counting(module, prefix, source, dtype):
        real(module, prefix, source, dtype)
        layers = decoder_layers(root[0])
        held.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in layers))

    root = []
    real_quantize = calibrate.quantize_model

    def spy(model, *args, **kwargs):
        root.append(model)
        return real_quantize(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibrate, "materialize", counting)  # the embeddings
        mp.setattr(weights, "materialize", counting)  # each decoder layer (weights.load_to_device)
        mp.setattr(artifact, "quantize_model", spy)
        path = find_or_quantize(MODEL, QUANT, RANK, CALIB, tmp_path_factory.mktemp("a"), torch.device("cpu"))
    return path, held


def test_streamed_quantization_holds_one_layer_and_equals_the_in_memory_one(streamed):
    path, held = streamed
    assert held and max(held) == 1  # never two decoder layers' float weights at once
    model, tok = load_model_and_tokenizer(MODEL)
    ids = calibration_tokens(CALIB, tok)
    in_memory, _ = quantize_model(model, ids, QUANT, RANK, progress=False)
    loaded, meta = load_artifact(path)
    assert meta["codes_layout"] == "gptq-int32-packed" and set(meta["versions"]) >= {"torch", "transformers"}
    assert meta["base_identity"].startswith("random:") and len(loaded) == len(in_memory) == 14
    stored = load_file(str(path / "quantized.safetensors"))
    assert stored["model.layers.0.mlp.down_proj.qweight"].dtype == torch.int32
    for name, qm in in_memory.items():
        for key, t in qm.weight.tensors().items():
            assert torch.equal(loaded[name].weight.tensors()[key], t), (name, key)
        torch.testing.assert_close(loaded[name].lora_B @ loaded[name].lora_A, qm.lora_B @ qm.lora_A)


def test_artifact_loads_without_the_base_and_reproduces_the_quantized_model(streamed, monkeypatch):
    path, _ = streamed

    def no_base(*args, **kwargs):
        raise AssertionError("the base model was read")

    monkeypatch.setattr(weights, "weight_source", no_base)
    monkeypatch.setattr(models, "load_model_and_tokenizer", no_base)
    rebuilt, tok, modules, meta = load_quantized_model(path)
    assert len([m for m in rebuilt.modules() if isinstance(m, QuantLinear)]) == 14
    assert not any(isinstance(m, nn.Linear) for m in rebuilt.model.layers.modules())
    assert tok("hello").input_ids == models.byte_tokenizer()("hello").input_ids
    monkeypatch.undo()
    fake_quantized = apply_quantized(load_model_and_tokenizer(MODEL)[0], modules, with_adapter=False)
    ids = torch.randint(0, 259, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, fake_quantized(ids).logits)


def test_a_local_safetensors_checkpoint_streams_to_the_same_quantization(streamed, tmp_path):
    model, tok = load_model_and_tokenizer(MODEL)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    local = ModelConfig(name_or_path=str(tmp_path / "base"))
    path = find_or_quantize(local, QUANT, RANK, CALIB, tmp_path / "a", torch.device("cpu"))
    modules, meta = load_artifact(path)
    assert meta["base_identity"].startswith("files:")
    for name, qm in load_artifact(streamed[0])[0].items():
        assert torch.equal(modules[name].weight.tensors()["qweight"], qm.weight.tensors()["qweight"]), name
    model.model.norm.weight.data += 1  # other weights: another identity, so another artifact
    model.save_pretrained(tmp_path / "base")
    assert weights.base_identity(local) != meta["base_identity"]


def test_a_tied_head_is_stored_once_and_tied_again(tmp_path):
    tied = ModelConfig(config={**TINY["llama"], "tie_word_embeddings": True})
    path = find_or_quantize(tied, QUANT, RANK, CALIB, tmp_path, torch.device("cpu"))
    assert "lm_head.weight" not in load_file(str(path / "float.safetensors"))
    rebuilt, _, modules, _ = load_quantized_model(path)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    fake_quantized = apply_quantized(load_model_and_tokenizer(tied)[0], modules, with_adapter=False)
    ids = torch.randint(0, 259, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, fake_quantized(ids).logits)


class FloatAllocations(TorchDispatchMode):
    """Records the shapes of the floating-point tensors ops create off the meta device."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta:
                self.shapes.add(tuple(t.shape))
        return out


def test_fit_from_an_artifact_never_allocates_a_quantized_linears_float_weight(streamed):
    path, _ = streamed
    with FloatAllocations() as seen:
        model, base_id = prepare_model(
            MODEL, QUANT, AdapterConfig(rank=RANK), CALIB, path.parent, torch.device("cpu")
        )
    assert base_id == path.name
    quantized = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, QuantLinear)}
    assert quantized and not quantized & {s for shape in seen.shapes for s in (shape, shape[::-1])}
    with FloatAllocations() as reference:  # the check can fail: a float model has those tensors
        load_model_and_tokenizer(MODEL)
    assert quantized <= reference.shapes


def test_artifact_of_an_older_format_is_refused_with_a_clear_message(streamed, tmp_path):
    path = tmp_path / "old"
    shutil.copytree(streamed[0], path)
    recorded = json.loads((path / "metadata.json").read_text())
    recorded["format_version"] = 3
    (path / "metadata.json").write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="artifact format 3 is not 4.*quantize again"):
        load_artifact(path)


def test_a_corrupt_or_non_finite_artifact_is_refused_naming_the_file(streamed, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(streamed[0], path)
    tensors = load_file(str(path / "quantized.safetensors"))
    assert json.loads((path / "metadata.json").read_text())["checksums"].keys() == {
        "quantized.safetensors",
        "float.safetensors",
    }
    flip_a_bit_of(
        path / "quantized.safetensors", next(v for k, v in tensors.items() if k.endswith(".scales"))
    )
    with pytest.raises(
        CorruptFileError, match="quantized.safetensors: its contents differ from what was written"
    ):
        load_quantized_model(path)
    # written with a NaN scale (and its checksum): refused as non-finite
    name = next(k for k in tensors if k.endswith(".scales"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(path / "quantized.safetensors"))
    meta = json.loads((path / "metadata.json").read_text())
    meta["checksums"] = file_checksums(path, ["quantized.safetensors", "float.safetensors"])
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptFileError, match=f"quantized.safetensors: tensor {name} holds NaN"):
        load_quantized_model(path)


def test_a_base_that_is_not_the_artifacts_is_refused(streamed):
    path, _ = streamed
    check_base(path, MODEL)
    with pytest.raises(ValueError, match="is not the one this artifact was made from"):
        check_base(path, ModelConfig(config=TINY["llama"], seed=1))  # a different random model


def test_crashed_write_leaves_nothing_trusted(tmp_path, streamed, monkeypatch):
    modules, meta = load_artifact(streamed[0])
    model, tok, _, _ = load_quantized_model(streamed[0])

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_artifact(tmp_path, meta["hash"], modules, meta, {}, model.config, tok)
    assert find_artifact(tmp_path, meta["hash"]) is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not a complete projq-train artifact"):
        load_artifact(tmp_path / meta["hash"][:16])


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


def test_a_recipe_run_from_any_working_directory_finds_its_artifact(tmp_path, monkeypatch, capsys):
    recipes = tmp_path / "project" / "recipes"
    recipes.mkdir(parents=True)
    recipe = recipes / "quantize.yaml"
    recipe.write_text(TINY_RECIPE.read_text())  # artifact_dir: ../artifacts
    found = []
    for cwd in (tmp_path / "project", recipes, tmp_path):
        monkeypatch.chdir(cwd)
        cli.main(["quantize", "--config", str(recipe), "--quant.iters", "1"])
        found.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["artifact"])
        monkeypatch.setattr(artifact, "quantize_model", None)  # the later runs must not quantize
    made = artifact_root_entries(tmp_path / "project" / "artifacts")
    assert len(made) == 1 and found == [str(made[0])] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["project"]  # nothing written where it ran
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["artifacts", "recipes"]
    assert [p.name for p in recipes.iterdir()] == ["quantize.yaml"]


def test_recipe_paths_become_absolute_and_hub_names_builtins_and_aliases_stay(tmp_path):
    (tmp_path / "rows").mkdir()
    settings = {
        "trainer": {
            "default_root_dir": "../runs/x",
            "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"dirpath": "ckpts", "every": 2}}],
        },
        "model": {
            "base": {"name_or_path": "Qwen/Qwen2.5-7B", "dtype": "bfloat16"},
            "calibration": {"dataset": "builtin:sample"},
            "artifact_dir": "/elsewhere/artifacts",
        },
        "data": {
            "class_path": "projq_train.data.instruct.InstructionData",
            "init_args": {"path": "rows", "val_path": "yahma/alpaca-cleaned", "test_path": "data/test.jsonl"},
        },
        "ckpt_path": "last",
    }
    resolved = cli.resolve_recipe_paths(settings, tmp_path)
    assert resolved["trainer"]["default_root_dir"] == str(tmp_path.parent / "runs" / "x")
    assert resolved["trainer"]["callbacks"][0]["init_args"] == {
        "dirpath": str(tmp_path / "ckpts"),
        "every": 2,
    }
    assert resolved["model"] == settings["model"]  # a hub name, a builtin, an absolute path
    assert resolved["data"]["init_args"] == {
        "path": str(tmp_path / "rows"),  # exists next to the recipe
        "val_path": "yahma/alpaca-cleaned",  # a hub dataset
        "test_path": str(tmp_path / "data" / "test.jsonl"),  # a file name, even where it is missing
    }
    assert (
        resolved["ckpt_path"] == "last" and resolved["data"]["class_path"] == settings["data"]["class_path"]
    )


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


def test_top_level_help_lists_the_subcommands_and_an_unknown_one_is_refused(capsys):
    for args in ([], ["-h"], ["--help"]):
        cli.main(args)  # returns: exit status 0
        out = capsys.readouterr().out
        assert all(f"  {name} " in out for name in cli.SUBCOMMANDS)
    with pytest.raises(SystemExit) as refused:
        cli.main(["quantise"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.startswith(
        "projq-train: error: unknown subcommand 'quantise'; did you mean quantize?"
    )


def test_top_level_help_is_fast_and_imports_no_torch():
    import subprocess
    import sys

    code = "import sys; from projq_train.cli import main; main(['--help']); assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "projq-train <subcommand>" in done.stdout, done.stderr


def test_partial_or_foreign_folders_and_stale_temporaries_never_block_a_write(streamed, tmp_path):
    name = streamed[0].name
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / "notes.txt").write_text("not an artifact")  # a partial or foreign folder
    (tmp_path / f".{name}.tmp-killed").mkdir()  # left by a writer killed mid-way
    path = find_or_quantize(MODEL, QUANT, RANK, CALIB, tmp_path, torch.device("cpu"))
    full_hash = json.loads((path / "metadata.json").read_text())["hash"]
    assert path == tmp_path / name and find_artifact(tmp_path, full_hash) == path
    assert not list(tmp_path.glob(f".{name}.tmp-*"))
    (aside,) = tmp_path.glob(f"{name}.replaced-*")
    assert (aside / "notes.txt").read_text() == "not an artifact"  # moved aside, not lost
    load_quantized_model(path)


def test_two_processes_wanting_one_artifact_quantize_it_once(tmp_path, monkeypatch):
    import threading

    calls = []
    real = artifact.quantize_model

    def slow(*args, **kwargs):
        calls.append(threading.get_ident())
        out = real(*args, **kwargs)
        threading.Event().wait(1.0)  # the other one arrives while this one still writes
        return out

    monkeypatch.setattr(artifact, "quantize_model", slow)
    paths = []
    workers = [
        threading.Thread(
            target=lambda: paths.append(find_or_quantize(MODEL, QUANT, RANK, CALIB, tmp_path, "cpu"))
        )
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and len(paths) == 2 and paths[0] == paths[1]
    load_quantized_model(paths[0])


def test_two_processes_quantizing_different_artifacts_under_one_root_do_not_wait(tmp_path, monkeypatch):
    import threading

    inside = [threading.Event(), threading.Event()]
    met = []
    real = artifact.quantize_model

    def meet(*args, **kwargs):
        me = 0 if args[2].bits == 2 else 1
        inside[me].set()
        met.append(inside[1 - me].wait(timeout=30))  # the other is quantizing at the same time
        return real(*args, **kwargs)

    monkeypatch.setattr(artifact, "quantize_model", meet)
    settings = [QuantConfig(method="gptq", bits=b, group_size=32) for b in (2, 3)]
    paths = []
    workers = [
        threading.Thread(
            target=lambda q=q: paths.append(find_or_quantize(MODEL, q, RANK, CALIB, tmp_path, "cpu"))
        )
        for q in settings
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert met == [True, True] and len(set(paths)) == 2
    assert sorted(p.name for p in (tmp_path / artifact.LOCKS).iterdir()) == sorted(p.name for p in paths)


def test_tiny_quantize_recipe_makes_the_artifact_the_tiny_fit_recipe_uses():
    from projq_train.models import byte_tokenizer

    def artifact_of(model: dict, quant: dict, rank: int, calibration: dict) -> str:
        ids = calibration_tokens(CalibrationConfig(**calibration), byte_tokenizer())
        identity = weights.base_identity(ModelConfig(**model))
        return artifact.artifact_hash(
            identity, ids, artifact.quantization_settings(QuantConfig(**quant), rank)
        )

    made = yaml.safe_load(TINY_RECIPE.read_text())
    used = yaml.safe_load((TINY_RECIPE.parent / "tiny-cpu.yaml").read_text())["model"]
    assert artifact_of(
        made["model"], made["quant"], made["adapter"]["rank"], made["calibration"]
    ) == artifact_of(used["base"], used["quant"], used["adapter"]["rank"], used["calibration"])
    assert made["artifact_dir"] == used["artifact_dir"]


def test_the_default_compensation_keeps_the_hash_of_artifacts_made_before_the_key():
    """``quant.compensation``, ``quant.allocate_ranks``, ``quant.first_pass_iters``, ``quant.scale_bits``
    and ``quant.rotate_inputs`` are new: their defaults are left out of the hashed settings
    (artifacts already made are still found); other values (0 rounds too) are in them."""
    default = artifact.quantization_settings(QuantConfig(), 8)
    assert "scale_bits" not in default and "rotate_inputs" not in default
    rotated = artifact.quantization_settings(QuantConfig(rotate_inputs=True, scale_bits=8), 8)
    assert rotated == {**default, "rotate_inputs": True, "scale_bits": 8}
    fisher = artifact.quantization_settings(QuantConfig(compensation="fisher"), 8)
    assert "compensation" not in default and fisher == {**default, "compensation": "fisher"}
    ranks = artifact.quantization_settings(QuantConfig(allocate_ranks=True), 8)
    assert "allocate_ranks" not in default and ranks == {
        **default,
        "allocate_ranks": True,
        "allocation": "fisher-weighted output error",
        "first_pass_rank": "adapter rank",
    }
    rounds = {
        n: artifact.quantization_settings(QuantConfig(allocate_ranks=True, first_pass_iters=n), 8)
        for n in (None, 0, 1)
    }
    assert rounds[None] == ranks and rounds[0] == {**ranks, "first_pass_iters": 0}
    assert rounds[1] == {**ranks, "first_pass_iters": 1}


@pytest.mark.parametrize("method", ["projq", "gptq", "rtn"])
def test_an_artifact_with_ranks_allocated_from_a_first_pass_at_the_smallest_rank_is_not_reused(method):
    allocated = artifact.quantization_settings(QuantConfig(method=method, allocate_ranks=True), 8)
    assert allocated["first_pass_rank"] == "adapter rank"
    assert "first_pass_rank" not in artifact.quantization_settings(QuantConfig(method=method), 8)


def test_a_refresh_artifact_made_before_its_rounds_projected_the_hessian_is_not_reused():
    paper = artifact.quantization_settings(QuantConfig(), 8)
    refresh = artifact.quantization_settings(QuantConfig(mode="refresh"), 8)
    assert refresh == {**paper, "mode": "refresh", "refresh_rounds": "projected"}
    plain = artifact.quantization_settings(QuantConfig(mode="refresh", projection_strength=0.0), 8)
    assert plain == {**paper, "mode": "refresh", "projection_strength": 0.0}  # the earlier rounds' hash


def test_a_model_path_that_does_not_exist_is_one_clear_error():
    missing = ["--model.name_or_path=./no/such/model", "--model.config=null"]
    with pytest.raises(SystemExit, match="error: model.name_or_path ./no/such/model: no such folder"):
        cli.main(["quantize", "--config", str(TINY_RECIPE), *missing])


def test_an_unexpected_failure_is_one_line_and_its_traceback_shows_with_verbose(monkeypatch):
    def fails(cfg):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(cli, "run_quantize", fails)
    args = ["quantize", "--config", str(TINY_RECIPE)]
    with pytest.raises(SystemExit, match=r"^error: the device went away \(--verbose shows where\)$"):
        cli.main(args)
    with pytest.raises(RuntimeError, match="the device went away"):
        cli.main([*args, "--verbose"])
