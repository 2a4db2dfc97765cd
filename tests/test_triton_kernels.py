"""The fused Triton kernels against the torch reference.

On CUDA they run natively. Without a GPU they run under Triton's interpreter
(``TRITON_INTERPRET=1``, CPU tensors) in a subprocess, since the variable must be set before
Triton compiles anything. Both skip cleanly where Triton is not installed.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from projq_train.quant.linear import QuantLinear
from projq_train.quant.pack import PackedWeight, dequantize_packed
from projq_train.quant.rtn import rtn_quantize

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
ROOT = Path(__file__).parents[1]


def check_kernels(device: str, dtypes: tuple[torch.dtype, ...]) -> None:
    """Every path of both products equals ``x Ŵᵀ`` / ``dy Ŵ`` over bit widths, ragged and
    act-order shapes, and the row counts each path serves (and others)."""
    from projq_train.quant import triton_kernels as tk

    gen = torch.Generator().manual_seed(0)
    cases = [(3, 40, 96, 32, False), (2, 17, 64, -1, True), (4, 64, 128, 64, True), (3, 8, 100, -1, False)]
    for bits, out_f, in_f, gs, act_order in cases:
        q = rtn_quantize(torch.randn(out_f, in_f, generator=gen), bits, gs)
        if act_order:
            q.g_idx = q.g_idx[torch.randperm(in_f, generator=gen)]
        tensors = tuple(PackedWeight.from_quantized(q).to(device).tensors().values())
        w_t = dequantize_packed(*tensors, bits, torch.float32)  # (in, out)
        for dtype in dtypes:
            tol = 1e-4 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(tk.dequantize(*tensors, bits, dtype), w_t.to(dtype), rtol=0, atol=0)
            # by token count (None), and each path also on row counts it is not picked for
            for m, path in [
                (1, None),
                (5, None),
                (19, None),
                (5, "gemv"),
                (19, "split"),
                (1, "tiled"),
                (19, "dense"),
            ]:
                x = torch.randn(m, in_f, generator=gen).to(device, dtype)
                y = tk.matmul(x, *tensors, bits, path)
                assert y.dtype == dtype
                torch.testing.assert_close(y.float(), x.float() @ w_t, atol=tol * 10, rtol=tol)
            for m, path in [(1, None), (19, None), (19, "dense")]:
                dy = torch.randn(m, out_f, generator=gen).to(device, dtype)
                dx = tk.matmul_grad_input(dy, *tensors, bits, path)
                assert dx.dtype == dtype
                torch.testing.assert_close(dx.float(), dy.float() @ w_t.T, atol=tol * 10, rtol=tol)
    assert tk.self_test(torch.device(device)) is None


def check_self_test_catches_a_wrong_kernel(device: str) -> None:
    from projq_train.quant import triton_kernels as tk

    right = tk.matmul_grad_input
    tk.matmul_grad_input = lambda *args: right(*args) * 1.01
    assert "grad_input (tiled) at 2 bits" in tk.self_test(torch.device(device))
    tk.matmul_grad_input, right = right, tk.dequantize
    tk.dequantize = lambda *args: right(*args) * 1.01  # only the dense path uses it
    assert "forward (dense) at 2 bits" in tk.self_test(torch.device(device))


def check_round_columns(device: str) -> None:
    """GPTQ's fused sub-block rounding against the torch loop (``gptq.round_columns_torch`` on CPU
    tensors): the same codes (ties to even included; on a GPU all but a few near ties), the errors
    and the fed-forward rows to float rounding, on ragged shapes; then a whole GPTQ run."""
    from projq_train.quant import gptq
    from projq_train.quant import triton_kernels as tk

    def same_codes(a: Tensor, b: Tensor) -> bool:
        return torch.equal(a.cpu(), b) if device == "cpu" else (a.cpu() != b).float().mean() < 1e-3

    gen = torch.Generator().manual_seed(0)
    for rows, outputs in [(16, 100), (5, 33), (1, 7), (24, 300)]:
        A = torch.randn(rows, rows, generator=gen)
        Hinv1 = torch.linalg.cholesky(A @ A.T + rows * torch.eye(rows)).T  # upper, column-major
        scale = torch.rand(outputs, generator=gen) * 0.3 + 0.05
        zero = torch.randint(0, 8, (outputs,), generator=gen).float()
        W1 = torch.randn(rows, outputs, generator=gen)
        W1[0, :4] = torch.tensor([0.5, 1.5, -2.5, 2.5]) * scale[:4]  # ties
        reference = (W1.clone(), torch.zeros_like(W1), torch.zeros_like(W1))
        gptq.round_columns_torch(reference[0], Hinv1, scale, -zero, 7 - zero, *reference[1:])
        w, q, err = (t.to(device) for t in (W1, torch.zeros_like(W1), torch.zeros_like(W1)))
        on = (t.to(device) for t in (Hinv1, scale, -zero, 7 - zero))
        tk.round_columns(w, *on, q, err)
        assert same_codes(q, reference[1])
        torch.testing.assert_close(err.cpu(), reference[2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.cpu(), reference[0], rtol=1e-5, atol=1e-6)
    X, W = torch.randn(256, 96, generator=gen), torch.randn(40, 96, generator=gen)
    reference = gptq.gptq_quantize(W, X.T @ X / 256, 3, 32, clip=True)  # groups of 32: two sub-blocks each
    dispatch, right = gptq.round_columns, tk.round_columns
    try:
        gptq.round_columns = right  # what CUDA tensors get
        fused = gptq.gptq_quantize(W.to(device), (X.T @ X / 256).to(device), 3, 32, clip=True)
        assert same_codes(fused.codes, reference.codes)
        torch.testing.assert_close(fused.scales.cpu(), reference.scales, rtol=1e-5, atol=0)
        # the self-test that lets GPTQ use the kernel on a device, and refuses a wrong one
        gptq.triton_rounding.cache_clear()
        assert gptq.triton_rounding(torch.device(device))
        tk.round_columns = lambda W1, Hinv1, *rest: right(W1, Hinv1 * 1.01, *rest)
        gptq.triton_rounding.cache_clear()
        assert not gptq.triton_rounding(torch.device(device))
    finally:
        gptq.round_columns, tk.round_columns = dispatch, right
        gptq.triton_rounding.cache_clear()


def run_interpreted(check: str) -> None:
    code = f"import torch; from tests.test_triton_kernels import *; {check}"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_kernels_match_the_torch_reference_interpreted():
    # the interpreter checks the kernels' logic in fp32 (it is slow: fp16 would double the time,
    # and its tl.dot mishandles bf16 operands); fp16 and bf16 are checked on CUDA
    run_interpreted("check_kernels('cpu', (torch.float32,))")


def test_self_test_catches_a_wrong_kernel_interpreted():
    run_interpreted("check_self_test_catches_a_wrong_kernel('cpu')")


def test_gptq_rounding_kernel_matches_the_torch_loop_interpreted():
    run_interpreted("check_round_columns('cpu')")


@pytest.fixture
def one_config_per_kernel(monkeypatch):
    """Autotuning benchmarks every configuration of a kernel for each new shape, dtype and bit
    width: with it the CUDA tests below did not finish in 150 s on an H200. They check the kernels'
    numerics on the hardware with each kernel's first configuration; the product's startup
    self-test runs the autotuned ones."""
    from projq_train.quant import triton_kernels as tk

    for tuner in (*tk._matmul.values(), tk._grad_input):
        monkeypatch.setattr(tuner, "configs", tuner.configs[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("one_config_per_kernel")
def test_kernels_match_the_torch_reference_on_cuda():
    check_kernels("cuda", (torch.float32, torch.float16, torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_rounding_kernel_matches_the_torch_loop_on_cuda():
    check_round_columns("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("one_config_per_kernel")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quant_linear_picks_triton_on_cuda_and_agrees_with_torch(bits):
    torch.manual_seed(0)
    pw = PackedWeight.from_quantized(rtn_quantize(torch.randn(384, 512), bits, 128)).to("cuda")
    fused, ref = QuantLinear.from_packed(pw), QuantLinear.from_packed(pw, backend="torch")
    assert fused._fused(torch.empty(1, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(4, 33, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    fused(x).float().square().sum().backward()
    ref(x_ref).float().square().sum().backward()
    torch.testing.assert_close(fused(x), ref(x_ref), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=5e-1, rtol=5e-2)
