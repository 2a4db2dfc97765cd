"""The layer-by-layer driver on tiny random models."""

import json
from dataclasses import replace

import pytest
import torch

from projq_train.config import CalibrationConfig, ModelConfig, QuantConfig
from projq_train.data.calibration import calibration_tokens
from projq_train.models import load_model_and_tokenizer
from projq_train.quant import gptq_quantize
from projq_train.quant.calibrate import (
    accumulate_hessians,
    apply_quantized,
    clock,
    format_report,
    quantize_model,
    target_shapes,
)
from projq_train.quant.layerwise import capture_layer_inputs
from tests.conftest import TINY


def logits_mse(model, ref, ids):
    with torch.no_grad():
        return (model(ids).logits - ref).pow(2).mean().item()


# every family with ProjQ but Mistral (the Llama architecture), every method on Llama (shared code)
@pytest.mark.parametrize(
    ("family", "method"),
    [
        *((family, "projq") for family in sorted(TINY) if family != "mistral"),
        ("llama", "rtn"),
        ("llama", "gptq"),
    ],
)
def test_step0_adapter_is_closer_to_float_than_quantized(family, method):
    model, tok = load_model_and_tokenizer(ModelConfig(config=TINY[family]))
    ids = calibration_tokens(CalibrationConfig(nsamples=8, seqlen=64), tok)
    held_out = calibration_tokens(CalibrationConfig(nsamples=2, seqlen=64, seed=1), tok)
    with torch.no_grad():
        ref = model(held_out).logits
    modules, reports = quantize_model(
        model, ids, QuantConfig(method=method, bits=3, group_size=32), 8, progress=False
    )
    assert len(modules) == len(reports) == 14  # 2 layers x 7 linears
    # the model now computes Q + BA; with Q alone it is further from the float model
    for name, module in model.named_modules():
        if name in modules:
            torch.testing.assert_close(module.weight, modules[name].step0_weight())
    err_adapted = logits_mse(model, ref, held_out)
    err_quant = logits_mse(apply_quantized(model, modules, with_adapter=False), ref, held_out)
    assert err_adapted < err_quant
    assert all(r.err_compensated < r.err_quant for r in reports)
    table = format_report(reports).splitlines()
    assert table[-2].startswith("mean") and table[-1].startswith("time per phase: calibration forwards")
    phases = [r.phase_seconds for r in reports]
    assert set(phases[0]) == {
        "calibration forwards", "Hessian factors", "quantization", "compensation", "errors and packing"
    }  # fmt: skip
    assert sum(sum(p.values()) - p["calibration forwards"] for p in phases) == pytest.approx(
        sum(r.seconds for r in reports)
    )


def test_srr_reports_the_rank_it_preserves_in_each_module():
    model, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    ids = calibration_tokens(CalibrationConfig(nsamples=8, seqlen=64), tok)
    cfg = QuantConfig(method="projq", mode="srr", bits=2, group_size=32, iters=1)
    modules, reports = quantize_model(model, ids, cfg, 8, progress=False)
    assert all(0 <= r.preserved_rank <= 8 and r.err_compensated < r.err_quant for r in reports)
    assert [m.preserved_rank for m in modules.values()] == [r.preserved_rank for r in reports]
    table = format_report(reports).splitlines()
    assert table[0].split()[:3] == ["module", "shape", "k"]
    assert table[1].split()[2] == str(reports[0].preserved_rank)
    plain = [replace(r, preserved_rank=None) for r in reports]
    assert format_report(plain).splitlines()[0].split()[:3] == ["module", "shape", "err"]  # no k column


def test_mixed_precision_quantizes_each_module_at_its_allocated_width_within_the_budget(capsys):
    from projq_train.quant.calibrate import format_storage, stored_bits_per_weight

    model, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    ids = calibration_tokens(CalibrationConfig(nsamples=8, seqlen=64), tok)
    cfg = QuantConfig(method="gptq", budget_bits=3.0, group_size=32)
    modules, reports = quantize_model(model, ids, cfg, 8)
    progress = capsys.readouterr().err  # the two passes are told apart
    assert "gptq first pass, measuring 2/3/4 bits:" in progress and "gptq mixed bits:" in progress
    assert len({qm.weight.bits for qm in modules.values()}) > 1  # tiny's uniform 3 bits store 3.59
    assert [r.bits for r in reports] == [qm.weight.bits for qm in modules.values()]
    assert stored_bits_per_weight(modules) <= 3.0
    assert all(set(r.err_by_bits) == {2, 3, 4} and r.err_by_bits[2] > r.err_by_bits[4] for r in reports)
    assert all(set(r.loss_by_bits) == {2, 3, 4} and r.loss_by_bits[2] > r.loss_by_bits[4] for r in reports)
    assert format_report(reports).splitlines()[0].split()[:3] == ["module", "shape", "bits"]
    assert "(budget 3), modules: " in format_storage(modules, 32, 3.0)
    for name, module in model.named_modules():  # the model computes the second pass's Q + BA
        if name in modules:
            torch.testing.assert_close(module.weight, modules[name].step0_weight())


@pytest.mark.parametrize("scale_bits", [16, 8])
def test_group_size_choices_give_modules_grids_of_several_group_sizes_within_the_budget(scale_bits):
    from projq_train.quant.calibrate import format_storage, stored_bits_per_weight

    model, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    ids = calibration_tokens(CalibrationConfig(nsamples=8, seqlen=64), tok)
    cfg = QuantConfig(
        method="gptq", budget_bits=3.0, group_size=32, group_size_choices=[16, 32, -1], scale_bits=scale_bits
    )
    modules, reports = quantize_model(model, ids, cfg, 8, progress=False)
    sizes = [qm.weight.group_size for qm in modules.values()]
    assert len(set(sizes)) > 1 and set(sizes) <= {16, 32, 64, 128}  # per row: the input width
    assert [r.group_size for r in reports] == sizes and stored_bits_per_weight(modules) <= 3.0
    assert {qm.weight.scale_bits for qm in modules.values()} == {scale_bits}
    assert format_report(reports).splitlines()[0].split()[:4] == ["module", "shape", "bits", "group"]
    storage = format_storage(modules, 32, 3.0)
    assert " bits g16" in storage or " bits g32" in storage
    assert ("8-bit scales" in storage) == (scale_bits == 8)
    # uniform 2 bits at group 32 store (2 + scale bits) / 32 per weight more (and the exponents)
    two_bits = float(storage.rpartition("store ")[2].split(" / ")[0])
    assert two_bits == pytest.approx(2 + (2 + scale_bits) / 32, abs=0.01)


def test_first_pass_iters_measures_the_grids_with_fewer_rounds_and_keeps_iters_for_the_second_pass():
    model, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    ids = calibration_tokens(CalibrationConfig(nsamples=8, seqlen=64), tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    budget = {"bits": None, "budget_bits": 3.0, "group_size": 32}
    # ProjQ with 0 rounds is plain GPTQ: the first pass measures what GPTQ's measures, so the
    # allocation (widths and the errors in every report row) is GPTQ's
    _, gptq = quantize_model(model, ids, QuantConfig(method="gptq", **budget), 8, progress=False)
    model.load_state_dict(state)
    cfg = QuantConfig(method="projq", iters=2, first_pass_iters=0, **budget)
    _, reports = quantize_model(model, ids, cfg, 8, progress=False)
    assert [r.bits for r in reports] == [r.bits for r in gptq]
    assert [r.loss_by_bits for r in reports] == [r.loss_by_bits for r in gptq]
    # the second pass quantizes with quant.iters rounds: ProjQ's error, not GPTQ's
    assert sum(r.err_compensated for r in reports) < sum(r.err_compensated for r in gptq)
    model.load_state_dict(state)
    _, full = quantize_model(model, ids, replace(cfg, first_pass_iters=None), 8, progress=False)
    assert [r.loss_by_bits for r in full] != [r.loss_by_bits for r in reports]  # measured with 2 rounds


@pytest.mark.parametrize(
    "method",
    [
        {"method": "projq", "mode": "refresh", "iters": 2},  # ProjQ shapes Q for the rank it gets
        {"method": "gptq"},  # GPTQ's Q for a later layer too: its inputs come through earlier Q + BA
    ],
)
def test_the_first_pass_of_allocated_ranks_quantizes_for_the_adapter_rank(method):
    from projq_train.quant.allocate import rank_choices
    from projq_train.quant.sensitivity import output_sensitivities

    model, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    ids = calibration_tokens(CalibrationConfig(nsamples=8, seqlen=64), tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = QuantConfig(**method, bits=2, group_size=32)
    names = list(target_shapes(model, cfg.target_modules))
    fisher = output_sensitivities(model, ids, names, torch.device("cpu"))
    # what a quantization for rank 8 leaves at every choice
    _, at_rank = quantize_model(
        model,
        ids,
        cfg,
        8,
        progress=False,
        measure_bits=(2,),
        sensitivities=fisher,
        measure_ranks=rank_choices(8),
    )
    model.load_state_dict(state)
    _, allocated = quantize_model(
        model, ids, replace(cfg, allocate_ranks=True), 8, progress=False, sensitivities=fisher
    )
    assert [r.loss_by_rank for r in allocated] == [r.loss_by_rank for r in at_rank]


def test_allocated_ranks_spend_the_parameters_of_one_rank_everywhere_at_uniform_bits():
    from projq_train.quant.allocate import rank_choices

    model, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    ids = calibration_tokens(CalibrationConfig(nsamples=8, seqlen=64), tok)
    cfg = QuantConfig(method="gptq", bits=2, group_size=32, allocate_ranks=True)
    modules, reports = quantize_model(model, ids, cfg, 8, progress=False)
    ranks = {n: qm.lora_A.shape[0] for n, qm in modules.items()}
    assert [r.rank for r in reports] == list(ranks.values()) and set(ranks.values()) <= set(rank_choices(8))
    assert len(set(ranks.values())) > 1 and {qm.weight.bits for qm in modules.values()} == {2}
    sizes = {r.name: sum(r.shape) for r in reports}
    assert sum(ranks[n] * sizes[n] for n in ranks) <= 8 * sum(sizes.values())
    for r in reports:  # the first pass measured every choice at the width
        assert set(r.loss_by_rank) == {2} and list(r.loss_by_rank[2]) == list(rank_choices(8))
        losses = list(r.loss_by_rank[2].values())
        assert all(a >= b for a, b in zip(losses, losses[1:], strict=False))  # more rank, less loss
    assert format_report(reports).splitlines()[0].split()[:3] == ["module", "shape", "rank"]
    for name, module in model.named_modules():  # the model computes the second pass's Q + BA
        if name in modules:
            torch.testing.assert_close(module.weight, modules[name].step0_weight())
    with pytest.raises(ValueError, match="quant.allocate_ranks spreads the parameters of adapter.rank"):
        quantize_model(model, ids, cfg, 0, progress=False)
    with pytest.raises(ValueError, match="quant.allocate_ranks needs a compensation"):
        QuantConfig(method="nf4", bits=4, allocate_ranks=True)


def test_calibration_feeds_quantized_outputs_forward():
    """Layer 1 is calibrated on the outputs of the already-quantized layer 0, not the float one."""
    cfg = QuantConfig(method="gptq", bits=2, group_size=32)
    fp, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    qmodel, _ = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    ids = calibration_tokens(CalibrationConfig(nsamples=8, seqlen=64), tok)
    modules, _ = quantize_model(qmodel, ids, cfg, 0, progress=False)

    def layer1_q_hessian(model):
        inputs, kwargs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=8)
        with torch.no_grad():
            hidden = [model.model.layers[0](h, **kw) for h, kw in zip(inputs, kwargs, strict=True)]
        q_proj = model.model.layers[1].self_attn.q_proj
        return accumulate_hessians(model.model.layers[1], {"q_proj": q_proj}, hidden, kwargs)["q_proj"]

    W = fp.model.layers[1].self_attn.q_proj.weight
    from_quantized = gptq_quantize(W, layer1_q_hessian(qmodel), 2, 32).codes
    from_float = gptq_quantize(W, layer1_q_hessian(fp), 2, 32).codes
    assert torch.equal(modules["model.layers.1.self_attn.q_proj"].weight.unpack().codes, from_quantized)
    assert not torch.equal(from_quantized, from_float)


def test_modules_reading_one_input_share_one_hessian():
    model, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    ids = calibration_tokens(CalibrationConfig(nsamples=4, seqlen=64), tok)
    inputs, kwargs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=2)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    members = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj, "o_proj": attn.o_proj}
    members |= {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}
    H = accumulate_hessians(layer, members, inputs, kwargs)
    assert H["q_proj"] is H["k_proj"] is H["v_proj"] and H["gate_proj"] is H["up_proj"]
    assert len({id(h) for h in H.values()}) == 4  # q/k/v, o, gate/up, down
    alone = accumulate_hessians(layer, {"v_proj": attn.v_proj}, inputs, kwargs)["v_proj"]
    torch.testing.assert_close(H["v_proj"], alone)


def test_phase_clock_waits_for_cuda_work_only_on_cuda(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    before = clock(torch.device("cpu"))
    assert waited == []
    assert clock(torch.device("cuda", 1)) >= before and waited == [torch.device("cuda", 1)]


def test_unsupported_architecture_is_refused():
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_model_and_tokenizer(
            ModelConfig(config={"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2})
        )


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        ({"group_size": 48}, r"layer 0 q_proj: group_size 48 does not divide in_features 64"),
        (
            {"bits": None, "budget_bits": 3.0, "group_size": 32, "group_size_choices": [32, 48]},
            r"layer 0 q_proj: group_size 48 does not divide in_features 64",
        ),
        (
            {"rank": 65, "group_size": 32},
            r"layer 0 q_proj: rank must be in \[0, min\(out, in\)\] = \[0, 64\]",
        ),
    ],
)
def test_impossible_settings_fail_before_calibration(quant, message):
    model, _ = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    rank = quant.pop("rank", 32)
    with pytest.raises(ValueError, match=message):
        quantize_model(
            model, torch.empty(0, 64, dtype=torch.long), QuantConfig(**quant), rank, progress=False
        )


def test_empty_calibration_set(tmp_path):
    model, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    with pytest.raises(ValueError, match="calibration set is empty"):
        quantize_model(
            model, torch.empty(0, 64, dtype=torch.long), QuantConfig(group_size=32), 8, progress=False
        )
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match=f"dataset file {empty} has no rows"):
        calibration_tokens(CalibrationConfig(dataset=str(empty)), tok)


def test_a_calibration_text_shorter_than_seqlen_is_one_clear_error(tmp_path):
    _, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    expected = f"calibration dataset {short} has only .* tokens, fewer than seqlen 128"
    with pytest.raises(ValueError, match=expected):
        calibration_tokens(CalibrationConfig(dataset=str(short), seqlen=128), tok)


def test_dataset_row_missing_field_names_file_and_row(tmp_path):
    _, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    data = tmp_path / "rows.jsonl"
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Say bye", "input": ""}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=rf"{data}, row 1: missing field\(s\) \['output'\]"):
        calibration_tokens(CalibrationConfig(dataset=str(data), nsamples=2, seqlen=16), tok)


def test_calibration_renders_alpaca_rows_and_is_seeded(tmp_path):
    _, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    data = tmp_path / "rows.json"
    data.write_text(
        json.dumps(
            [
                {"instruction": f"Count to {i}", "input": "", "output": " ".join(map(str, range(i)))}
                for i in range(40)
            ]
        )
    )
    cfg = CalibrationConfig(dataset=str(data), nsamples=4, seqlen=32, seed=3)
    a, b = calibration_tokens(cfg, tok), calibration_tokens(cfg, tok)
    assert a.shape == (4, 32) and torch.equal(a, b)
    text = tok.decode(
        calibration_tokens(CalibrationConfig(dataset=str(data), nsamples=1, seqlen=200), tok)[0]
    )
    assert "### Instruction:\nCount to" in text and "### Response:\n" in text


@pytest.mark.parametrize("suffix", [".parquet", ".txt"])
def test_calibration_reads_parquet_and_text_files(tmp_path, suffix):
    _, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    path = tmp_path / f"corpus{suffix}"
    texts = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(20)]
    if suffix == ".parquet":
        import pandas as pd

        pd.DataFrame({"text": texts}).to_parquet(path)
    else:
        path.write_text("\n".join(texts))
    ids = calibration_tokens(CalibrationConfig(dataset=str(path), nsamples=2, seqlen=64), tok)
    assert ids.shape == (2, 64)
    assert "quick brown fox" in tok.decode(ids[0])
