"""Is a randomized SVD exact enough for the rank-r compensation, and what do the factorizations cost?

On the real SmolLM2-135M-Instruct (../shared/data), for modules of several layers, it quantizes
each weight with GPTQ (clipped grid, group 64) at 2 and 3 bits and takes the error in the
H-norm, ``K = (W − Q) F`` (``F Fᵀ = H``). The compensation's residual is ``‖K‖² − Σ_{i≤r} σ_i²``:
with the exact SVD the least possible, with the randomized range finder
(:func:`projq_train.quant.projq.randomized_top_singular`, ``p`` extra columns, ``q`` subspace
iterations) ``‖K‖² − Σ_{i≤r} s_i²`` of the values it finds. The first table gives the excess
residual of each setting against the exact one (in %). The second times, on random matrices of
the given sizes (the values do not matter for the time), a symmetric square root of ``H`` by
eigendecomposition against :func:`~projq_train.quant.projq.hessian_factor` (Cholesky and a
triangular inverse), and the top-r SVD of ``K`` by LAPACK (what the compensation used before),
by the Gram eigendecomposition (:func:`~projq_train.quant.projq.top_singular`'s exact path) and by
the randomized finder.

    python benchmarks/lowrank_svd.py --rank 32 --layers 0 10 20 29 --sizes 576 1536 2048 4096

One thread. Prints markdown tables (the ones quoted in README).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from projq_train.config import CalibrationConfig, ModelConfig
from projq_train.data.calibration import calibration_tokens
from projq_train.models import load_model_and_tokenizer
from projq_train.quant import gptq_quantize
from projq_train.quant.projq import (
    RANDOMIZED_OVERSAMPLE,
    RANDOMIZED_POWER_ITERS,
    hessian_factor,
    randomized_top_singular,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETTINGS = [(8, 2), (16, 2), (16, 4)]  # (oversample p, power iterations q)
MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def hessians(model, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """``H = XᵀX / N`` of the float model's inputs to each module of ``names``."""
    H = {}

    def hook(name):
        def fn(mod, args, _out):
            x = args[0].reshape(-1, mod.in_features).double()
            H[name] = H.get(name, 0) + x.T @ x

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for batch in ids.split(4):
            model(input_ids=batch)
    for h in handles:
        h.remove()
    return {n: (h / ids.numel()).float() for n, h in H.items()}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def accuracy_table(model, tok, args) -> None:
    calib = CalibrationConfig(
        dataset=str(args.data / "datasets" / "alpaca_5000" / "alpaca_5000.json"),
        template="alpaca",
        nsamples=16,
        seqlen=512,
    )
    names = [f"model.layers.{layer}.{m}" for layer in args.layers for m in MODULES]
    H = hessians(model, calibration_tokens(calib, tok), names)
    r = args.rank
    print(f"excess residual of the randomized rank-{r} SVD over the exact one, in %\n")
    print(
        "| module | bits | shape | exact residual | "
        + " | ".join(f"p {p}, q {q}" for p, q in SETTINGS)
        + " |"
    )
    print("|---|---:|---|---:|" + "---:|" * len(SETTINGS))
    worst = dict.fromkeys(SETTINGS, 0.0)
    for name in names:
        W = model.get_submodule(name).weight.detach().float()
        F, _ = hessian_factor(H[name])
        for bits in args.bits:
            E = W - gptq_quantize(W, H[name], bits, 64, clip=True).dequantize()
            K = E.to(F.dtype) @ F
            total = K.pow(2).sum().item()
            exact = total - torch.linalg.svdvals(K)[:r].pow(2).sum().item()
            excess = []
            for p, q in SETTINGS:
                s = randomized_top_singular(K, r, p, q)[1]
                excess.append((total - s.pow(2).sum().item() - exact) / exact)
                worst[(p, q)] = max(worst[(p, q)], excess[-1])
            short = name.removeprefix("model.layers.")
            cells = " | ".join(f"{100 * e:.2f}" for e in excess)
            print(f"| {short} | {bits} | {tuple(W.shape)} | {exact:.3g} | {cells} |", flush=True)
    cells = " | ".join(f"**{100 * w:.2f}**" for w in worst.values())
    print(f"| worst | | | | {cells} |\n")


def timing_table(sizes: list[int], rank: int) -> None:
    p, q = RANDOMIZED_OVERSAMPLE, RANDOMIZED_POWER_ITERS
    print("seconds on one thread, fp64, random n × n matrices\n")
    print(
        "| n | eigh square root of H | hessian_factor | LAPACK SVD of K | exact top-r (Gram) | "
        f"randomized top-r (p {p}, q {q}) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        X = torch.randn(2 * n, n, generator=gen, dtype=torch.float64)
        H = X.T @ X / X.shape[0]
        K = torch.randn(n, n, generator=gen, dtype=torch.float64)
        steps = [
            lambda H=H: torch.linalg.eigh(H),
            lambda H=H: hessian_factor(H),
            lambda K=K: torch.linalg.svd(K, full_matrices=False),
            lambda K=K: torch.linalg.eigh(K @ K.T),
            lambda K=K: randomized_top_singular(K, rank, p, q),
        ]
        times = [timed(step)[1] for step in steps]
        print(f"| {n} | " + " | ".join(f"{t:.2f}" for t in times) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--layers", nargs="*", type=int, default=[0, 10, 20, 29])
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3])
    ap.add_argument("--sizes", nargs="*", type=int, default=[576, 1536, 2048, 4096])
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.layers:
        mdir = args.data / "models" / "SmolLM2-135M-Instruct-Q4_1-gguf"
        model, tok = load_model_and_tokenizer(
            ModelConfig(name_or_path=str(mdir), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        )
        accuracy_table(model, tok, args)
    if args.sizes:
        timing_table(args.sizes, args.rank)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
