"""The Lightning side of the command line: ``projq-train fit|validate|test`` (LightningCLI over
:class:`~projq_train.module.ProjQModule` and a data module). Imported only by those
subcommands, so the others start without Lightning and peft."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from projq_train.module import NonFiniteTrainingError, ProjQModule


class ProjQCLI(LightningCLI):
    """LightningCLI whose data module gets the model's tokenizer, and whose invalid settings
    (checked when the classes are built, before any work) end in one parser error."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.tokenizer", "data.init_args.tokenizer", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:
            self.parser.error(str(err))


def trainer_cli(argv: list[str]) -> ProjQCLI:
    try:
        return ProjQCLI(
            ProjQModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=argv,
        )
    except NonFiniteTrainingError as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # a full disk, a lost mount: checkpoints written before stay intact
        where = f": {err.filename}" if err.filename else ""
        sys.exit(f"error: {err.strerror or err}{where}; the run stopped (checkpoints are written atomically)")
