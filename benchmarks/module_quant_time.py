"""Quantization time of one module: GPTQ with the clipped grid (its column loop fused on CUDA, and
the torch loop), `refresh` (5 rounds) and their parts, on random weights and a random Hessian of
the given shapes (time depends on shapes, not on values).

The Hessian is ``XᵀX / N`` of 8192 random tokens mixed across channels, a few of them 20× larger
(outlier channels). 3 bits, group size 128, rank 32; each time is the best of two runs after a
warm-up (the Triton kernel compiles on first use); the torch loop and `refresh` run once after
theirs; "iterates": how many quantizations `refresh` scored (its first and each round's, until the
tail stops improving). On CUDA each timing waits for the device (``torch.cuda.synchronize``);
``--profile`` adds torch.profiler tables of one `refresh` call and one GPTQ call on the first shape
(kernel launches against device time).

    python benchmarks/module_quant_time.py --device cuda --shapes 4096x4096 11008x4096 4096x11008
    python benchmarks/module_quant_time.py --device cpu --shapes 576x576   # the CPU path, small

Prints a markdown table (the one quoted in README).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch

from projq_train.quant import gptq
from projq_train.quant.projq import hessian_factor, projq_quantize

SETTINGS = {"bits": 3, "group_size": 128, "clip": True}
RANK, ROUNDS, TOKENS = 32, 5, 8192


def timed(fn: Callable[[], Any], device: torch.device, reps: int = 2) -> tuple[float, Any]:
    """The best of ``reps`` runs of ``fn`` after an untimed warm-up, and its result."""

    def run() -> tuple[float, Any]:
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, out

    fn()
    runs = [run() for _ in range(reps)]
    return min(t for t, _ in runs), runs[-1][1]


def random_hessian(in_features: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    mix = torch.randn(in_features, in_features, device=device, generator=gen) / in_features**0.5
    X = torch.randn(TOKENS, in_features, device=device, generator=gen) @ (
        torch.eye(in_features, device=device) + 0.5 * mix
    )
    X[:, :8] *= 20  # a few outlier channels
    return X.T @ X / TOKENS


def measure(out_f: int, in_f: int, device: torch.device, profile: bool) -> dict[str, float]:
    gen = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(out_f, in_f, device=device, generator=gen) * 0.02
    H = random_hessian(in_f, device, gen)
    row: dict[str, float] = {}
    row["factor"], factors = timed(lambda: hessian_factor(H), device)
    row["gptq"], _ = timed(lambda: gptq.gptq_quantize(W, H, **SETTINGS), device)
    with mock.patch.object(gptq, "triton_rounding", lambda _device: False):
        row["gptq_torch_loop"], _ = timed(lambda: gptq.gptq_quantize(W, H, **SETTINGS), device, reps=1)

    def refresh():
        return projq_quantize(W, H, rank=RANK, iters=ROUNDS, mode="refresh", factors=factors, **SETTINGS)

    row["refresh"], (_, tails) = timed(refresh, device, reps=1)
    row["iterates"] = len(tails)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name, fn in (("refresh", refresh), ("gptq", lambda: gptq.gptq_quantize(W, H, **SETTINGS))):
            with profiler(activities=activities) as prof:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            print(f"\n{name} on {out_f}x{in_f}:")
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"], help="out x in")
    ap.add_argument("--profile", action="store_true", help="profiler tables for the first shape")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for i, shape in enumerate(args.shapes):
        out_f, in_f = map(int, shape.split("x"))
        rows.append((shape, measure(out_f, in_f, device, args.profile and i == 0)))
    print(f"\n{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; seconds per module")
    print("\n| out×in | Hessian factor | GPTQ-clip | GPTQ-clip, torch loop | refresh | iterates ", end="")
    print("| refresh / GPTQ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape, r in rows:
        print(
            f"| {shape} | {r['factor']:.3f} | {r['gptq']:.3f} | {r['gptq_torch_loop']:.3f} | "
            f"{r['refresh']:.3f} | {r['iterates']:.0f} | {r['refresh'] / r['gptq']:.2f}× |"
        )


if __name__ == "__main__":
    main()
