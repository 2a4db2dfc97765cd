"""The Lightning side of the command line: ``projq-train fit|validate|test`` (LightningCLI over
:class:`~projq_train.module.ProjQModule` and a data module). Imported only by those
subcommands, so the others start without Lightning and peft."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from projq_train.checkpoint import (
    MAY_CHANGE,
    identity_differences,
    newest_last_checkpoint,
    read_checkpoint_file,
)
from projq_train.module import NonFiniteTrainingError, ProjQModule


class ProjQArgumentParser(LightningArgumentParser):
    """A bad option or setting ends in its error line first and a pointer to ``--help``, not in
    the usage text."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse trying alternatives: it catches this
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        prog = f"{prog} <subcommand>" if prog == self.prog else prog  # the error is the root parser's
        sys.stderr.write(f"error: {message}\n({prog} --help lists every option)\n")
        sys.exit(2)


class ProjQCLI(LightningCLI):
    """LightningCLI whose data module gets the model's tokenizer, and whose invalid settings
    (checked when the classes are built, before any work) end in one parser error."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.tokenizer", "data.init_args.tokenizer", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which overwrote the recipe's model settings with the
        checkpoint's (dropping overrides silently): a checkpoint whose model or data settings
        differ from the recipe and overrides is refused here, before anything is built."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        ckpt_path = config.get("ckpt_path") if config else None
        if not ckpt_path or ckpt_path in ("best", "hpc", "registry"):
            return  # nothing to resume, or resolved by Lightning from the trainer's state
        if ckpt_path == "last":
            dirs = [
                Path(cb["init_args"]["dirpath"])
                for cb in config.as_dict()["trainer"].get("callbacks") or []
                if cb.get("class_path", "").endswith("ModelCheckpoint") and cb["init_args"].get("dirpath")
            ]
            if not dirs:
                return  # checkpoints go to the logger's folder, known once the trainer exists
            path = newest_last_checkpoint(dirs)
            if path is None:
                self.parser.error(
                    f"--ckpt_path last: no last*.ckpt in {', '.join(map(str, dirs))}; "
                    f"drop --ckpt_path to start a new run"
                )
        else:
            path = Path(ckpt_path)
            if not path.is_file():
                self.parser.error(f"--ckpt_path {ckpt_path}: no such file")
        try:
            checkpoint = read_checkpoint_file(path)
        except ValueError as err:
            self.parser.error(str(err))
        settings = config.as_dict()
        data = settings["data"].get("init_args", {}) if isinstance(settings.get("data"), dict) else {}
        differ = identity_differences(checkpoint, settings["model"], data, training=subcommand == "fit")
        if differ:
            self.parser.error(
                f"{path} was trained with other settings than these: {'; '.join(differ)}. Use the "
                f"recipe it was made with; only trainer settings and {', '.join(MAY_CHANGE)} may change"
            )

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
            parser_class=ProjQArgumentParser,
            save_config_kwargs={"overwrite": True},
            args=argv,
        )
    except NonFiniteTrainingError as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # a full disk, a lost mount: checkpoints written before stay intact
        where = f": {err.filename}" if err.filename else ""
        sys.exit(f"error: {err.strerror or err}{where}; the run stopped (checkpoints are written atomically)")
