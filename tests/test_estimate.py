"""projq-train estimate: exact sizes against a real packed model, activations against what autograd
keeps, and the command line (tables, JSON, advice, errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from projq_train import cli
from projq_train import estimate as E
from projq_train.config import DEFAULT_TARGETS, AdapterConfig, QuantConfig
from projq_train.lora import attach_adapters
from projq_train.quant.linear import QuantLinear, swap_in_quant_linears
from projq_train.quant.pack import PackedWeight
from projq_train.quant.rtn import rtn_quantize
from projq_train.swiglu import use_lean_mlps
from tests.conftest import SMOLLM2

RECIPES = Path(__file__).parents[1] / "recipes"
SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "vocab_size": 259,
}
# the 7B/8B GPU recipes' models, as their hub configs give them
BIG = {
    "llama2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "vocab_size": 32000},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "vocab_size": 152064},
    "qwen3-8b": {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 128, "vocab_size": 151936},
}  # fmt: skip


def tiny_packed_model(family: str, quant: QuantConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny random model whose target linears are RTN-quantized, packed QuantLinear layers."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **SHAPE), dtype=dtype)
    weights = {
        name: PackedWeight.from_quantized(rtn_quantize(m.weight.float(), quant.bits, quant.group_size))
        for name, m in model.model.layers.named_modules(prefix="model.layers")
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in quant.target_modules
    }
    return swap_in_quant_linears(model, weights)


def shape_of(family: str) -> E.ModelShape:
    return E.ModelShape.from_config(AutoConfig.for_model(family, **SHAPE))


def run_estimate(capsys, *args: str) -> str:
    cli.main(["estimate", *args])
    return capsys.readouterr().out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    ("bits", "group_size", "targets"),
    [
        (2, 32, DEFAULT_TARGETS),
        (3, 64, DEFAULT_TARGETS),
        (4, -1, DEFAULT_TARGETS),
        (3, 32, ["q_proj", "v_proj"]),
    ],
)
def test_sizes_equal_the_buffers_and_parameters_of_a_real_model(family, bits, group_size, targets):
    quant = QuantConfig(bits=bits, group_size=group_size, target_modules=targets)
    model = tiny_packed_model(family, quant)
    shape = shape_of(family)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    packed = sum(t.numel() * t.element_size() for m in layers for t in m.packed_tensors())
    assert packed == E.packed_weight_bytes(shape, quant)
    biases = [m.bias for m in layers if m.bias is not None]
    floats = sum(t.numel() * t.element_size() for t in [*model.parameters(), *biases])
    assert floats == E.float_tensor_bytes(shape, quant, weight_bytes=4)
    adapted = attach_adapters(model, quant.target_modules, 8, alpha=16.0, dropout=0.0)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert trainable == E.adapter_parameters(shape, quant, 8)


def test_parameter_count_of_llama2_7b():
    shape = E.ModelShape.from_config(AutoConfig.for_model(**BIG["llama2-7b"]))
    assert shape.parameters() == 6_738_415_616  # the published count


def saved_tensor_bytes(model: nn.Module, input_ids, attention_mask, autocast: bool) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward pass (parameters
    and buffers excluded: they exist anyway)."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            kept[storage.data_ptr()] = max(kept.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        model(input_ids=input_ids, attention_mask=attention_mask)
    return sum(kept.values())


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(
    ("family", "precision", "packing"),
    [
        ("llama", "32-true", False),
        ("llama", "32-true", True),
        ("llama", "bf16-mixed", False),
        ("llama", "bf16-true", True),
        ("qwen3", "32-true", False),
    ],
)
def test_activations_match_what_autograd_keeps(family, precision, packing, dropout, checkpointing):
    B, T = 2, 64
    quant = QuantConfig(bits=3, group_size=32)
    adapter = AdapterConfig(rank=8, dropout=dropout)
    model = tiny_packed_model(family, quant)
    model = attach_adapters(model, quant.target_modules, adapter.rank, adapter.alpha, adapter.dropout)
    use_lean_mlps(model)  # as the training module does
    model.get_base_model().lm_head = nn.Identity()  # the chunked loss takes the hidden states
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)  # as Lightning converts the module (QuantLinear keeps fp16 scales)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(0, SHAPE["vocab_size"], (B, T))
    attention_mask = torch.ones(B, T, dtype=torch.long)
    if not packing:
        attention_mask[0, -9:] = 0  # a padded batch
    measured = saved_tensor_bytes(model, input_ids, attention_mask, autocast=precision == "bf16-mixed")

    fit = E.FitSettings(B, T, packing, checkpointing, precision=precision)
    num = E.numerics(precision, "float32", on_gpu=False)
    kept, recompute = E.activation_bytes(shape_of(family), quant, adapter, num, fit, checkpointing)
    assert kept == pytest.approx(measured, rel=0.15)
    assert (recompute > 0) == checkpointing


def test_cli_prints_tables_for_the_tiny_recipe(capsys):
    out = run_estimate(capsys, "--config", str(RECIPES / "tiny-cpu.yaml"))
    assert "fit, per process (CPU run)" in out and "quantize at fit setup" in out
    assert "packed weights" in out and "activations kept for backward" in out and "peak" in out
    assert "with gradient checkpointing" in out and "the recipe has it off" in out


def test_cli_json_has_the_peaks_and_components(capsys):
    out = run_estimate(capsys, "--config", str(RECIPES / "tiny-cpu.yaml"), "--json")
    result = json.loads(out)
    fit, quantize = result["fit"], result["quantize"]
    assert not fit["on_gpu"] and fit["peak_bytes"] == sum(fit["host"].values())  # a CPU run: all host
    for name in ("runtime", "packed_weights", "float_tensors", "adapters", "gradients", "optimizer_state"):
        assert fit["host"][name] > 0
    assert fit["host"]["activations"] == fit["details"]["activations_without_checkpointing"]
    assert quantize["peak_bytes"] == sum(quantize["host"].values()) > E.RUNTIME_BASELINE_BYTES
    assert result["model"]["layers"] == 2 and result["model"]["vocab"] == 259  # the byte tokenizer's


def test_cli_overrides_change_the_estimate(capsys):
    base = json.loads(run_estimate(capsys, "--config", str(RECIPES / "tiny-cpu.yaml"), "--json"))
    args = ("--data.init_args.batch_size", "16", "--model.quant.bits", "4")
    bigger = json.loads(run_estimate(capsys, "--config", str(RECIPES / "tiny-cpu.yaml"), *args, "--json"))
    assert bigger["fit"]["details"]["tokens"] == 2 * base["fit"]["details"]["tokens"]
    assert bigger["fit"]["host"]["packed_weights"] > base["fit"]["host"]["packed_weights"]


def test_quantize_recipe_estimates_quantize_only(capsys):
    result = json.loads(run_estimate(capsys, "--config", str(RECIPES / "tiny-quantize.yaml"), "--json"))
    assert result["recipe"] == "quantize" and "fit" not in result
    assert result["quantize"]["host"]["hessians"] > 0


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(
    "pass_args",
    [("--quant.bits", "null", "--quant.budget_bits", "3.5"), ("--quant.compensation", "fisher")],
    ids=["budget", "fisher"],
)
def test_the_sensitivity_pass_is_counted_where_it_is_the_larger_phase(device, pass_args, capsys):
    """A bit budget and a Fisher-weighted compensation start with the output-Fisher pass: 24
    layers' inputs of 8 windows of 512 tokens outweigh one layer's calibration activations."""
    recipe = ("--config", str(RECIPES / "tiny-quantize.yaml"), "--device", device, "--json")
    deep = ("--model.config.num_hidden_layers", "24", "--calibration.nsamples", "8")
    deep += ("--calibration.seqlen", "512")
    uniform = json.loads(run_estimate(capsys, *recipe, *deep))["quantize"]
    budget = json.loads(run_estimate(capsys, *recipe, *deep, *pass_args))["quantize"]
    stored = 24 * 8 * 512 * 128 * 4  # every layer's inputs, fp32
    runtime = budget["host"]["runtime"]
    assert "sensitivity_pass" not in uniform["host"] and budget["host"]["sensitivity_pass"] > 0
    # host: the runtime, the stored inputs, one layer, one window through it (16 MiB) and tiny rest
    assert runtime + stored < budget["host_bytes"] < runtime + stored + 20 * 2**20
    assert budget["host_bytes"] > uniform["host_bytes"]


def test_too_little_memory_gets_advice_and_each_knob_lowers_the_peak(capsys):
    recipe = str(RECIPES / "tiny-cpu.yaml")
    text = run_estimate(capsys, "--config", recipe, "--device_memory", "440MiB")  # advice, not an error
    assert "fit: peak" in text and "does not fit in 440MiB" in text and "gradient checkpointing" in text
    result = json.loads(run_estimate(capsys, "--config", recipe, "--device_memory", "440MiB", "--json"))
    assert result["device_memory"] == 440 * 2**20 and result["fits"] is False
    knobs = {a["knob"]: a for a in result["advice"]}
    assert {"halve the batch", "shorter sequences", "gradient checkpointing", "2-bit weights"} <= set(knobs)
    assert {"8-bit optimizer", "all of the above"} <= set(knobs)
    assert all(a["peak_bytes"] < result["fit"]["peak_bytes"] for a in result["advice"])
    assert knobs["all of the above"]["peak_bytes"] == min(a["peak_bytes"] for a in result["advice"])
    # a knob's prediction is the estimate of the recipe with that change
    turned = run_estimate(capsys, "--config", recipe, "--model.gradient_checkpointing", "true", "--json")
    assert json.loads(turned)["fit"]["peak_bytes"] == knobs["gradient checkpointing"]["peak_bytes"]
    roomy = json.loads(run_estimate(capsys, "--config", recipe, "--device_memory", "24GB", "--json"))
    assert roomy["fits"] is True and "advice" not in roomy


@pytest.mark.parametrize("recipe", ["llama2-7b-alpaca-w3", "qwen2.5-7b-alpaca-w3", "qwen3-8b-alpaca-w3"])
def test_gpu_recipes_fit_16gb_per_gpu(recipe, capsys):
    model = BIG[recipe.rsplit("-", 2)[0]]
    args = ["--config", str(RECIPES / f"{recipe}.yaml"), "--model.base.name_or_path", "null"]
    result = json.loads(run_estimate(capsys, *args, "--model.base.config", json.dumps(model), "--json"))
    assert result["fit"]["on_gpu"] and result["fit"]["details"]["gradient_checkpointing"]
    assert result["fit"]["peak_bytes"] <= 16 * 10**9  # the target for the 3-bit recipes


@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="needs ../shared/data (SmolLM2 GGUF)")
def test_gguf_config_is_read_without_weights(capsys, monkeypatch):
    import gguf

    def no_weights(*args, **kwargs):
        raise AssertionError("the estimate read a weight")

    monkeypatch.setattr(gguf, "dequantize", no_weights)
    monkeypatch.setattr(gguf.quants, "dequantize", no_weights)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    result = json.loads(
        run_estimate(capsys, "--config", str(RECIPES / "smollm2-135m-alpaca-w3.yaml"), "--json")
    )
    model = result["model"]
    assert (model["hidden"], model["intermediate"], model["layers"], model["vocab"]) == (576, 1536, 30, 49152)
    assert (model["heads"], model["kv_heads"], model["tied"]) == (9, 3, True)
    assert 130e6 < model["parameters"] < 140e6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.quant.bitz", "3"], "bitz"),
        (["--model.quant.group_size", "96"], "does not divide in_features 128"),
        (["--model.base.config", '{"model_type": "gpt2", "n_embd": 64}'], "unsupported architecture 'gpt2'"),
        (["--model.quant.bits", "5"], "quant.bits must be one of"),
        (["--trainer.precision", "64-true"], "not supported by the estimate"),
        (["--device_memory", "lots"], "give a size such as 24GB"),
    ],
)
def test_bad_input_is_one_clear_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["estimate", "--config", str(RECIPES / "tiny-cpu.yaml"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_missing_recipe_and_unreadable_model_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["estimate", "--config", str(tmp_path / "nothere.yaml")])
    assert capsys.readouterr().err.strip() == f"error: recipe {tmp_path / 'nothere.yaml'} does not exist"
    args = ["--model.base.config", "null", "--model.base.name_or_path", str(tmp_path / "no-model")]
    with pytest.raises(SystemExit):
        cli.main(["estimate", "--config", str(RECIPES / "tiny-cpu.yaml"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: cannot read the model config of {tmp_path / 'no-model'}"
    )


def test_parse_memory_units():
    assert E.parse_memory("24GB") == 24 * 10**9 and E.parse_memory("24GiB") == 24 * 2**30
    assert E.parse_memory("512 MB") == 512 * 10**6 and E.parse_memory("1.5GiB") == 3 * 2**29
    assert E.parse_memory("1000") == 1000


def test_optimizer_state():
    n = 1000
    assert E.optimizer_state_bytes("torch.optim.AdamW", {}, n, 4) == 8 * n
    assert E.optimizer_state_bytes("torch.optim.AdamW", {}, n, 2) == 4 * n  # bf16-true parameters
    assert E.optimizer_state_bytes("bitsandbytes.optim.PagedAdamW8bit", {}, n, 4) == 2 * n
    assert E.optimizer_state_bytes("torch.optim.SGD", {"momentum": 0.0}, n, 4) == 0
    assert E.optimizer_state_bytes("torch.optim.SGD", {"momentum": 0.9}, n, 4) == 4 * n
