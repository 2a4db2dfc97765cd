import torch

from projq_train.config import CalibrationConfig, ModelConfig
from projq_train.data.calibration import calibration_tokens
from projq_train.models import decoder_layers, load_model_and_tokenizer
from projq_train.quant.layerwise import capture_layer_inputs, run_layer
from tests.conftest import TINY


def test_layer_by_layer_reaches_the_models_last_hidden_states():
    """Capturing the first layer's inputs and running the layers one after the other gives what
    the whole model's forward gives (the final norm applied to both), batch by batch."""
    model, tok = load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))
    ids = calibration_tokens(CalibrationConfig(nsamples=5, seqlen=32), tok)
    with torch.no_grad():
        inputs, kwargs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=2)
        assert [h.shape[0] for h in inputs] == [2, 2, 1]
        torch.testing.assert_close(torch.cat(inputs), model.model.embed_tokens(ids))
        for layer in decoder_layers(model):
            inputs = run_layer(layer, inputs, kwargs)
        last = model.model.norm(torch.cat(inputs))
        whole = model.model(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(last, whole)
