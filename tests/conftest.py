import pytest

from projq_train.config import ModelConfig

TINY = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    },
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    },
}


@pytest.fixture(params=sorted(TINY))
def tiny_model_config(request) -> ModelConfig:
    """A tiny random model of each supported family we test, built from a config (no download)."""
    return ModelConfig(config=TINY[request.param])
