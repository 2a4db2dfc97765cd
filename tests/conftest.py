import os
from pathlib import Path

import pytest
import torch

from projq_train.config import ModelConfig

# the workplace's real models and datasets, next to the repository (tests that need them skip without)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMOLLM2 = SHARED_DATA / "models" / "SmolLM2-135M-Instruct-Q4_1-gguf"

_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
TINY = {family: {"model_type": family, **_SHAPE} for family in ("llama", "qwen2", "qwen3", "mistral")}


def pytest_configure(config):
    """Under pytest-xdist (``-n N``) every worker computes on one thread, and so do the processes
    its tests start: N workers with a thread per core each would oversubscribe the cores."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(params=sorted(TINY))
def tiny_model_config(request) -> ModelConfig:
    """A tiny random model of each supported family we test, built from a config (no download)."""
    return ModelConfig(config=TINY[request.param])


def flip_a_bit_of(path, tensor):
    """Flip one bit inside ``tensor``'s bytes where they are stored in the file at ``path``."""
    raw = bytearray(path.read_bytes())
    at = raw.find(tensor.contiguous().view(torch.uint8).numpy().tobytes()[:64])
    assert at >= 0
    raw[at + 7] ^= 0x01
    path.write_bytes(bytes(raw))


def peak_allocated_bytes(fn) -> int:
    """The most CPU memory that tensors (kernels' workspaces included) held at once while ``fn``
    ran, from the profiler's allocation timeline (``_memory_profile``, what torch's own
    ``export_memory_timeline`` reads)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action.name == "CREATE":
            live += size
        elif action.name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return peak


def artifact_root_entries(root) -> list[Path]:
    """What an artifact root holds besides the writers' lock files (``.locks/``)."""
    from projq_train.artifact import LOCKS

    return [p for p in Path(root).iterdir() if p.name != LOCKS]
