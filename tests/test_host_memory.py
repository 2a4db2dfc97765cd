import torch
from torch import nn

from projq_train import host_memory


def test_free_pages_are_returned_after_every_few_layers_and_outputs_are_unchanged(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "return_free_pages", lambda: calls.append(len(calls)))
    torch.manual_seed(0)
    layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(10)])
    x = torch.randn(3, 8)
    expected = layers(x)
    handles = host_memory.release_during_forward(list(layers), every=4)
    assert len(handles) == 2  # after layers 4 and 8 (indices 3 and 7)
    torch.testing.assert_close(layers(x), expected, rtol=0, atol=0)
    assert len(calls) == 2
    for h in handles:
        h.remove()
    layers(x)
    assert len(calls) == 2


def test_the_non_finite_check_reads_big_tensors_in_chunks_and_finds_a_nan_in_the_last(monkeypatch):
    from projq_train import weights

    monkeypatch.setattr(weights, "FINITE_CHECK_ELEMENTS", 7)  # 100 elements: 15 chunks
    seen = []
    real_isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or real_isfinite(t))
    clean, dirty = torch.ones(10, 10), torch.ones(10, 10)
    dirty[-1, -1] = float("nan")
    assert weights.first_nonfinite([("clean", clean), ("ids", torch.arange(5)), ("dirty", dirty)]) == "dirty"
    assert max(seen) == 7 and sum(seen) == 200  # every element of both, never more than 7 at once
    assert weights.first_nonfinite([("clean", clean)]) is None
