"""The output Fisher of each quantized module, streamed layer by layer."""

import pytest
import torch
import torch.nn.functional as F

from projq_train.config import CalibrationConfig, ModelConfig
from projq_train.data.calibration import calibration_tokens
from projq_train.models import build_skeleton, load_model_and_tokenizer, model_config
from projq_train.quant.calibrate import target_shapes
from projq_train.quant.sensitivity import output_sensitivities, weighted_error
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
