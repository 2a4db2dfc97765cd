"""The output Fisher of each quantized module, streamed layer by layer."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from projq_train.config import CalibrationConfig, ModelConfig, QuantConfig
from projq_train.data.calibration import calibration_tokens
from projq_train.models import build_skeleton, load_model_and_tokenizer, model_config
from projq_train.quant import spectral_tail
from projq_train.quant.calibrate import accumulate_hessians, quantize_model, target_shapes
from projq_train.quant.layerwise import capture_layer_inputs
from projq_train.quant.sensitivity import (
    compensation_row_weights,
    output_sensitivities,
    weighted_error,
    weighted_tails,
)
from projq_train.weights import RandomInitSource
from tests.conftest import TINY


def whole_model_sensitivities(model, ids, names):
    """The reference: one backward pass of the whole model, output gradients kept by hooks."""
    outputs = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out))
        for n in names
    ]
    with torch.enable_grad():
        logits = model(input_ids=ids).logits
        for out in outputs.values():
            out.retain_grad()
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    for h in handles:
        h.remove()
    return {n: outputs[n].grad.pow(2).flatten(0, 1).mean(0) for n in names}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_streamed_sensitivities_equal_one_backward_pass_of_the_whole_model(family):
    model, tok = load_model_and_tokenizer(ModelConfig(config={**TINY[family], "tie_word_embeddings": False}))
    ids = calibration_tokens(CalibrationConfig(nsamples=4, seqlen=32), tok)
    names = list(target_shapes(model, ["q_proj", "o_proj", "up_proj", "down_proj"]))
    expected = whole_model_sensitivities(model, ids, names)
    before = {n: t.clone() for n, t in model.state_dict().items()}

    in_place = output_sensitivities(model, ids, names, torch.device("cpu"))
    skeleton = build_skeleton(model_config(ModelConfig(config=model.config.to_dict())), torch.float32)
    streamed = output_sensitivities(skeleton, ids, names, torch.device("cpu"), RandomInitSource(skeleton, 0))

    for n in names:
        torch.testing.assert_close(in_place[n], expected[n], rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(streamed[n], expected[n], rtol=1e-4, atol=1e-10)
        assert expected[n].shape == (model.get_submodule(n).out_features,) and expected[n].sum() > 0
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # weights untouched
    assert all(t.is_meta for n, t in skeleton.state_dict().items())  # the skeleton is left empty


def test_weighted_error_predicts_the_loss_increase_of_a_small_output_error():
    """½ Σ_j F_j (E H Eᵀ)_jj against the measured second-order loss change of a small random
    error in one module, ``(L(W + E) + L(W − E)) / 2 − L(W)`` (the first-order term cancels), on
    text the model samples itself: there the empirical Fisher is the Fisher, which is the loss's
    expected curvature; a random model on real text is nowhere near a minimum."""
    model, _ = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    torch.manual_seed(0)
    start = torch.full((16, 1), 5)
    ids = model.generate(
        start,
        attention_mask=torch.ones_like(start),
        pad_token_id=0,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        max_new_tokens=63,
        min_new_tokens=63,
    )
    name = "model.layers.1.mlp.down_proj"
    module = model.get_submodule(name)
    F_out = output_sensitivities(model, ids, [name], torch.device("cpu"))[name]
    inputs = []
    handle = module.register_forward_hook(lambda m, a, out: inputs.append(a[0].flatten(0, 1)))

    def loss():
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()

    base = loss()
    handle.remove()
    X = torch.cat(inputs)
    H = X.T @ X / X.shape[0]
    ratios = []
    for seed in range(4):
        E = torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(seed)) * 2e-2
        module.weight.data += E
        up = loss()
        module.weight.data -= 2 * E
        down = loss()
        module.weight.data += E
        measured = ((up + down) / 2 - base) / ids.numel()
        ratios.append(measured / (0.5 * weighted_error(E, H, F_out)))
    assert all(0.5 < r < 2.0 for r in ratios), ratios


def test_fisher_compensation_is_the_best_one_in_the_fisher_weighted_norm():
    """``quant.compensation: fisher``: the driver measures the output Fisher first (a phase of the
    report), keeps GPTQ's codes (its rows are independent of each other), and gives each module of
    the first layer the compensation that is optimal in the norm weighted by
    ``compensation_row_weights`` of that Fisher: it reaches that norm's spectral tail, below what
    the Hessian-norm compensation leaves there."""
    model, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    ids = calibration_tokens(CalibrationConfig(nsamples=4, seqlen=32), tok)
    fresh, plain_model = copy.deepcopy(model), copy.deepcopy(model)
    cfg, rank = QuantConfig(method="gptq", bits=2, group_size=32), 6
    fisher, reports = quantize_model(model, ids, replace(cfg, compensation="fisher"), rank, progress=False)
    plain, plain_reports = quantize_model(plain_model, ids, cfg, rank, progress=False)
    assert all(r.phase_seconds["sensitivity pass"] > 0 for r in reports)
    assert not any("sensitivity pass" in r.phase_seconds for r in plain_reports)

    layer = fresh.model.layers[0]
    members = {"q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj}
    names = [f"model.layers.0.self_attn.{n}" for n in members]
    sensitivities = output_sensitivities(fresh, ids, names, torch.device("cpu"))
    inputs, kwargs = capture_layer_inputs(fresh, ids, torch.device("cpu"), batch_size=8)
    hessians = accumulate_hessians(layer, members, inputs, kwargs)
    for (short, module), name in zip(members.items(), names, strict=True):
        H, W = hessians[short].double(), module.weight.double()
        assert torch.equal(fisher[name].weight.unpack().codes, plain[name].weight.unpack().codes)
        E = W - fisher[name].weight.dequantize().double()
        d = compensation_row_weights(sensitivities[name]).double()[:, None]

        def weighted(qm, E=E, d=d, H=H):
            residual = d * (E - qm.lora_B.double() @ qm.lora_A.double())
            return torch.trace(residual @ H @ residual.T).item()

        assert weighted(fisher[name]) == pytest.approx(spectral_tail(d * E, H, rank), rel=1e-3)
        assert weighted(fisher[name]) < 0.99 * weighted(plain[name])


def test_weighted_tails_are_what_the_best_correction_of_each_rank_leaves_in_the_loss_norm():
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in ((24, 40), (40, 24)):  # either Gram matrix
        E = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
        X = torch.randn(200, in_f, generator=g, dtype=torch.float64)
        H = X.T @ X / 200
        F_out = torch.rand(out_f, generator=g, dtype=torch.float64)
        F_H = torch.linalg.cholesky(H)
        tails = weighted_tails(E, F_H, F_out, (0, 3, 10, 24, 30))
        d = F_out.sqrt()[:, None]
        U, S, Vh = torch.linalg.svd(d * E @ F_H, full_matrices=False)
        for r, tail in tails.items():  # the best rank-r correction in that norm, built directly
            C = (U[:, :r] * S[:r]) @ Vh[:r] @ torch.linalg.inv(F_H) / d
            assert tail == pytest.approx(weighted_error(E - C, H, F_out), rel=1e-9, abs=1e-9)
        assert tails[0] == pytest.approx(weighted_error(E, H, F_out), rel=1e-9)
        assert tails[24] == tails[30] == pytest.approx(0.0, abs=1e-9)  # rank 24 removes it all
