"""Sharded data parallel training over packed low-bit bases: ``trainer.strategy: projq_fsdp``.

Lightning's ``ModelParallelStrategy`` used as pure data parallelism (one mesh dimension of all
processes) with FSDP2 (``fully_shard``), applied by :func:`shard_model` when the module is
configured:

- each decoder layer is its own FSDP unit, and the whole model the root one;
- parameters (the frozen float tensors: norms, embeddings, head; and the trainable LoRA
  weights) are sharded, so adapters, their gradients and optimizer states are split across ranks;
- buffers are neither sharded nor cast: every rank holds the packed int32 codes and their fp16 (or 8-bit)
  scales and zero points as they are (they are the small part of a low-bit base);
- it runs on CPU (gloo) as well as CUDA (Lightning's FSDP1 ``fsdp`` strategy requires CUDA);
- checkpoints are gathered into one file on rank 0 (adapter weights only, see ``ProjQModule``),
  so a run resumes on any number of processes, also with an optimizer that keeps no state
  (plain SGD), which Lightning's own loader cannot read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.model_parallel import _load_checkpoint
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from peft import PeftModel
from torch.distributed.device_mesh import DeviceMesh

from projq_train.models import decoder_layers


class ProjQFSDPStrategy(ModelParallelStrategy):
    strategy_name = "projq_fsdp"

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("save_distributed_checkpoint", False)
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # every process in one data-parallel group
            self._data_parallel_size = self.num_nodes * self.num_processes // self._tensor_parallel_size
        super().setup_environment()

    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():  # a sharded checkpoint (save_distributed_checkpoint=True)
            return super().load_checkpoint(path, weights_only)
        saved = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        if any(state["state"] for state in saved.get("optimizer_states", [])):
            return super().load_checkpoint(path, weights_only)
        # Optimizers without state (plain SGD): neither Lightning's loader (which keys the state by
        # its first entry) nor torch's (which places it on the device of its first tensor) can
        # read one, and there is nothing to shard; restore the module through Lightning and the
        # param groups' settings (learning rates of the schedule) here.
        assert self.lightning_module is not None
        checkpoint = _load_checkpoint(
            path=path,
            state={"state_dict": self.model},
            strict=self.lightning_module.strict_loading,
            optimizer_states_from_list=True,
            weights_only=weights_only,
        )
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            for group, saved_group in zip(optimizer.param_groups, state["param_groups"], strict=True):
                group.update({k: v for k, v in saved_group.items() if k != "params"})
        return checkpoint


def shard_model(model: PeftModel, mesh: DeviceMesh) -> None:
    """FSDP2 over ``mesh``: one unit per decoder layer plus the root (buffers are left alone)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model.get_base_model()):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


StrategyRegistry.register(
    ProjQFSDPStrategy.strategy_name,
    ProjQFSDPStrategy,
    description="FSDP2 data parallelism over packed low-bit bases (CPU or CUDA)",
)
