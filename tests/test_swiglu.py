"""The lean gated MLP: the same values and gradients as silu(gate) * up, one tensor fewer saved."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from projq_train.swiglu import swiglu, use_lean_mlps
from tests.conftest import TINY


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves while ``fn()`` runs."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def test_swiglu_equals_silu_times_up_in_values_and_gradients():
    gate, up = (torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad = torch.randn(3, 5, 16, dtype=torch.float64)
    expected = torch.nn.functional.silu(gate) * up
    expected_grads = torch.autograd.grad(expected, (gate, up), grad)
    got = swiglu(gate, up)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for g, e in zip(torch.autograd.grad(got, (gate, up), grad), expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_lean_mlps_replace_the_gated_mlps_and_keep_the_model_s_outputs_and_gradients():
    model = LlamaForCausalLM(LlamaConfig(**TINY["llama"])).double()
    ids = torch.randint(0, 259, (2, 12))
    reference = model(ids).logits
    reference_grads = torch.autograd.grad(reference.square().sum(), list(model.parameters()))
    assert use_lean_mlps(model) == TINY["llama"]["num_hidden_layers"]
    lean = model(ids).logits
    torch.testing.assert_close(lean, reference, rtol=0, atol=0)
    for g, e in zip(
        torch.autograd.grad(lean.square().sum(), list(model.parameters())), reference_grads, strict=True
    ):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_swiglu_saves_gate_and_up_only():
    gate, up = (torch.randn(4, 64, requires_grad=True) for _ in range(2))
    plain = saved_bytes(lambda: torch.nn.functional.silu(gate) * up)
    assert saved_bytes(lambda: swiglu(gate, up)) == 2 * 4 * 64 * 4 < plain  # gate, up vs + silu(gate)
