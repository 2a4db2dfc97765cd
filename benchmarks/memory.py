"""Peak memory side by side: ``projq-train quantize`` and ``fit`` against float LoRA and NF4 QLoRA.

For each model and each ``batch x tokens`` shape, every measurement runs in a process of its own
so the peaks are independent:

- ``quantize``: ``projq-train quantize --config <model>/quantize.yaml`` into a fresh artifact
  directory of this benchmark (``<runs-dir>/<model>/artifacts``, wiped first, so the quantizer
  really runs);
- ``fit``: ``projq-train fit --config <model>/<shape>/fit.yaml`` from that cached artifact: fp32,
  rank-32 LoRA on q/k/v/o/gate/up/down, AdamW, adapter dropout 0, ``--steps`` steps of packed
  Alpaca rows, no validation, no checkpoints, no logger;
- ``float-lora``: ``python benchmarks/memory.py --worker float-lora --recipe <fit.yaml>``: the same
  model loaded with transformers in fp32, wrapped in peft LoRA (same rank, alpha, dropout, targets),
  AdamW at the recipe's learning rate, the same steps;
- ``nf4-qlora``: ``--worker nf4-qlora``: the same, with the target linears swapped for
  bitsandbytes NF4 ``Linear4bit`` after loading (``projq_train.module.swap_in_nf4``; transformers'
  ``BitsAndBytesConfig`` does not load GGUF files or config-built models quantized), then peft's
  bnb LoRA layers. The float model exists whole while loading, so its load can set the peak
  (marked † in the table; the workers record the RSS high-water mark after loading and at the end);
- ``estimate``: ``projq-train estimate --config <recipe> --json`` for both recipes, when the
  subcommand exists (``quantize.peak_bytes``, ``fit.peak_bytes`` and its components).

Every training run reads its rows through :class:`projq_train.data.instruct.InstructionData` built
from the fit recipe's ``data`` section and the model's tokenizer, so all three see the same token
rows in the same order (the workers print a checksum of them). The loss is taken on every token
(``mask_prompt: false``: with the byte tokenizer the Alpaca prompt alone is longer than 128 tokens;
which tokens are labelled changes no tensor's size). The peak is the maximum resident set
size from ``/usr/bin/time -v`` on CPU; on CUDA each process runs through this script, which prints
``torch.cuda.max_memory_allocated()`` as JSON on its last line.

Models (``--models``): ``smollm2`` (SmolLM2-135M-Instruct, GGUF in ../shared/data; RTN with
rank-32 compensation, calibrated on 32 x 512 Alpaca tokens), ``llama-0.5b`` and ``llama-1b``
(random-init Llama configs in the shapes of Qwen2.5-0.5B and Llama-3.2-1B, tied heads like theirs;
RTN and a small calibration so that quantizing on CPU stays tractable; byte tokenizer, so token ids
stay below 259 whatever the vocabulary, while the tied head reads every embedding row at every
step), ``tiny`` (the config of recipes/tiny-cpu.yaml, for development).

    python benchmarks/memory.py --models tiny --shapes 1x128 --steps 2            # quick check
    python benchmarks/memory.py --models smollm2 --json runs/bench-memory/smollm2.json
    python benchmarks/memory.py --models llama-0.5b llama-1b --json runs/bench-memory/llama.json
    python benchmarks/memory.py --models smollm2 --only float-lora nf4-qlora      # baselines only
    python benchmarks/memory.py --table-from a.json b.json --plot docs/memory.png

Prints one markdown table per model (the README quotes them) and the commands it ran.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("quantize", "fit", "float-lora", "nf4-qlora", "estimate")
SMOLLM2 = "../shared/data/models/SmolLM2-135M-Instruct-Q4_1-gguf"
ALPACA = "../shared/data/datasets/alpaca_5000/alpaca_5000.json"


def llama(
    hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int | None = None, tied=False
) -> dict:
    """A Llama config for ``model.base.config`` (no ``vocab``: the byte tokenizer's 259)."""
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tied,
    }
    return config if vocab is None else {**config, "vocab_size": vocab}


# per model: the recipe's `model.base` and the defaults of the quantize settings
MODELS = {
    "tiny": {
        "label": "tiny random-init Llama (recipes/tiny-cpu.yaml)",
        "base": {
            "config": {
                **llama(128, 256, 2, 4, 2),
                "max_position_embeddings": 512,
                "initializer_range": 0.2,
            }
        },
        "method": "rtn",
        "nsamples": 8,
        "seqlen": 256,
    },
    "smollm2": {
        "label": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
        "base": {"name_or_path": SMOLLM2, "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "method": "rtn",
        "nsamples": 32,
        "seqlen": 512,
    },
    "llama-0.5b": {
        "label": "random-init Llama in Qwen2.5-0.5B's shape: hidden 896, MLP 4864, 24 layers, 14/2 heads, "
        "vocab 151936, tied head",
        "base": {"config": llama(896, 4864, 24, 14, 2, 151936, tied=True)},
        "method": "rtn",
        "nsamples": 8,
        "seqlen": 256,
    },
    "llama-1b": {
        "label": "random-init Llama in Llama-3.2-1B's shape: hidden 2048, MLP 8192, 16 layers, 32/8 heads, "
        "vocab 128256, tied head",
        "base": {"config": llama(2048, 8192, 16, 32, 8, 128256, tied=True)},
        "method": "rtn",
        "nsamples": 8,
        "seqlen": 256,
    },
}
BYTE_VOCAB = 259
log = logging.getLogger("memory-bench")


# ----------------------------------------------------------------------------- workers


def high_water() -> dict:
    """Resident set size now and its high-water mark so far, in bytes (Linux; else empty)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    kb = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
    return {"rss_bytes": int(kb["VmRSS"]) * 1024, "hwm_bytes": int(kb["VmHWM"]) * 1024}


def load_float_model(base: dict, tokenizer):
    """The recipe's base model with transformers, in its dtype: as ``projq_train.models`` builds it
    (same config fields, seed and vocabulary) for a ``config``, ``from_pretrained`` otherwise."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, base.get("dtype", "float32"))
    if base.get("config") is not None:
        fields = dict(base["config"])
        model_type = fields.pop("model_type")
        fields.setdefault("vocab_size", len(tokenizer))
        torch.manual_seed(base.get("seed", 0))
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields), dtype=dtype)
    extra = {"gguf_file": base["gguf_file"]} if base.get("gguf_file") else {}
    return AutoModelForCausalLM.from_pretrained(base["name_or_path"], dtype=dtype, **extra)


def worker_baseline(kind: str, recipe_path: Path) -> dict:
    """Float LoRA or NF4 QLoRA with transformers + peft (+ bitsandbytes) on the fit recipe's model,
    adapter, optimizer, data and step count; returns what the table needs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from projq_train.config import ModelConfig
    from projq_train.data.instruct import InstructionData
    from projq_train.models import load_tokenizer

    recipe = yaml.safe_load(recipe_path.read_text())
    trainer, m = recipe["trainer"], recipe["model"]
    device = torch.device("cuda" if trainer["accelerator"] == "gpu" else "cpu")
    steps, batch_size = trainer["max_steps"], recipe["data"]["init_args"]["batch_size"]
    tokenizer = load_tokenizer(ModelConfig(**m["base"]))
    data = InstructionData(**recipe["data"]["init_args"], tokenizer=tokenizer)
    data.setup("fit")
    if len(data.train_data) < steps * batch_size:
        raise SystemExit(f"{len(data.train_data)} packed rows, fewer than {steps} x {batch_size}")
    model = load_float_model(m["base"], tokenizer)
    params = sum(p.numel() for p in model.parameters())
    loaded = high_water()
    if kind == "nf4-qlora":
        from projq_train.module import swap_in_nf4

        swap_in_nf4(model, m["quant"]["target_modules"], torch.float32, device)
        model.is_loaded_in_4bit = True  # peft then wraps Linear4bit with its bnb LoRA layer, as in QLoRA
    model.to(device)
    lora = LoraConfig(
        r=m["adapter"]["rank"],
        lora_alpha=m["adapter"]["alpha"],
        lora_dropout=m["adapter"]["dropout"],
        target_modules=m["quant"]["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, **m["optimizer"].get("init_args", {}))
    setup = high_water()
    torch.manual_seed(recipe.get("seed_everything", 0))
    rows, losses = hashlib.sha256(), []
    for step, batch in enumerate(itertools.islice(data.train_dataloader(), steps)):
        rows.update(batch["input_ids"].numpy().tobytes() + batch["labels"].numpy().tobytes())
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        log.info("%s step %d: loss %.4f", kind, step + 1, losses[-1])
    out = {
        "params": params,
        "trainable_params": sum(p.numel() for p in trainable),
        "rows_sha256": rows.hexdigest()[:16],
        "losses": losses,
        "after_load": loaded,
        "after_setup": setup,
        "end": high_water(),
    }
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def worker_zero_compensation_quantize(recipe_path: Path) -> dict:
    """``projq-train quantize`` with each module rounded to nearest and a zero rank-r compensation:
    an artifact of exactly the shapes and dtypes a real one has, made in minutes where the
    compensations would take much longer on CPU. For measuring ``fit``
    from a cached artifact only (the memory of a run does not depend on the values)."""
    import projq_train.quant.calibrate as calibrate
    from projq_train.cli import main
    from projq_train.quant import quantize_weight
    from projq_train.quant.pack import PackedWeight

    def rtn_zero(W, H, cfg, rank, bits, group_size, *_):  # quantize_module's signature
        qw = quantize_weight(W.float(), H, "rtn", bits, group_size, 0, 0)
        zeros = W.new_zeros(W.shape[0], rank), W.new_zeros(rank, W.shape[1])
        return calibrate.QuantizedModule(PackedWeight.from_quantized(qw), *zeros)

    calibrate.quantize_module = rtn_zero
    main(["quantize", "--config", str(recipe_path)])
    return {}


def worker_projq_train(argv: list[str]) -> dict:
    """Run ``projq-train ARGV`` in this process (CUDA runs): its peak device memory."""
    import torch

    from projq_train.cli import main

    sys.argv = ["projq-train", *argv]
    main(argv)
    return {"peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}


# ----------------------------------------------------------------------------- recipes


def param_count(base: dict) -> int:
    """Parameters of a Llama-architecture model from its config (GGUF models: the config.json
    transformers derived from the GGUF, next to it)."""
    c = base.get("config") or json.loads((ROOT / base["name_or_path"] / "config.json").read_text())
    h, inter, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    kv, vocab = c.get("num_key_value_heads", heads), c.get("vocab_size", BYTE_VOCAB)
    head_dim = c.get("head_dim") or h // heads
    layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter + 2 * h
    return c["num_hidden_layers"] * layer + vocab * h * (1 if c.get("tie_word_embeddings") else 2) + h


def quant_settings(args, name: str) -> tuple[dict, dict]:
    """The ``quant`` and ``calibration`` sections shared by a model's quantize and fit recipes."""
    spec = MODELS[name]
    quant = {
        "method": args.method or spec["method"],
        "bits": args.bits,
        "group_size": args.group_size,
        "target_modules": TARGETS,
    }
    calibration = {
        "dataset": args.calibration,
        "template": "alpaca",
        "nsamples": args.nsamples or spec["nsamples"],
        "seqlen": args.seqlen or spec["seqlen"],
    }
    return quant, calibration


def as_recipe(settings: dict) -> str:
    """YAML of a recipe whose paths (relative to the working directory, the repo root) are made
    absolute: a recipe's relative paths would resolve against its own folder."""
    from projq_train.cli import resolve_recipe_paths

    return yaml.safe_dump(resolve_recipe_paths(settings, Path.cwd()), sort_keys=False)


def write_recipes(args, name: str, device: str) -> tuple[Path, dict[str, Path]]:
    """Write the model's quantize recipe and one fit recipe per shape under ``<runs-dir>/<name>``."""
    mdir = args.runs_dir / name
    base = {**MODELS[name]["base"], "dtype": "float32"}
    quant, calibration = quant_settings(args, name)
    artifacts = str(mdir / "artifacts")
    quantize = {
        "model": base,
        "quant": quant,
        "adapter": {"rank": args.rank},
        "calibration": calibration,
        "artifact_dir": artifacts,
        "device": device,
    }
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "quantize.yaml").write_text(as_recipe(quantize))
    fits = {}
    for shape in args.shapes:
        batch, tokens = parse_shape(shape)
        sdir = mdir / shape
        fit = {
            "seed_everything": 0,
            "trainer": {
                "accelerator": "gpu" if device == "cuda" else "cpu",
                "devices": 1,
                "precision": "32-true",
                "max_steps": args.steps,
                "limit_val_batches": 0,
                "num_sanity_val_steps": 0,
                "enable_checkpointing": False,
                "logger": False,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "default_root_dir": str(sdir),
            },
            "model": {
                "base": base,
                "quant": quant,
                "adapter": {"rank": args.rank, "init": "compensation", "alpha": args.alpha, "dropout": 0.0},
                "calibration": calibration,
                "artifact_dir": artifacts,
                "optimizer": {
                    "class_path": "torch.optim.AdamW",
                    "init_args": {"lr": args.lr, "weight_decay": 0.0},
                },
                "schedule": {"warmup_steps": 0, "min_lr_ratio": 1.0},
                "gradient_checkpointing": False,
            },
            "data": {
                "class_path": "projq_train.data.instruct.InstructionData",
                "init_args": {
                    "path": args.data,
                    "format": "alpaca",
                    "template": "alpaca",
                    "max_seq_length": tokens,
                    "batch_size": batch,
                    "val_fraction": 0.0,
                    # rows are cut to `tokens` and hold >= 32 tokens (the Alpaca prompt alone is more)
                    "limit": math.ceil(args.steps * batch * tokens / 32) + 8,
                    "packing": True,
                    # the loss on every token: the byte tokenizer's Alpaca prompt alone is longer
                    # than 128 tokens, and which tokens are labelled changes no tensor's size
                    "mask_prompt": False,
                    "seed": 0,
                },
            },
        }
        sdir.mkdir(parents=True, exist_ok=True)
        fits[shape] = sdir / "fit.yaml"
        fits[shape].write_text(as_recipe(fit))
    return mdir / "quantize.yaml", fits


def parse_shape(shape: str) -> tuple[int, int]:
    """``"4x256"`` -> ``(4, 256)``: batch size and tokens per row."""
    match = re.fullmatch(r"([1-9]\d*)x([1-9]\d*)", shape)
    if not match:
        raise argparse.ArgumentTypeError(f"shape {shape!r}: expected BATCHxTOKENS, e.g. 4x256")
    return int(match[1]), int(match[2])


def shape_arg(shape: str) -> str:
    parse_shape(shape)
    return shape


# ----------------------------------------------------------------------------- running


class Runner:
    """Runs commands in fresh processes from the repository root, measures their peak, keeps a log."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.commands: list[str] = []
        self.time = shutil.which("time", path="/usr/bin:/bin") if device == "cpu" else None
        if device == "cpu" and self.time is None:
            raise SystemExit("/usr/bin/time is needed for the peak RSS on CPU (apt-get install time)")

    def run(self, argv: list[str], log_file: Path, quote: list[str], measure: bool = True) -> dict:
        """Run ``argv`` (quoted as ``quote``); returns peak_bytes, wall_s and the JSON of its last
        stdout line if any. Raises RuntimeError with the log's tail if it fails."""
        shown = shlex.join(quote)
        cmd = list(argv)
        if measure and self.device == "cpu":
            cmd = [self.time, "-v", "-o", str(log_file.with_suffix(".time")), *cmd]
            shown = f"/usr/bin/time -v {shown}"
        self.commands.append(shown)
        log.info("running: %s", shown)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        with open(log_file, "w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
        wall = time.perf_counter() - t0
        log_file.with_suffix(".out").write_text(proc.stdout)
        if proc.returncode != 0:
            tail = "\n".join(log_file.read_text().splitlines()[-15:])
            raise RuntimeError(f"`{shown}` failed with exit code {proc.returncode}:\n{tail}")
        result = {"wall_s": round(wall, 1), "command": shown}
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        try:
            result["worker"] = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            result["worker"] = None
        if measure and self.device == "cpu":
            text = log_file.with_suffix(".time").read_text()
            result["peak_bytes"] = (
                int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1]) * 1024
            )
        elif measure:
            result["peak_bytes"] = (result["worker"] or {}).get("peak_bytes")
        return result

    def projq_train(self, argv: list[str], log_file: Path, measure: bool = True) -> dict:
        quote = ["projq-train", *argv]
        if measure and self.device == "cuda":  # through this script, which prints the CUDA peak
            script = [sys.executable, str(Path(__file__).relative_to(ROOT)), "--worker", "projq-train", "--"]
            return self.run([*script, *argv], log_file, ["python", *script[1:], *argv], measure)
        # the environment of this interpreter, as the workers: another projq-train on PATH may
        # come with other packages (one with Triton and matplotlib holds 100 MiB more), and a
        # checkout on PYTHONPATH has none
        return self.run([sys.executable, "-m", "projq_train.cli", *argv], log_file, quote, measure)


def run_estimate(runner: Runner, recipe: Path, log_file: Path) -> dict:
    """``projq-train estimate --config RECIPE --json``: its JSON, or the reason it gave none."""
    argv = ["estimate", "--config", str(recipe), "--json"]
    try:
        out = runner.projq_train(argv, log_file, measure=False)
    except RuntimeError as err:
        return {
            "error": str(err).splitlines()[-1].strip()[:300],
            "command": shlex.join(["projq-train", *argv]),
        }
    text = log_file.with_suffix(".out").read_text()
    try:  # the first JSON object printed (one line or indented)
        result = json.JSONDecoder().raw_decode(text[text.index("{") :])[0]
    except ValueError:
        result = None
    if not isinstance(result, dict):
        return {"error": "printed no JSON object", "command": out["command"]}
    return {"result": result, "command": out["command"]}


def fit_components(estimate: dict | None) -> dict | None:
    """From the estimate's ``fit`` section: packed weights, float tensors, adapter state (adapters,
    their gradients and optimizer state) and activations (the recipe's, no checkpointing), in bytes,
    and the component names summed for each. Components are read from ``fit.host`` and
    ``fit.device`` (else ``fit.components``, else ``fit`` itself) and matched by name."""
    fit = (estimate or {}).get("fit")
    if not isinstance(fit, dict):
        return None
    parts = {**(fit.get("host") or {}), **(fit.get("device") or {})} or fit.get("components") or fit
    parts = {k: v for k, v in parts.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    groups = {
        "packed weights": r"^packed",
        "float tensors": r"^float",
        "adapter state": r"^(adapter|lora|grad|optim)",
        "activations": r"^activation",
    }
    out, used = {}, {}
    for group, pattern in groups.items():
        keys = [k for k in parts if re.search(pattern, k, re.I) and not re.search(r"checkpoint", k, re.I)]
        if keys:
            out[group], used[group] = sum(parts[k] for k in keys), keys
    if not out:
        return None
    return {"bytes": out, "keys": used, "sum": sum(out.values()), "runtime": parts.get("runtime")}


def estimated(estimate: dict | None, section: str) -> float | None:
    value = ((estimate or {}).get("result") or {}).get(section, {})
    return value.get("peak_bytes") if isinstance(value, dict) else None


def bench_model(args, runner: Runner, name: str, device: str, rows: list[dict], save) -> None:
    """Every selected measurement of one model, appended to ``rows`` (``save()`` after each):
    quantize once, then each shape. A failed run is kept as a row with its ``error``; the others go on."""
    quantize_recipe, fit_recipes = write_recipes(args, name, device)
    mdir, artifacts = quantize_recipe.parent, quantize_recipe.parent / "artifacts"
    quant, calibration = quant_settings(args, name)
    common = {
        "model": name,
        "label": MODELS[name]["label"],
        "params": param_count(MODELS[name]["base"]),
        "device": device,
        "steps": args.steps,
        "quant": {**{k: v for k, v in quant.items() if k != "target_modules"}, "rank": args.rank},
        "calibration": calibration,
        "lr": args.lr,
        "alpha": args.alpha,
    }

    def measure(method: str, shape: str | None, run, *run_args, recipe: str | None = None) -> None:
        try:
            result = run(*run_args)
        except RuntimeError as err:
            log.error("%s", err)
            result = {"error": str(err)}
        rows.append({**common, "method": method, "shape": shape, "recipe": recipe, **result})
        save()
        if result.get("peak_bytes"):
            log.info("%s %s %s: peak %s", name, shape or "", method, gib(result["peak_bytes"]))

    def quantize(measured: bool) -> dict:
        if name in args.zero_compensation and not measured:
            script = str(Path(__file__).relative_to(ROOT))
            argv = ["--worker", "zero-compensation-quantize", "--recipe", str(quantize_recipe)]
            quote = ["python", script, *argv]
            return runner.run([sys.executable, script, *argv], mdir / "quantize.log", quote, False)
        argv = ["quantize", "--config", str(quantize_recipe)]
        return runner.projq_train(argv, mdir / "quantize.log", measured)

    def fit(recipe: Path) -> dict:
        before = set(artifacts.iterdir()) if artifacts.is_dir() else set()
        result = runner.projq_train(["fit", "--config", str(recipe)], recipe.parent / "fit.log")
        made = sorted(str(p) for p in set(artifacts.iterdir()) - before)
        if made:  # the artifact the quantize recipe made is not the one fit looked for
            log.warning("fit made its own artifact %s: its peak includes quantization", made)
            result["fit_made_artifact"] = made
        return result

    def baseline(kind: str, recipe: Path) -> dict:
        script = str(Path(__file__).relative_to(ROOT))
        argv = ["--worker", kind, "--recipe", str(recipe)]
        return runner.run(
            [sys.executable, script, *argv], recipe.parent / f"{kind}.log", ["python", script, *argv]
        )

    if "quantize" in args.only:
        shutil.rmtree(artifacts, ignore_errors=True)  # ours; a cached artifact would skip the work
        measure("quantize", None, quantize, True)
    elif "fit" in args.only:  # fit must read a cached artifact: find or make it, unmeasured
        measure("quantize-unmeasured", None, quantize, False)
    if "estimate" in args.only:
        log_file = mdir / "estimate-quantize.log"
        measure("estimate", None, run_estimate, runner, quantize_recipe, log_file, recipe="quantize")
    for shape, recipe in fit_recipes.items():
        if "fit" in args.only:
            measure("fit", shape, fit, recipe)
        if "estimate" in args.only:
            log_file = recipe.parent / "estimate-fit.log"
            measure("estimate", shape, run_estimate, runner, recipe, log_file, recipe="fit")
        for kind in ("float-lora", "nf4-qlora"):
            if kind in args.only:
                measure(kind, shape, baseline, kind, recipe)


# ----------------------------------------------------------------------------- tables, plot


def gib(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 2**30:
        return f"{x / 2**30:.2f} GiB"
    return f"{x / 2**20:.0f} MiB" if x >= 10 * 2**20 else f"{x / 2**20:.2f} MiB"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def with_error(est: float | None, measured: float | None) -> str:
    if est is None:
        return "–"
    return f"{gib(est)} ({(est - measured) / measured:+.1%})" if measured else gib(est)


def cell(row: dict | None) -> str:
    """A measured peak; ``†`` when a baseline's peak came while loading, before training."""
    if row is None:
        return "–"
    if row.get("error"):
        return "failed"
    worker = row.get("worker") or {}
    loaded = (worker.get("after_load") or {}).get("hwm_bytes")
    at_load = loaded is not None and loaded >= (worker.get("end") or {}).get("hwm_bytes", math.inf)
    return gib(row.get("peak_bytes")) + (" †" if at_load else "")


def find(rows: list[dict], method: str, shape: str | None) -> dict | None:
    """The last row of ``method`` at ``shape`` (``None``: the model's quantize row)."""
    found = [r for r in rows if r["method"] == method and r["shape"] == shape]
    return found[-1] if found else None


def peak(row: dict | None) -> float | None:
    return (row or {}).get("peak_bytes")


def render(rows: list[dict]) -> str:
    """One markdown table per model (a quantize row, then fit at each shape), notes below it."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]

        r0, notes = mine[0], []
        shapes = list(dict.fromkeys(r["shape"] for r in mine if r["shape"]))
        q, c = r0["quant"], r0["calibration"]
        out += [
            f"### {name}: {r0['label']}, {r0['params']:,} parameters",
            "",
            f"{r0['device'].upper()}, fp32; {q['method']} {q['bits']}-bit, group {q['group_size']}, "
            f"calibration {c['nsamples']} × {c['seqlen']} tokens; LoRA rank {q['rank']} (alpha "
            f"{r0['alpha']:g}, dropout 0) on {', '.join(t.removesuffix('_proj') for t in TARGETS)}; AdamW "
            f"lr {r0['lr']:g}; {r0['steps']} steps of packed Alpaca rows (loss on every token), the same "
            "rows for every run.",
            "",
            "| run | batch × tokens | projq-train | estimate (error) | float LoRA | NF4 QLoRA "
            "| projq-train / float LoRA | projq-train / NF4 |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        quant = find(mine, "quantize", None)
        est_q = estimated(find(mine, "estimate", None), "quantize")
        for shape in shapes:  # a fit recipe's estimate predicts quantize too
            est_q = est_q or estimated(find(mine, "estimate", shape), "quantize")
        if quant or est_q:
            out.append(f"| quantize | – | {cell(quant)} | {with_error(est_q, peak(quant))} | | | | |")
        for shape in shapes:
            fit, est = find(mine, "fit", shape), find(mine, "estimate", shape)
            float_lora, nf4 = find(mine, "float-lora", shape), find(mine, "nf4-qlora", shape)
            b, t = parse_shape(shape)
            out.append(
                f"| fit | {b} × {t} | {cell(fit)} | {with_error(estimated(est, 'fit'), peak(fit))} "
                f"| {cell(float_lora)} | {cell(nf4)} | {ratio(peak(fit), peak(float_lora))} "
                f"| {ratio(peak(fit), peak(nf4))} |"
            )
            if fit and fit.get("fit_made_artifact"):
                notes.append(
                    f"{shape}: fit found no cached artifact and quantized itself; its peak includes that."
                )
            parts = fit_components((est or {}).get("result"))
            if parts:
                summed = " + ".join(f"{k} {gib(v)}" for k, v in parts["bytes"].items())
                measured = f"; measured / sum = {peak(fit) / parts['sum']:.2f}" if peak(fit) else ""
                keys = "; ".join(f"{k}: {', '.join(v)}" for k, v in parts["keys"].items())
                on_host = parts["runtime"] and r0["device"] == "cpu"  # a device peak has no host runtime
                runtime = f"; its runtime baseline is {gib(parts['runtime'])} more" if on_host else ""
                notes.append(
                    f"{b} × {t} fit, the estimate's {summed} = {gib(parts['sum'])}{measured} "
                    f"(components summed: {keys}{runtime})."
                )
            workers = [x["worker"] for x in (float_lora, nf4) if x and x.get("worker")]
            if len({w["rows_sha256"] for w in workers}) > 1:
                notes.append(f"{b} × {t}: the baselines saw different token rows!")
        for r in mine:
            if r.get("error") and r["method"] != "estimate":
                where = f" {r['shape']}" if r["shape"] else ""
                notes.append(f"{r['method']}{where} failed: {r['error'].splitlines()[-1].strip()}")
        errors = [r for r in mine if r["method"] == "estimate" and r.get("error")]
        if errors:
            notes.append(f"No estimate: `{errors[0]['command']}` failed: {errors[0]['error']}")
        if any("†" in line for line in out[-len(shapes) :]):
            notes.append("†: this peak was reached while loading the float model, before training.")
        kind = "maximum RSS (`/usr/bin/time -v`)" if r0["device"] == "cpu" else "`max_memory_allocated`"
        notes.append(
            f"Peaks: {kind} of each run in a process of its own. Error: (estimate − measured) / measured."
        )
        out += ["", *(f"- {n}" for n in notes), ""]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """Peak against parameter count: one line per method, one panel per shape, estimates hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows if r["shape"] and r["method"] != "estimate"))
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(5.5 * max(1, len(shapes)), 4.2), squeeze=False)
    styles = {"quantize": "C0", "fit": "C1", "float-lora": "C2", "nf4-qlora": "C3"}
    names = {"fit": "projq-train fit", "float-lora": "float LoRA", "nf4-qlora": "NF4 QLoRA"}
    for ax, shape in zip(axes[0], shapes, strict=True):
        for method, color in styles.items():
            wanted = None if method == "quantize" else shape
            pts = sorted(
                (r["params"] / 1e9, r["peak_bytes"] / 2**30)
                for r in rows
                if r["method"] == method and r["shape"] == wanted and r.get("peak_bytes")
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=color, label=names.get(method, method))
            section = "quantize" if method == "quantize" else "fit" if method == "fit" else None
            if section:
                est = {  # the last estimate of each model, as in the table
                    r["params"] / 1e9: estimated(r, section) / 2**30
                    for r in rows
                    if r["method"] == "estimate"
                    and estimated(r, section)
                    and r["shape"] == (None if section == "quantize" else shape)  # its own recipe
                }
                if est:
                    ax.plot(
                        *zip(*sorted(est.items()), strict=True),
                        "o",
                        mfc="none",
                        color=color,
                        ms=9,
                        label=f"{section} estimate",
                    )
        b, t = parse_shape(shape)
        ax.set(xlabel="parameters (billions)", ylabel="peak GiB", title=f"batch {b} × {t} tokens")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    log.info("wrote %s", path)


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models", nargs="+", default=["smollm2", "llama-0.5b", "llama-1b"], choices=list(MODELS)
    )
    ap.add_argument(
        "--shapes",
        nargs="+",
        type=shape_arg,
        default=["1x128", "4x256"],
        help="BATCHxTOKENS (default: %(default)s)",
    )
    ap.add_argument("--steps", type=int, default=4, help="training steps per run (default: %(default)s)")
    ap.add_argument(
        "--only", nargs="+", default=list(METHODS), choices=METHODS, help="what to run (default: all)"
    )
    ap.add_argument("--method", choices=["rtn", "gptq", "projq"], help="default: rtn")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank of every run (default: %(default)s)")
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    ap.add_argument("--calibration", default=ALPACA, help="calibration rows (rendered as Alpaca prompts)")
    ap.add_argument("--nsamples", type=int, help="calibration sequences (default: 32 for smollm2, else 8)")
    ap.add_argument("--seqlen", type=int, help="calibration length (default: 512 for smollm2, else 256)")
    ap.add_argument("--data", default=ALPACA, help="training rows (alpaca format, packed)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument(
        "--runs-dir", type=Path, default=Path("runs/bench-memory"), help="relative to the repo root"
    )
    ap.add_argument("--json", type=Path, help="write the raw rows here")
    ap.add_argument("--table-from", nargs="+", type=Path, help="only print tables of earlier --json files")
    ap.add_argument("--plot", type=Path, help="plot peak against parameter count, e.g. docs/memory.png")
    ap.add_argument(
        "--zero-compensation",
        nargs="*",
        default=[],
        help="models whose unmeasured artifact (--only fit ...) is made by RTN with a zero compensation "
        "(same shapes and dtypes; fast where the compensation takes an hour on CPU)",
    )
    ap.add_argument(
        "--worker",
        choices=["float-lora", "nf4-qlora", "projq-train", "zero-compensation-quantize"],
        help=argparse.SUPPRESS,
    )
    ap.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.worker:  # one measured process; its result is the last line of stdout
        if args.worker == "projq-train":
            result = worker_projq_train(rest[1:] if rest[:1] == ["--"] else rest)
        elif args.worker == "zero-compensation-quantize":
            result = worker_zero_compensation_quantize(args.recipe)
        else:
            result = worker_baseline(args.worker, args.recipe)
        print(json.dumps(result))
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.table_from:
        rows = [r for f in args.table_from for r in json.loads(f.read_text())["rows"]]
        print(render(rows))
        if args.plot:
            plot(rows, args.plot)
        return
    if args.steps < 1:
        ap.error("--steps must be positive")
    for name in args.models:  # every in_features of a model must be a multiple of the group size
        c = MODELS[name]["base"].get("config") or json.loads((ROOT / SMOLLM2 / "config.json").read_text())
        for size in (c["hidden_size"], c["intermediate_size"]):
            if args.group_size > 0 and size % args.group_size:
                ap.error(f"--group-size {args.group_size} does not divide {size} ({name})")
    command = shlex.join(["python", "benchmarks/memory.py", *sys.argv[1:]])
    json_path, plot_path = (p and p.resolve() for p in (args.json, args.plot))
    os.chdir(ROOT)  # recipes, logs and the commands quoted are relative to the repository root
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    runner = Runner(device)
    rows: list[dict] = []
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "versions": versions()}

    def save() -> None:
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    for name in args.models:
        bench_model(args, runner, name, device, rows, save)
    print(render(rows))
    print("Commands (from the repository root):\n")
    print("\n".join(f"    {c}" for c in [command, *runner.commands]))
    if plot_path:
        plot(rows, plot_path)


def versions() -> dict:
    """Versions of the libraries the runs use, for the JSON."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "lightning", "projq-train"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
