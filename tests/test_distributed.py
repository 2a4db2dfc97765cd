"""Several processes (gloo on CPU): quantize once, DDP keeps adapters in sync and matches one process."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.distributed.tensor import DTensor

import projq_train.artifact as artifact
from projq_train.config import CalibrationConfig, ModelConfig, QuantConfig
from tests.conftest import TINY, artifact_root_entries
from tests.test_eval import write_task_files
from tests.test_fit import TINY_FIT, fit_args

ROOT = Path(__file__).parents[1]


class DumpAdapters(L.Callback):
    """Save every rank's adapter weights and its training losses under the run's root dir."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        trainable = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        sharded = {n: isinstance(p, DTensor) for n, p in trainable.items()}
        weights = {n: (p.full_tensor() if sharded[n] else p).detach().clone() for n, p in trainable.items()}
        local = sum((p.to_local() if sharded[n] else p).numel() for n, p in trainable.items())
        buffers = {n: b.dtype for n, b in pl_module.named_buffers()}
        out = Path(trainer.default_root_dir) / f"adapters-rank{trainer.global_rank}.pt"
        torch.save({"weights": weights, "losses": self.losses, "local_numel": local, "buffers": buffers}, out)


class DumpMetrics(L.Callback):
    """Save rank 0's logged metrics after validation under the run's root dir."""

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            torch.save(metrics, Path(trainer.default_root_dir) / f"metrics-{trainer.world_size}.pt")


def run_cli(subcommand: str, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "projq_train.cli", subcommand, "--config", str(TINY_FIT), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def fit_in_subprocess(
    root: Path, devices: int, batch_size: int, steps: int = 4, *extra: str, strategy: str = "ddp"
) -> None:
    args = [
        *fit_args(root, steps),
        f"--trainer.devices={devices}",
        *([f"--trainer.strategy={strategy}"] if devices > 1 else []),
        "--trainer.callbacks+=tests.test_distributed.DumpAdapters",
        "--data.init_args.limit=8",  # one global batch per step: 8 rows in both set-ups
        "--data.init_args.val_fraction=0.1",
        f"--data.init_args.batch_size={batch_size}",
        "--model.adapter.dropout=0.0",
        # SGD: updates linear in the gradients, so the comparison below is a real one (Adam's
        # sign-like first steps would amplify rounding-level gradient differences); momentum gives
        # it a state to shard and checkpoint
        "--model.optimizer=torch.optim.SGD",
        "--model.optimizer.init_args.lr=0.5",
        "--model.optimizer.init_args.momentum=0.5",
        *extra,
    ]
    run_cli("fit", args)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """The reference run: one process, the same global batch of 8; its root folder."""
    root = tmp_path_factory.mktemp("single")
    fit_in_subprocess(root, devices=1, batch_size=8)
    return root


@pytest.fixture(scope="module")
def single(single_run) -> dict:
    """Adapters and losses of the reference run."""
    return torch.load(single_run / "adapters-rank0.pt")


def test_ddp_two_processes_quantize_once_and_train_like_one_process(tmp_path, single):
    fit_in_subprocess(tmp_path / "ddp", devices=2, batch_size=4)
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"adapters-rank{r}.pt") for r in (0, 1))
    assert len(artifact_root_entries(tmp_path / "ddp" / "artifacts")) == 1  # one artifact, no leftovers
    for name, w in rank0["weights"].items():
        torch.testing.assert_close(rank1["weights"][name], w, rtol=0, atol=0)  # in sync
        # the same global batch: per-rank token means differ from the global mean only slightly
        torch.testing.assert_close(single["weights"][name], w, rtol=0.05, atol=1e-4)
    ddp_loss = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"], strict=True)]
    torch.testing.assert_close(torch.tensor(ddp_loss), torch.tensor(single["losses"]), rtol=1e-4, atol=0)


def test_fsdp_two_processes_shard_the_adapters_and_train_like_one_process(tmp_path, single):
    fit_in_subprocess(tmp_path, 2, 4, strategy="projq_fsdp")
    rank0, rank1 = (torch.load(tmp_path / f"adapters-rank{r}.pt") for r in (0, 1))
    full = sum(w.numel() for w in rank0["weights"].values())
    assert rank0["local_numel"] < full and rank0["local_numel"] + rank1["local_numel"] == full  # sharded
    assert len(artifact_root_entries(tmp_path / "artifacts")) == 1
    for name, w in rank0["weights"].items():
        torch.testing.assert_close(single["weights"][name], w, rtol=0.05, atol=1e-4)
    fsdp_loss = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"], strict=True)]
    torch.testing.assert_close(torch.tensor(fsdp_loss), torch.tensor(single["losses"]), rtol=1e-4, atol=0)
    packed = {n: d for n, d in rank0["buffers"].items() if n.endswith((".qweight", ".scales"))}
    assert packed and all(
        d == (torch.int32 if n.endswith("qweight") else torch.float16) for n, d in packed.items()
    )

    # the adapter-only checkpoint of two processes resumes on one
    fit_in_subprocess(tmp_path, 1, 8, 6, "--ckpt_path=last", "--trainer.strategy=projq_fsdp")
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_fsdp_resumes_an_optimizer_without_state_exactly(tmp_path):
    """Plain SGD keeps no state, which Lightning's and torch's FSDP2 loaders cannot read; resuming
    must also restore the scheduled learning rate of the first resumed step."""
    plain_sgd = (
        "--model.optimizer.init_args.momentum=0",
        "--trainer.strategy=projq_fsdp",
        f"--model.artifact_dir={tmp_path}/artifacts",  # both runs: one quantization
    )
    fit_in_subprocess(tmp_path / "straight", 1, 8, 4, *plain_sgd)
    fit_in_subprocess(tmp_path / "resumed", 1, 8, 2, *plain_sgd)
    fit_in_subprocess(tmp_path / "resumed", 1, 8, 4, *plain_sgd, "--ckpt_path=last")
    straight, resumed = (
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)
        for run in ("straight", "resumed")
    )
    assert straight["global_step"] == resumed["global_step"] == 4
    assert straight["optimizer_states"][0]["state"] == {}
    for name, w in straight["state_dict"].items():  # warmup: steps 3 and 4 use different rates
        torch.testing.assert_close(resumed["state_dict"][name], w, rtol=0, atol=0)


def test_waiting_rank_loads_the_artifact_rank_0_writes(tmp_path, monkeypatch):
    mcfg = ModelConfig(config=TINY["llama"])
    quant = QuantConfig(method="rtn", bits=4, group_size=32)
    calib = CalibrationConfig(nsamples=2, seqlen=32)
    found, polled = {}, threading.Event()
    real_find = artifact.find_artifact

    calls = []

    def find(*args):  # the waiting thread looks once before its loop, then once per poll
        result = real_find(*args)
        if threading.current_thread() is thread:
            calls.append(result)
            if len(calls) >= 2:
                polled.set()
        return result

    monkeypatch.setattr(artifact, "find_artifact", find)

    def waiter():
        found["path"] = artifact.find_or_quantize(
            mcfg, quant, 4, calib, tmp_path, torch.device("cpu"), wait=True, poll_seconds=0.05
        )

    thread = threading.Thread(target=waiter)
    thread.start()
    assert polled.wait(timeout=60)
    assert thread.is_alive() and not list(tmp_path.iterdir())  # it polled, it did not quantize
    made_path = artifact.find_or_quantize(mcfg, quant, 4, calib, tmp_path, torch.device("cpu"))
    thread.join(timeout=60)
    assert found["path"] == made_path


def test_task_metrics_under_ddp_sum_every_ranks_share(tmp_path, single_run):
    data_root = write_task_files(tmp_path / "tasks")
    task_eval = "--trainer.callbacks.init_args."  # options of the callback added last
    for devices in (1, 2):
        args = [
            *fit_args(single_run, 4),
            f"--trainer.default_root_dir={tmp_path}",
            f"--ckpt_path={single_run}/checkpoints/last.ckpt",  # the reference run's checkpoint
            "--data.init_args.limit=8",  # the data settings of the checkpoint (the optimizer may differ)
            "--data.init_args.val_fraction=0.1",
            f"--trainer.devices={devices}",
            *(["--trainer.strategy=ddp"] if devices > 1 else []),
            "--trainer.callbacks+=projq_train.eval.callback.TaskEval",
            f"{task_eval}tasks=[boolq, wikitext2]",
            f"{task_eval}data_root={data_root}",
            f"{task_eval}seqlen=64",
            "--trainer.callbacks+=tests.test_distributed.DumpMetrics",
        ]
        run_cli("validate", args)
    one, two = (torch.load(tmp_path / f"metrics-{n}.pt") for n in (1, 2))
    # the questions and text windows are split between the ranks; their sums make the same metrics
    assert one["val/boolq/acc_loglik"] == two["val/boolq/acc_loglik"]
    assert two["val/wikitext2/perplexity"] == pytest.approx(one["val/wikitext2/perplexity"], rel=1e-5)
