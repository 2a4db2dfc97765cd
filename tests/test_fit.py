"""The fit job: LightningCLI recipes, step-0 model, training, adapter-only checkpoints, resume."""

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import projq_train.cli as cli
import projq_train.lightning_cli as lightning_cli
import projq_train.module as projq_module
from projq_train.config import AdapterConfig, CalibrationConfig, ModelConfig, QuantConfig, ScheduleConfig
from projq_train.data.instruct import InstructionData
from projq_train.loss import causal_lm_loss_from_hidden
from projq_train.models import load_model_and_tokenizer
from projq_train.module import ProjQModule, head_bypassed, prepare_model, warmup_cosine
from projq_train.quant.calibrate import apply_quantized
from projq_train.quant.linear import QuantLinear
from tests.conftest import SMOLLM2, TINY

RECIPES = Path(__file__).parents[1] / "recipes"
TINY_FIT = RECIPES / "tiny-cpu.yaml"
CALIB = CalibrationConfig(nsamples=4, seqlen=64)


def tiny_quant(**overrides) -> QuantConfig:
    return QuantConfig(**{"method": "projq", "bits": 3, "group_size": 32, "iters": 1, **overrides})


def test_the_model_is_prepared_on_the_cpu_whatever_the_default_device(tmp_path):
    # Lightning calls configure_model with the training device as the default (CUDA on a GPU, where
    # the calibration ids landed on it and hashing them failed); meta stands in for it here
    with torch.device("meta"):
        model, _ = prepare_model(
            ModelConfig(config=TINY["llama"]),
            tiny_quant(),
            AdapterConfig(rank=8),
            CALIB,
            tmp_path,
            torch.device("cpu"),
        )
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and {t.device.type for t in tensors} == {"cpu"}


@pytest.mark.parametrize("init", ["compensation", "standard"])
def test_step0_model_is_the_quantized_model_plus_its_compensation(tmp_path, init):
    base = ModelConfig(config=TINY["llama"])
    model, base_id = prepare_model(
        base, tiny_quant(), AdapterConfig(rank=8, init=init, alpha=8.0), CALIB, tmp_path, torch.device("cpu")
    )
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    from projq_train.artifact import load_artifact

    modules, meta = load_artifact(tmp_path / base_id)
    reference = apply_quantized(
        load_model_and_tokenizer(base)[0], modules, with_adapter=init == "compensation"
    )
    ids = torch.randint(0, 259, (2, 24))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_loss_decreases_when_overfitting_a_small_set(tmp_path, monkeypatch):
    released = []  # on CPU, free pages are returned during the forward of the decoder layers
    monkeypatch.setattr(projq_module, "release_during_forward", lambda layers: released.extend(layers))
    # initializer_range 0.25: with the default 0.02 a 64-wide random model's frozen embeddings and
    # head cannot express a peaked distribution, whatever the adapters do
    module = ProjQModule(
        ModelConfig(config={**TINY["llama"], "initializer_range": 0.25}),
        tiny_quant(),
        AdapterConfig(rank=8, dropout=0.0),
        CALIB,
        artifact_dir=str(tmp_path),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        schedule=ScheduleConfig(warmup_steps=0, min_lr_ratio=1.0),
    )
    data = InstructionData(
        "builtin:toy_instructions",
        limit=8,
        batch_size=8,
        val_fraction=0.0,
        max_seq_length=320,
        tokenizer=module.tokenizer,
    )
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=40,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Record()],
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    assert len(losses) == 40 and losses[-1] < 0.1 * losses[0]
    assert released == list(module.model.get_base_model().model.layers)


def test_a_module_validated_before_fit_validates_again_during_fit(tmp_path):
    module = ProjQModule(
        ModelConfig(config=TINY["llama"]),
        tiny_quant(),
        AdapterConfig(rank=4),
        CALIB,
        artifact_dir=str(tmp_path),
    )
    data = InstructionData(
        "builtin:toy_instructions", limit=16, batch_size=4, val_fraction=0.25, tokenizer=module.tokenizer
    )
    trainer = L.Trainer(
        max_steps=2,
        val_check_interval=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val_ppl"]  # inference mode
    trainer.fit(module, datamodule=data)  # validates at step 2 with the metric reset in inference mode
    assert (
        trainer.global_step == 2
        and math.isfinite(before)
        and math.isfinite(trainer.callback_metrics["val_ppl"])
    )


def run_cli(*args: str) -> None:
    cli.main(["fit", "--config", str(TINY_FIT), *args])


def fit_args(root: Path, steps: int) -> list[str]:
    return [
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=2",
        f"--trainer.default_root_dir={root}",  # checkpoints and logs follow it
        "--trainer.callbacks.init_args.every_n_train_steps=2",
        "--trainer.enable_progress_bar=false",
        f"--model.artifact_dir={root}/artifacts",
        "--model.calibration.nsamples=4",
        "--model.calibration.seqlen=64",
        "--model.quant.iters=1",
        "--model.adapter.rank=4",
    ]


class Capture(L.Callback):
    """Adapter weights and global step when training starts."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module):
        Capture.seen = {
            "step": trainer.global_step,
            "weights": {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad},
        }


def test_tiny_recipe_fits_checkpoints_adapters_only_and_resumes(tmp_path, capsys):
    run_cli(*fit_args(tmp_path, 4), "--trainer.enable_progress_bar=true")
    last = tmp_path / "checkpoints" / "last.ckpt"
    summary = capsys.readouterr().out  # progress by step, and the end of the run says where things are
    assert "step 4/4" in summary and "fit done: step 4 in " in summary and "peak memory host " in summary
    assert "train_loss " in summary and "val_loss " in summary and f"last checkpoint: {last}" in summary
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 4
    keys = set(ckpt["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    adapter_bytes = sum(t.numel() * t.element_size() for t in ckpt["state_dict"].values())
    base = load_model_and_tokenizer(ModelConfig(**yaml.safe_load(TINY_FIT.read_text())["model"]["base"]))[0]
    base_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    assert adapter_bytes < 0.06 * base_bytes  # rank-4 adapters of a 128-wide model: 4.5% of its weights
    assert last.stat().st_size < 0.2 * base_bytes  # with two AdamW moments and the loop state
    assert ckpt["projq"]["base_id"] == next((tmp_path / "artifacts").iterdir()).name
    assert "lr_schedulers" in ckpt and "optimizer_states" in ckpt
    metrics = (next((tmp_path / "lightning_logs").glob("version_*")) / "metrics.csv").read_text()
    assert "val_loss" in metrics and "val_ppl" in metrics

    run_cli(*fit_args(tmp_path, 6), "--ckpt_path=last", "--trainer.callbacks+=tests.test_fit.Capture")
    seen = sys.modules["tests.test_fit"].Capture.seen  # the CLI imported this file under that name
    assert seen["step"] == 4
    for name, saved in ckpt["state_dict"].items():
        torch.testing.assert_close(seen["weights"][name], saved, rtol=0, atol=0)
    assert torch.load(last, weights_only=False)["global_step"] == 6

    for stage, metric, extra in (
        ("validate", "val_loss", []),
        ("test", "test_ppl", ["--data.init_args.test_path=builtin:toy_instructions"]),
    ):
        cli.main([stage, "--config", str(TINY_FIT), *fit_args(tmp_path, 6), f"--ckpt_path={last}", *extra])
        assert metric in capsys.readouterr().out

    # other model or data settings than the checkpoint's are refused before anything is built,
    # naming each; trainer settings and the keys of MAY_CHANGE are not compared
    for stage, steps, extra in (("fit", 8, "--ckpt_path=last"), ("validate", 6, f"--ckpt_path={last}")):
        artifacts_before = sorted((tmp_path / "artifacts").iterdir())
        overrides = ["--model.quant.bits=4", "--model.adapter.alpha=8", "--data.init_args.template=chat"]
        with pytest.raises(SystemExit) as refused:
            cli.main([stage, "--config", str(TINY_FIT), *fit_args(tmp_path, steps), extra, *overrides])
        assert refused.value.code != 0
        err = capsys.readouterr().err
        for key in (
            "model.quant.bits: 3 -> 4",
            "model.adapter.alpha: 16.0 -> 8.0",
            "data.template: 'alpaca' -> 'chat'",
        ):
            assert key in err
        assert "max_steps" not in err and sorted((tmp_path / "artifacts").iterdir()) == artifacts_before
    for ckpt_path, message in ((f"{tmp_path}/missing.ckpt", "no such file"), ("last", "no last*.ckpt in")):
        with pytest.raises(SystemExit):
            run_cli(*fit_args(tmp_path / "empty", 8), f"--ckpt_path={ckpt_path}")
        assert capsys.readouterr().err.startswith(f"error: --ckpt_path {ckpt_path}: {message}")

    # a full disk (files may grow to half a checkpoint) fails the run with one line, and leaves
    # the checkpoints that were there intact and no partial file under any name
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    limit = last.stat().st_size // 2
    run = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "from projq_train.cli import main; main(sys.argv[1:])"
    )
    args = ["fit", "--config", str(TINY_FIT), *fit_args(tmp_path, 8), "--ckpt_path=last"]
    command = [sys.executable, "-c", run, *args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=RECIPES.parent)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "File too large" in done.stderr
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    assert after == before


def test_module_refuses_a_checkpoint_for_another_base():
    module = ProjQModule(ModelConfig(config=TINY["llama"]), tiny_quant(), AdapterConfig(rank=8), CALIB)
    module.base_id = "aaaa"
    with pytest.raises(ValueError, match="trained on quantized base bbbb"):
        module.on_load_checkpoint({"projq": {"base_id": "bbbb"}, "state_dict": {}})


@pytest.mark.parametrize(
    "override,message",
    [
        ("--model.quant.bits=5", "bits must be one of"),
        ("--model.quant.metod=gptq", "metod"),
        ("--model.quant.method=nf4", "nf4 is a 4-bit format"),
        (
            "--model.quant.method=nf4 --model.quant.bits=4 --model.quant.compensation=fisher",
            "quant.compensation fisher weights a compensation nf4 does not have",
        ),
        ("--model.quant.compensation=gauss", "Literal['hessian', 'fisher']. Got value: gauss"),
        ("--model.adapter.init=standard --model.quant.mode=refresh", "needs adapter.init compensation"),
        (
            "--model.adapter.init=standard --model.quant.mode=srr",
            "quant.mode srr moves the weight's dominant",
        ),
        ("--model.adapter.rank=0", "must be > 0 to fine-tune"),
        ("--model.quant.group_size_choices=[32,64]", "are chosen from under quant.budget_bits"),
        (
            "--model.quant.bits=null --model.quant.budget_bits=3 --model.quant.group_size_choices=[32,32]",
            "must be distinct group sizes, each positive or -1, got [32, 32]",
        ),
        ("--model.quant.first_pass_iters=1", "without either there is no first pass"),
        ("--model.quant.scale_bits=4", "quant.scale_bits must be one of (8, 16), got 4"),
        (
            "--model.quant.method=nf4 --model.quant.scale_bits=8",
            "quant.scale_bits sets the grid of rtn/gptq/projq; nf4 keeps bitsandbytes' own scales",
        ),
        (
            "--model.quant.method=nf4 --model.quant.rotate_inputs=true",
            "quant.rotate_inputs sets the grid of rtn/gptq/projq; nf4 quantizes W as it is",
        ),
        (
            "--model.quant.method=gptq --model.quant.allocate_ranks=true --model.quant.first_pass_iters=1",
            "quant.first_pass_iters counts ProjQ rounds; quant.method gptq has none",
        ),
        (
            "--model.quant.allocate_ranks=true --model.quant.first_pass_iters=-1",
            "quant.first_pass_iters must be >= 0, got -1",
        ),
        ("--model.quant.rank=8", "model.quant.rank is now model.adapter.rank"),
        ("--model.quant.alpha=0.5", "model.quant.alpha is now model.quant.projection_strength"),
        ("--model.adapter.init=projq", "model.adapter.init: projq is now compensation"),
        ("--model.quant.bitz=3", "did you mean model.quant.bits?"),
        ("--model.optimizer.init_args.lr=0", "lr must be positive, got 0"),
        ("--data.init_args.batch_size=0", "error: data batch_size must be positive, got 0"),
        (
            "--data.init_args.path=/nonexistent/rows.json",
            "error: dataset file /nonexistent/rows.json does not exist",
        ),
    ],
)
def test_bad_recipe_is_one_clear_error(override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*override.split(), "--trainer.max_steps=1")
    assert exit_info.value.code != 0
    # a parser error is printed; an error found while running is the exit message (printed by Python)
    assert message in capsys.readouterr().err + str(exit_info.value.code)


def test_a_checkpoint_written_before_the_renames_is_refused_naming_them():
    from projq_train.checkpoint import check_current_settings

    old = {"hyper_parameters": {"quant": {"bits": 3, "rank": 8, "alpha": 1.0}, "adapter": {"init": "projq"}}}
    renames = (
        "quant.rank is now adapter.rank; quant.alpha is now quant.projection_strength; adapter.init: projq"
    )
    with pytest.raises(
        ValueError, match=f"old.ckpt was written by an earlier projq-train \\({renames} is now"
    ):
        check_current_settings(old, "old.ckpt")
    current = {"hyper_parameters": {"quant": {"bits": 3}, "adapter": {"rank": 8, "init": "compensation"}}}
    check_current_settings(current, "new.ckpt")  # nothing to refuse


def test_a_recipes_relative_paths_resolve_against_its_folder_from_any_working_directory(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_cli("--print_config", "--data.init_args.val_path=rows.jsonl")
    printed = yaml.safe_load(capsys.readouterr().out)
    root = RECIPES.parent.resolve()
    assert printed["trainer"]["default_root_dir"] == str(root / "runs" / "tiny-cpu")
    assert printed["model"]["artifact_dir"] == str(root / "artifacts")
    assert printed["model"]["calibration"]["dataset"] == "builtin:sample"  # not a path: kept
    assert printed["data"]["init_args"]["val_path"] == "rows.jsonl"  # the command line's: as given


def test_a_checkpoint_holding_a_path_relative_to_where_it_ran_matches_the_resolved_one(tmp_path, monkeypatch):
    from projq_train.checkpoint import identity_differences

    (tmp_path / "rows.jsonl").write_text("{}")
    monkeypatch.chdir(tmp_path)
    old = {"datamodule_hyper_parameters": {"path": "rows.jsonl", "max_seq_length": 64}}
    assert identity_differences(old, {}, {"path": str(tmp_path / "rows.jsonl"), "max_seq_length": 64}) == []
    assert identity_differences(old, {}, {"path": str(tmp_path / "other.jsonl"), "max_seq_length": 64}) == [
        f"data.path: 'rows.jsonl' -> '{tmp_path / 'other.jsonl'}'"
    ]


def test_print_config_shows_the_full_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--print_config")
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"] == "projq_train.data.instruct.InstructionData"
    assert printed["model"]["quant"]["bits"] == 3 and printed["model"]["adapter"]["init"] == "compensation"


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    if "trainer" not in yaml.safe_load(recipe.read_text()):  # a `quantize` recipe
        raw, cfg = cli.parse_recipe(cli.quantize_parser(), ["--config", str(recipe)])
        assert isinstance(cfg.quant, QuantConfig)
        return
    configs = ["--config", str(recipe)]
    # an overlay's usage line applies it after a base recipe: parse the two together
    base = re.search(rf"--config recipes/(\S+) --config recipes/{re.escape(recipe.name)}", recipe.read_text())
    if base:
        configs = ["--config", str(RECIPES / base.group(1)), *configs]
    parsed = lightning_cli.trainer_cli(configs, run=False, build=False).config
    model = parsed.model
    quant, adapter = QuantConfig(**model.quant), AdapterConfig(**model.adapter)  # runs the validations
    ModelConfig(**model.base), CalibrationConfig(**model.calibration)
    from projq_train.config import check_adapter_settings

    check_adapter_settings(quant, adapter)
    assert parsed.data.class_path.startswith("projq_train.data.")


def test_warmup_cosine_schedule():
    f = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(21)]
    assert f[0] == 0.25 and f[3] == 1.0 and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False)) and f[20] == pytest.approx(0.1)


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tmp_path):
    base = ModelConfig(config=TINY["llama"])
    ids = torch.randint(0, 259, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model, _ = prepare_model(
            base, tiny_quant(), AdapterConfig(rank=8, dropout=0.0), CALIB, tmp_path, torch.device("cpu")
        )
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with head_bypassed(model) as head:
            hidden = model(ids).logits  # (B, T, H)
        causal_lm_loss_from_hidden(hidden, head.weight, ids).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g is not None and g.abs().sum() > 0
        torch.testing.assert_close(grads[1][name], g)


def test_nf4_baseline_wraps_bitsandbytes_layers_with_zero_init_adapters(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    base = ModelConfig(config=TINY["llama"])
    quant = tiny_quant(method="nf4", bits=4)
    model, base_id = prepare_model(
        base, quant, AdapterConfig(rank=8, init="standard"), CALIB, tmp_path, torch.device("cpu")
    )
    assert base_id.startswith("nf4-") and not any(tmp_path.iterdir())  # no calibration, no artifact
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    # zero-init adapters: the model computes the NF4 base, which is close to the float model
    fp = load_model_and_tokenizer(base)[0]
    ids = torch.randint(0, 259, (2, 16))
    model.eval()
    with torch.no_grad():
        nf4_logits, fp_logits = model(ids).logits, fp(ids).logits
    assert 0 < (nf4_logits - fp_logits).pow(2).mean() < 0.05 * fp_logits.pow(2).mean()


@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="the shared SmolLM2 GGUF is not on this machine")
def test_gguf_tokenizer_gets_its_eos_token_from_the_model_config_and_is_cached(tmp_path, monkeypatch):
    from projq_train import artifact

    base = ModelConfig(name_or_path=str(SMOLLM2), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    converted = artifact.base_tokenizer(base, tmp_path)
    assert converted.eos_token == "<|im_end|>" and converted.pad_token_id == converted.eos_token_id == 2
    monkeypatch.setattr(artifact, "load_tokenizer", lambda *a, **k: pytest.fail("the GGUF was parsed again"))
    cached = artifact.base_tokenizer(base, tmp_path)
    text = "### Instruction:\nGive three tips for staying healthy. Ünïcode ✓\n\n### Response:"
    assert cached(text)["input_ids"] == converted(text)["input_ids"]
    assert (cached.eos_token_id, cached.pad_token_id) == (converted.eos_token_id, converted.pad_token_id)
    assert cached.chat_template == converted.chat_template


def test_gguf_tokenizer_cache_is_keyed_by_the_file_contents(tmp_path, monkeypatch):
    """The converted tokenizer of a GGUF file is kept under <artifact_dir>/tokenizers and found
    again by the file's contents (here a stand-in file and a byte tokenizer as the conversion)."""
    from projq_train import artifact
    from projq_train.models import byte_tokenizer

    conversions = []

    def convert(cfg, config=None):
        conversions.append(cfg.name_or_path)
        tok = byte_tokenizer()
        tok.pad_token = tok.eos_token
        return tok

    monkeypatch.setattr(artifact, "load_tokenizer", convert)
    for folder, contents in (("one", b"GGUF one"), ("copy", b"GGUF one"), ("two", b"GGUF two")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "m.gguf").write_bytes(contents)
    tokens = []
    for folder in ("one", "one", "copy", "two"):
        base = ModelConfig(name_or_path=str(tmp_path / folder), gguf_file="m.gguf")
        tok = artifact.base_tokenizer(base, tmp_path / "art")
        tokens.append(tok("héllo")["input_ids"])
    assert conversions == [str(tmp_path / "one"), str(tmp_path / "two")]
    assert all(t == tokens[0] for t in tokens) and tok.pad_token == tok.eos_token
    assert len(list((tmp_path / "art" / "tokenizers").iterdir())) == 2  # no temporary folder left


def test_nan_guard_stops_a_diverging_run_with_one_line_and_writes_no_nan_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as stop:
        diverge = ["--model.optimizer.init_args.lr=1e9", "--trainer.gradient_clip_val=null"]
        run_cli(*fit_args(tmp_path, 12), *diverge)
    message = str(stop.value.code)
    assert re.fullmatch(r"error: step \d+: the loss or a gradient is NaN or infinite.*", message), message
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(bool(torch.isfinite(t).all()) for t in state.values()), ckpt


def test_nan_guard_skips_up_to_the_allowed_bad_steps(tmp_path, monkeypatch):
    module = ProjQModule(
        ModelConfig(config=TINY["llama"]),
        tiny_quant(),
        AdapterConfig(rank=8, dropout=0.0),
        CALIB,
        artifact_dir=str(tmp_path),
        skip_nonfinite_steps=1,
    )
    loss = ProjQModule.loss
    poisoned_steps = {2}

    def poisoned(self, batch, num_tokens=None):
        value = loss(self, batch, num_tokens)
        return value * float("nan") if self.training and self.trainer.global_step in poisoned_steps else value

    monkeypatch.setattr(ProjQModule, "loss", poisoned)
    weights = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trained = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
            weights.append({n: p.detach().clone() for n, p in trained.items()})

    data = InstructionData(
        "builtin:toy_instructions", limit=8, batch_size=2, val_fraction=0.0, tokenizer=module.tokenizer
    )
    trainer_args = dict(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer_args.update(enable_progress_bar=False)
    trainer = L.Trainer(max_steps=4, callbacks=[Record()], limit_val_batches=0, **trainer_args)
    trainer.fit(module, datamodule=data)
    assert module.skipped_steps == 1 and len(weights) == 4
    for name, w in weights[2].items():  # step 2 changed nothing; the others moved the adapters
        assert torch.equal(w, weights[1][name]) and bool(torch.isfinite(weights[3][name]).all())
    assert any(not torch.equal(weights[3][n], weights[2][n]) for n in weights[2])
    poisoned_steps.update({1, 2, 3})  # a second bad step is one too many
    module = ProjQModule(
        ModelConfig(config=TINY["llama"]),
        tiny_quant(),
        AdapterConfig(rank=8, dropout=0.0),
        CALIB,
        str(tmp_path),
        skip_nonfinite_steps=1,
    )
    with pytest.raises(FloatingPointError, match=r"step 3: .* after 1 such steps skipped"):
        L.Trainer(max_steps=4, limit_val_batches=0, **trainer_args).fit(module, datamodule=data)


class RecordLosses(L.Callback):
    """Appends ``global_step loss`` to ``path`` after every training step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {float(outputs['loss'])!r}\n")


class KillAt(L.Callback):
    """``kill -9`` of this process as training step ``step + 1`` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def losses(path: Path) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in (line.split() for line in path.read_text().splitlines())}


def test_a_run_killed_mid_epoch_resumes_exactly_as_an_uninterrupted_run(tmp_path):
    # 24 training rows in batches of 8: 3 batches per epoch, a checkpoint every 2 steps; dropout
    # 0.1, so the random generator matters as well as the data order and the optimizer and schedule
    def args(run: str, *extra: str) -> list[str]:
        record = [
            "--trainer.callbacks+=tests.test_fit.RecordLosses",
            f"--trainer.callbacks.path={tmp_path / run}.txt",
        ]
        common = [
            "--model.adapter.dropout=0.1",
            "--data.init_args.limit=24",
            "--trainer.limit_val_batches=1",
            f"--model.artifact_dir={tmp_path}/artifacts",
        ]
        return [*fit_args(tmp_path / run, 7), *common, *record, *extra]

    run_cli(*args("straight"))
    straight = losses(tmp_path / "straight.txt")
    assert sorted(straight) == list(range(1, 8))

    kill = ["--trainer.callbacks+=tests.test_fit.KillAt", "--trainer.callbacks.step=5"]
    command = [sys.executable, "-c", "import sys; from projq_train.cli import main; main(sys.argv[1:])"]
    killed = subprocess.run(
        [*command, "fit", "--config", str(TINY_FIT), *args("killed", *kill)],
        cwd=RECIPES.parent,
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert sorted(losses(tmp_path / "killed.txt")) == [1, 2, 3, 4, 5]  # step 5 was not checkpointed

    # resumed mid-epoch (after batch 1 of 3 of the second epoch) and through the next epoch
    run_cli(*args("killed"), "--ckpt_path=last")
    resumed = losses(tmp_path / "killed.txt")
    for step in range(5, 8):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    # resumed from the checkpoint at the end of the second epoch
    end_of_epoch = tmp_path / "straight" / "checkpoints" / "epoch=1-step=6.ckpt"
    run_cli(*args("from-epoch-end"), f"--ckpt_path={end_of_epoch}")
    assert losses(tmp_path / "from-epoch-end.txt") == pytest.approx({7: straight[7]}, abs=1e-6)


def test_fit_help_shows_each_field_s_docstring(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["fit", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "Bits per weight: 2, 3 or 4" in out and "LoRA scaling numerator" in out
