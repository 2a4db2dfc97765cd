"""Canaries for the private APIs projq-train relies on: each test fails when an upgrade removes or
changes one, before a run would. pyproject.toml bounds the versions these were checked with
(torch < 2.14, lightning < 2.7, peft < 0.22)."""

import inspect

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from peft import LoraConfig
from torch.nn.parallel import DistributedDataParallel


def parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_peft_registers_a_custom_lora_layer():  # projq_train.lora.with_quant_linear
    assert parameters(LoraConfig._register_custom_module) == ["self", "mapping"]


def test_ddp_can_ignore_frozen_parameters_and_buffers():  # ProjQModule.configure_model
    assert parameters(DistributedDataParallel._set_params_and_buffers_to_ignore_for_model) == [
        "module",
        "params_and_buffers_to_ignore",
    ]


def test_lightning_model_parallel_checkpoint_loader():  # ProjQFSDPStrategy.load_checkpoint
    from lightning.fabric.strategies.model_parallel import _load_checkpoint

    expected = {"path", "state", "strict", "optimizer_states_from_list", "weights_only"}
    assert expected <= set(parameters(_load_checkpoint))


def test_model_parallel_strategy_keeps_its_data_parallel_size():  # ProjQFSDPStrategy.setup_environment
    assert ModelParallelStrategy()._data_parallel_size == "auto"


def test_lightning_cli_reads_the_checkpoint_path_in_a_method_we_replace():  # ProjQCLI._parse_ckpt_path
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__)


def test_lightning_cli_sets_the_seed_in_a_method_we_skip_when_only_parsing():  # ProjQCLI._set_seed
    assert "self._set_seed()" in inspect.getsource(LightningCLI.__init__)
