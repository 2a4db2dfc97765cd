"""The chunked linear + cross-entropy equals the full-logits loss (values and gradients) and keeps no
logits-sized tensor for backward."""

import pytest
import torch
import torch.nn.functional as F

from projq_train.data.instruct import IGNORE_INDEX
from projq_train.loss import causal_lm_loss_from_hidden, linear_cross_entropy
from tests.conftest import peak_allocated_bytes

B, T, H, V = 3, 9, 16, 37


def full_loss(hidden, weight, labels, num_tokens=None):
    """The plain loss: full logits, shifted, ``F.cross_entropy`` summed over the labelled targets."""
    logits = (hidden.to(weight.dtype) @ weight.T).float()  # (B, T, V)
    targets = labels[:, 1:].flatten()
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (num_tokens if num_tokens is not None else (targets != IGNORE_INDEX).sum())


def batch(dtype=torch.float32, seed=0):
    """hidden (B, T, H), weight (V, H) and labels (B, T) with a masked prompt and right padding."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, -2:] = IGNORE_INDEX  # padding
    return hidden, weight, labels


def value_and_grads(loss_fn, hidden, weight, labels, weight_grad=True, **kw):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_(weight_grad)
    loss = loss_fn(hidden, weight, labels, **kw)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def labelled(labels) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("chunk_tokens", [None, 1, 7, 1000])
def test_chunked_loss_and_gradients_equal_the_full_loss(chunk_tokens, weight_grad):
    hidden, weight, labels = batch()
    assert labelled(labels) % 7 != 0  # the chunk of 7 rows does not divide the labelled rows
    got = value_and_grads(
        causal_lm_loss_from_hidden, hidden, weight, labels, weight_grad, chunk_tokens=chunk_tokens
    )
    want = value_and_grads(full_loss, hidden, weight, labels, weight_grad)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    if weight_grad:
        torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=1e-5)
    else:
        assert got[2] is None
    assert (got[1][0, :2] == 0).all() and (got[1][1, -3:] == 0).all()  # rows without a target


def test_float64_inputs_match_tightly():
    hidden, weight, labels = batch(torch.float64)
    got = value_and_grads(causal_lm_loss_from_hidden, hidden, weight, labels, chunk_tokens=4)
    want = value_and_grads(full_loss, hidden.float(), weight.float(), labels)
    ref64 = value_and_grads(full_loss, hidden, weight, labels)
    # the logits are fp32 in both losses; the gradients keep the inputs' dtype
    assert got[1].dtype == got[2].dtype == torch.float64
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    for g, r in zip(got[1:], ref64[1:], strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_tokens", [50.0, torch.tensor(13)])
def test_explicit_num_tokens_divides_the_sum(num_tokens):
    hidden, weight, labels = batch()
    got = value_and_grads(
        causal_lm_loss_from_hidden, hidden, weight, labels, num_tokens=num_tokens, chunk_tokens=5
    )
    want = value_and_grads(full_loss, hidden, weight, labels, num_tokens=num_tokens)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_bf16_hidden(weight_dtype):
    hidden, weight, labels = batch()
    hidden, weight = hidden.bfloat16(), weight.to(weight_dtype)
    got = value_and_grads(causal_lm_loss_from_hidden, hidden, weight, labels, chunk_tokens=5)
    want = value_and_grads(full_loss, hidden, weight, labels)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == weight_dtype
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)


def test_all_ignored_labels_give_a_finite_zero_with_zero_gradients():
    hidden, weight, _ = batch()
    labels = torch.full((B, T), IGNORE_INDEX)
    hidden.requires_grad_(), weight.requires_grad_()
    loss = causal_lm_loss_from_hidden(hidden, weight, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_ignored_targets_inside_linear_cross_entropy():
    hidden, weight, labels = batch()
    rows, targets = hidden.flatten(0, 1), labels.flatten()
    got = value_and_grads(
        lambda h, w, y: linear_cross_entropy(h, w, y, chunk_tokens=4), rows, weight, targets
    )
    want = value_and_grads(
        lambda h, w, y: F.cross_entropy(h @ w.T, y, ignore_index=IGNORE_INDEX, reduction="sum"),
        rows,
        weight,
        targets,
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_no_grad_gives_the_value_and_computes_no_gradient():
    hidden, weight, labels = batch()
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.no_grad():
        loss = causal_lm_loss_from_hidden(hidden, weight, labels, chunk_tokens=3)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, full_loss(hidden, weight, labels).detach(), atol=1e-5, rtol=1e-5)


def saved_numels(loss_fn) -> list[int]:
    """numel of every tensor the autograd graph of ``loss_fn()`` saves for backward."""
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return numels


@pytest.mark.parametrize("chunk_tokens", [None, 16])
def test_no_logits_sized_tensor_is_saved_for_backward(chunk_tokens):
    b, t, h, v = 4, 33, 16, 64  # H < N, so even the (V, H) weight gradient is smaller than (N, V)
    hidden = torch.randn(b, t, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (b, t))
    n_logits = b * (t - 1) * v
    full = saved_numels(lambda: full_loss(hidden, weight, labels))
    assert max(full) >= n_logits  # the check can fail: the full loss keeps (N, V) for backward
    chunked = saved_numels(
        lambda: causal_lm_loss_from_hidden(hidden, weight, labels, chunk_tokens=chunk_tokens)
    )
    assert chunked and max(chunked) < n_logits, chunked


def test_bad_shapes_and_chunk_size_are_clear_errors():
    hidden, weight, labels = batch()
    with pytest.raises(
        ValueError, match=r"hidden \(N, H\) and weight \(V, H\), got \(27, 16\) and \(37, 8\)"
    ):
        linear_cross_entropy(hidden.flatten(0, 1), weight[:, :8], labels.flatten())
    with pytest.raises(ValueError, match=r"targets must be \(27,\)"):
        linear_cross_entropy(hidden.flatten(0, 1), weight, labels)
    with pytest.raises(ValueError, match="chunk_tokens must be at least 1, got 0"):
        causal_lm_loss_from_hidden(hidden, weight, labels, chunk_tokens=0)


def test_a_weight_sharded_by_fsdp2_is_gathered(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    hidden, weight, labels = batch()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        sharded = distribute_tensor(weight, init_device_mesh("cpu", (1,)), [Shard(0)]).requires_grad_()
        hidden.requires_grad_()
        causal_lm_loss_from_hidden(hidden, sharded, labels, chunk_tokens=5).backward()
        want = value_and_grads(full_loss, hidden, weight, labels)
        torch.testing.assert_close(hidden.grad, want[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sharded.grad.full_tensor(), want[2], atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("weight_grad", [True, False])
def test_a_chunk_holds_one_vocab_sized_buffer(weight_grad):
    rows, h, v = 64, 8, 8192
    hidden = torch.randn(rows, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=weight_grad)
    targets = torch.randint(0, v, (rows,))
    buffer = rows * v * 4  # one chunk's fp32 logits
    # the measurement sees a kernel's workspace: logsumexp of logits alone holds two buffers
    logits = lambda: hidden.detach() @ weight.detach().T  # noqa: E731
    assert peak_allocated_bytes(lambda: torch.logsumexp(logits(), -1)) >= 2 * buffer
    weight_grad_bytes = v * h * 4 if weight_grad else 0  # the fp32 weight-gradient accumulator
    peak = peak_allocated_bytes(lambda: linear_cross_entropy(hidden, weight, targets, chunk_tokens=rows))
    assert buffer <= peak - weight_grad_bytes < 1.1 * buffer, peak / buffer
