"""Fine-tuning on a low-bit base: validation loss from the same step count, time per step, peak memory.

Runs the product's fit job (LightningCLI over :class:`ProjQModule`, the recipe plus overrides) once
per variant and compares

- ``projq+projq-init``: the recipe as is, a ProjQ base with the adapter starting at ``Q + BA ≈ W``;
- ``projq+standard``: the same base, the adapter initialized as in QLoRA (``B = 0``, step 0 is ``Q``);
- ``gptq+standard``: a GPTQ base (same bits, group size and grid search) with the QLoRA init.

Each variant runs in two subprocesses of its own. The first finds or makes the quantization
artifact (skipped when an earlier variant of this invocation uses the same one); the table's
``quant s`` is the time spent quantizing modules as recorded in the artifact (calibration forward
passes not counted, as in benchmarks/quant_quality.py), the JSON also has the wall time when this
run made it. The second subprocess trains on the cached artifact, so its peak memory
(``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) and its setup time (load,
adapters, data) are those of a training run. The trainer validates once before training (step 0)
and then wherever the recipe says; time per step is the median over training batches (forward,
backward, optimizer step), the first two left out.

    # the README table: 30 steps, validation every 10 (2 CPU cores: about 35 min, quantization included)
    python benchmarks/finetune.py --max_steps 30 --trainer.val_check_interval 10 --json finetune.json
    python benchmarks/finetune.py --json finetune.json              # the recipe's 60 steps
    python benchmarks/finetune.py --variants projq+projq-init projq+standard
    python benchmarks/finetune.py --recipe recipes/tiny-cpu.yaml --max_steps 6 --trainer.val_check_interval 2
    python benchmarks/finetune.py --table-from finetune.json

Unknown options are recipe overrides passed to every variant. Prints a markdown table (the one
quoted in README); run directories go under ``--runs-dir`` (default ``runs/bench-finetune/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "projq+projq-init": [],
    "projq+standard": ["--model.adapter.init", "standard"],
    "gptq+standard": ["--model.quant.method", "gptq", "--model.adapter.init", "standard"],
}
SKIP_STEPS = 2  # first training steps left out of the time per step (allocator and thread warm-up)
log = logging.getLogger("finetune-bench")


def build_cli(cli_args: list[str], parse_only: bool = False):
    """The fit job's CLI objects (``cli.model``, ``cli.datamodule``, ``cli.trainer``), not run.
    ``parse_only``: parse and type-check the recipe, build nothing (``cli.config`` only)."""
    from projq_train.lightning_cli import trainer_cli

    return trainer_cli(cli_args, run=False, build=not parse_only)


def artifact_key(config) -> str:
    """What decides a run's quantization artifact: base model, quant and calibration settings."""
    m = config.model
    parts = [m.base.as_dict(), m.quant.as_dict(), m.calibration.as_dict(), m.artifact_dir]
    return json.dumps(parts, sort_keys=True, default=str)


class StepTimer(L.Callback):
    """Seconds and loss of every training batch, and validation loss at each validation in fit."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.train_loss: list[float] = []
        self.val_loss: dict[int, float] = {}
        self.val_seconds = 0.0
        self.modes_at_train_start: dict[str, int] = {}

    def on_train_start(self, trainer, pl_module):
        modes = [m.training for m in pl_module.modules()]
        self.modes_at_train_start = {"train": sum(modes), "eval": len(modes) - sum(modes)}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._t0)
        self.train_loss.append(float(outputs["loss"]))
        step = len(self.seconds)
        if step % 10 == 0 or step == 1:
            log.info("step %d: %.2f s, train loss %.4f", step, self.seconds[-1], self.train_loss[-1])

    def on_validation_start(self, trainer, pl_module):
        self._v0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        self.val_seconds += time.perf_counter() - self._v0
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.val_loss[trainer.global_step] = float(trainer.callback_metrics["val_loss"])
            log.info("step %d: val loss %.4f", trainer.global_step, self.val_loss[trainer.global_step])


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_name(device: torch.device) -> str:
    return (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )


def worker_setup(cli_args: list[str]) -> dict:
    """Find or make the quantization artifact of this recipe; time the quantization."""
    from projq_train.artifact import find_or_quantize

    cli = build_cli(cli_args)
    m, device = cli.model, cli.trainer.strategy.root_device
    if m.quant.method == "nf4":  # bitsandbytes quantizes at load time: no artifact
        return {"quant_seconds": None, "artifact": None}
    before = set(Path(m.artifact_dir).glob("*")) if Path(m.artifact_dir).is_dir() else set()
    t0 = time.perf_counter()
    path = find_or_quantize(m.base_cfg, m.quant, m.adapter.rank, m.calibration, m.artifact_dir, device)
    seconds = time.perf_counter() - t0
    report = json.loads((path / "metadata.json").read_text())["report"]
    return {
        "artifact": str(path),
        "artifact_made": path not in before,
        "quant_wall_seconds": seconds if path not in before else None,  # calibration included
        "quant_seconds": sum(r["seconds"] for r in report),  # quantizing modules, as recorded in the artifact
        "quant_peak_gib": peak_memory_gib(device),
    }


def worker_train(cli_args: list[str]) -> dict:
    """Validate at step 0, fit, and return the measurements (see the module docstring)."""
    cli = build_cli(cli_args)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    timer = StepTimer()
    trainer.callbacks.insert(0, timer)  # before ModelCheckpoint: checkpoint saves are not timed
    t0 = time.perf_counter()
    val0 = trainer.validate(module, datamodule=data, verbose=False)[0]["val_loss"]
    validate_seconds = time.perf_counter() - t0
    setup_seconds = validate_seconds - timer.val_seconds  # configure_model (load, adapters) + data setup
    device = module.device
    rss_after_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    timer.val_seconds = 0.0
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - t0
    timed = timer.seconds[SKIP_STEPS:] or timer.seconds
    return {
        "device": device_name(device),
        "base_id": module.base_id,
        "val_loss": {"0": val0, **{str(s): v for s, v in timer.val_loss.items()}},
        "train_loss": timer.train_loss,
        "step_seconds": timer.seconds,
        "seconds_per_step": statistics.median(timed) if timed else None,
        "fit_seconds": fit_seconds,
        "fit_val_seconds": timer.val_seconds,
        "setup_seconds": setup_seconds,
        "steps": trainer.global_step,
        "peak_gib": peak_memory_gib(device),
        "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "ru_maxrss",
        "rss_after_setup_gib": rss_after_setup,
        "modules_at_train_start": timer.modes_at_train_start,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }


def run_worker(mode: str, cli_args: list[str]) -> dict:
    """Run one worker in a fresh Python process; its log goes to our stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", mode, str(result), *cli_args]
        log.info("%s: %s", mode, shlex.join(cmd[1:]))
        proc = subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} worker failed with exit code {proc.returncode}; its log is above")
        return json.loads(result.read_text())


def run_dir_args(run_dir: Path) -> list[str]:
    """Overrides that send this run's logs and checkpoints to ``run_dir`` (both follow
    ``trainer.default_root_dir``)."""
    return [f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false"]


def describe(config, command: str, device: str) -> dict:
    """What the table's header says about the runs (from the first variant's parsed recipe)."""
    m, d, t = config.model, config.data.init_args, config.trainer
    base = m.base
    model = Path(base.get("gguf_file") or base.get("name_or_path") or "").name or (
        f"random {base['config'].get('model_type')} from a config"
    )
    return {
        "device": device,
        "model": model,
        "bits": m.quant["bits"],
        "rank": m.adapter["rank"],
        "group_size": m.quant["group_size"],
        "clip": m.quant.get("clip"),
        "max_steps": t.max_steps,
        "batch_size": d.get("batch_size"),
        "accumulate_grad_batches": t.accumulate_grad_batches,
        "max_seq_length": d.get("max_seq_length"),
        "val_check_interval": t.val_check_interval,
        "limit_val_batches": t.limit_val_batches,
        "precision": t.precision,
        "command": command,
    }


def fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "-"
    return "nan" if math.isnan(x) else format(x, spec)


def print_table(results: list[dict]) -> None:
    h = results[0]["header"]
    val_batches = "all batches" if h["limit_val_batches"] is None else f"{h['limit_val_batches']} batches"
    print(
        f"\nDevice: {h['device']}. Model: {h['model']}, {h['bits']}-bit, rank {h['rank']}, group size "
        f"{h['group_size']}{' (clipped grid)' if h['clip'] else ''}; {h['max_steps']} steps, batch "
        f"{h['batch_size']} x {h['accumulate_grad_batches']} accumulated, max seq length "
        f"{h['max_seq_length']}, {h['precision']}; val loss over {val_batches} every "
        f"{h['val_check_interval']} steps.\nCommand: `{h['command']}`\n"
    )
    steps = sorted({int(s) for r in results for s in r["val_loss"]})
    val_columns = " | ".join(f"val loss @{s}" for s in steps)
    print(f"| variant | {val_columns} | s/step | fit s | peak GiB | setup s | quant s |")
    print(f"|---|{'---:|' * len(steps)}---:|---:|---:|---:|---:|")
    for r in results:
        losses = " | ".join(fmt(r["val_loss"].get(str(s)), ".4f") for s in steps)
        quant = fmt(r["quant_seconds"], ".0f")
        print(
            f"| {r['variant']} | {losses} | {fmt(r['seconds_per_step'], '.2f')} | {r['fit_seconds']:.0f} "
            f"| {r['peak_gib']:.2f} | {r['setup_seconds']:.0f} | {quant} |"
        )
    kind = results[0]["peak_kind"]
    print(
        f"\ns/step: median over training steps (the first {SKIP_STEPS} left out). fit s: the whole fit, "
        f"validations and checkpoints included. peak GiB: {kind} of the training process. setup s: "
        "model load, adapters and data before step 0. quant s: seconds spent quantizing modules (GPTQ/ProjQ "
        "+ compensation, calibration forward passes not counted) as recorded in the artifact."
    )


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        mode, result, cli_args = sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        out = (worker_setup if mode == "setup" else worker_train)(cli_args)
        result.write_text(json.dumps(out))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2-135m-alpaca-w3.yaml")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--max_steps", type=int, help="training steps (default: the recipe's)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench-finetune")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--table-from", nargs="+", type=Path, help="only print the table of earlier --json files")
    args, overrides = ap.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.table_from:
        print_table([r for f in args.table_from for r in json.loads(f.read_text())])
        return
    command = shlex.join(["python", "benchmarks/finetune.py", *sys.argv[1:]])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    steps = ["--trainer.max_steps", str(args.max_steps)] if args.max_steps else []
    jobs = {}
    for name in args.variants:  # parse every variant first: a bad override fails before any work
        run_dir = (args.runs_dir / stamp / name.replace("+", "_")).resolve()
        cli_args = [
            "--config", str(args.recipe.resolve()), *VARIANTS[name], *steps, *run_dir_args(run_dir),
            "--trainer.num_sanity_val_steps=0", *overrides,
        ]  # fmt: skip
        jobs[name] = cli_args, build_cli(cli_args, parse_only=True).config
    results, made = [], {}
    for name, (cli_args, config) in jobs.items():
        key = artifact_key(config)
        if key not in made:
            made[key] = run_worker("setup", cli_args)
        setup = made[key]
        train = run_worker("train", cli_args)
        row = {"variant": name, "args": cli_args, **setup, **train}
        row["header"] = describe(config, command, train["device"])
        results.append(row)
        log.info("%s: val loss %s, %.2f s/step", name, row["val_loss"], row["seconds_per_step"] or math.nan)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    print_table(results)


if __name__ == "__main__":
    main()
