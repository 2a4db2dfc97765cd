"""Speed and weight memory of the packed QuantLinear against dense and bitsandbytes NF4 layers.

For each layer shape ``out×in`` and token count it times the forward pass and the forward
plus the backward pass to the input (what a frozen base layer costs during LoRA training) of

- ``dense``: ``nn.Linear`` in the compute dtype (bf16 on CUDA, fp32 on CPU);
- ``nf4``: bitsandbytes ``Linear4bit`` (NF4, blocksize 64, the QLoRA layer);
- ``torch-wN``: QuantLinear, torch backend (dequantize, then matmul);
- ``triton-wN``: QuantLinear, fused Triton kernels (CUDA only);
- ``...-rot`` (with ``--rotated-inputs``): the same layer quantized with ``quant.rotate_inputs``
  (it rotates its input before the matmul: :mod:`projq_train.quant.rotation`).

and reports the stored weight bytes of each. On CUDA, times are GPU times with the L2 cache
flushed before each call, and the 1-token rows also give the effective bandwidth of reading
the packed weight as a share of the device's measured copy bandwidth (the roofline a
memory-bound product can reach).

    python benchmarks/packed_kernels.py               # CUDA: 7B shapes, tokens 1 16 512 4096
    python benchmarks/packed_kernels.py --device cpu  # CPU: half-size shapes, tokens 1 16 512

Prints a markdown table (the one quoted in README).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from projq_train.quant.linear import QuantLinear, triton_ready
from projq_train.quant.pack import PackedWeight
from projq_train.quant.rotation import rotate
from projq_train.quant.rtn import rtn_quantize

SHAPES_7B = ["4096x4096", "11008x4096", "4096x11008"]  # out x in: attention, MLP up/gate, MLP down
SHAPES_CPU = ["2048x2048", "5504x2048", "2048x5504"]  # half the 7B sizes


def weight_bytes(layer: nn.Module) -> int:
    """Bytes of the stored weight (and its quantization state), bias excluded."""
    if isinstance(layer, QuantLinear):
        return sum(t.numel() * t.element_size() for t in layer.packed_tensors())
    w = layer.weight
    total = w.numel() * w.element_size()
    state = getattr(w, "quant_state", None)
    if state is not None:  # NF4: absmax (possibly double-quantized) and the code book
        for t in (state.absmax, state.code, getattr(state.state2, "absmax", None)):
            total += 0 if t is None else t.numel() * t.element_size()
    return total


def timer(device: torch.device, fn, repeats: int, grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds of ``fn()``. On CUDA: GPU time from CUDA events with the L2 cache
    flushed before each call (``triton.testing.do_bench``), so a layer's weight is read from HBM
    and host-side launch time overlaps the flush. On CPU: wall time after two warm-up calls."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written per second)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(device, lambda: dst.copy_(src), 10)
    return 2 * src.numel() / ms / 1e6


def build_layers(
    out_f: int, in_f: int, bits: list[int], group_size: int, dtype, device, rotated: bool = False
) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.float32)
    layers: dict[str, nn.Module] = {"dense": dense.to(dtype)}
    try:
        import bitsandbytes as bnb

        nf4 = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4")
        nf4.weight = bnb.nn.Params4bit(
            dense.weight.detach().float().cpu(), requires_grad=False, quant_type="nf4"
        )
        layers["nf4"] = nf4.to(device)
    except Exception as err:  # bitsandbytes without a backend for this device
        print(f"nf4 skipped: {type(err).__name__}: {err}")
    for b in bits:
        pw = PackedWeight.from_quantized(rtn_quantize(dense.weight.detach().float(), b, group_size)).to(
            device
        )
        packed = {"": pw}
        if rotated:
            W = rotate(dense.weight.detach().float())
            packed["-rot"] = PackedWeight.from_quantized(rtn_quantize(W, b, group_size), True).to(device)
        for suffix, weight in packed.items():
            layers[f"torch-w{b}{suffix}"] = QuantLinear.from_packed(weight, backend="torch")
            if triton_ready(device, dtype):
                layers[f"triton-w{b}{suffix}"] = QuantLinear.from_packed(weight, backend="triton")
    return layers


def measure(layer: nn.Module, tokens: int, in_f: int, dtype, device, repeats: int) -> tuple[float, float]:
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    xg = x.clone().requires_grad_()
    grad = torch.randn(tokens, layer.out_features, device=device, dtype=dtype)
    with torch.no_grad():
        fwd = timer(device, lambda: layer(x), repeats)
    fwd_bwd = timer(device, lambda: layer(xg).backward(grad), repeats, grad_to_none=[xg])
    return fwd, fwd_bwd


def table(rows: list[dict], device_name: str) -> str:
    lines = [
        f"Device: {device_name}. Times are medians in ms; ratio = nf4 fwd+bwd time / this layer's.",
        "",
        "| out×in | tokens | layer | fwd ms | fwd+bwd ms | vs nf4 | weight MiB | bits/weight | 1-token BW |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bw = f"{r['bw_share']:.0%}" if r.get("bw_share") is not None else ""
        ratio = f"{r['vs_nf4']:.2f}×" if r.get("vs_nf4") is not None else ""
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['layer']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
            f"{ratio} | {r['weight_mib']:.2f} | {r['bits_per_weight']:.2f} | {bw} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", help="out x in, e.g. 4096x11008 (default: by device)")
    ap.add_argument("--tokens", nargs="+", type=int, help="token counts (default: by device)")
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 4])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per measurement on CPU")
    ap.add_argument(
        "--rotated-inputs", action="store_true", help="also the layers with rotated inputs (-rot)"
    )
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = args.shapes or (SHAPES_7B if cuda else SHAPES_CPU)
    tokens = args.tokens or ([1, 16, 512, 4096] if cuda else [1, 16, 512])
    dtype = torch.bfloat16 if cuda else torch.float32
    bandwidth = copy_bandwidth(device) if cuda else None
    rows = []
    for shape in shapes:
        out_f, in_f = (int(v) for v in shape.split("x"))
        layers = build_layers(out_f, in_f, args.bits, args.group_size, dtype, device, args.rotated_inputs)
        for n in tokens:
            measured = {
                name: measure(layer, n, in_f, dtype, device, args.repeats) for name, layer in layers.items()
            }
            for name, (fwd, fwd_bwd) in measured.items():
                nbytes = weight_bytes(layers[name])
                row = {
                    "shape": shape,
                    "tokens": n,
                    "layer": name,
                    "fwd_ms": fwd,
                    "fwd_bwd_ms": fwd_bwd,
                    "vs_nf4": measured["nf4"][1] / fwd_bwd if "nf4" in measured else None,
                    "weight_mib": nbytes / 2**20,
                    "bits_per_weight": 8 * nbytes / (out_f * in_f),
                    "bw_share": nbytes / fwd / 1e6 / bandwidth if bandwidth and n == 1 else None,
                }
                rows.append(row)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(table(rows, name))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
