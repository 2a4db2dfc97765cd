"""The Lightning side of the command line: ``projq-train fit|validate|test`` (LightningCLI over
:class:`~projq_train.module.ProjQModule` and a data module). Imported only by those
subcommands, so the others start without Lightning and peft."""

from __future__ import annotations

import resource
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from projq_train.checkpoint import (
    MAY_CHANGE,
    check_current_settings,
    identity_differences,
    newest_last_checkpoint,
    read_checkpoint_file,
)
from projq_train.cli import RecipeParsing
from projq_train.integrity import verify_checkpoint
from projq_train.module import NonFiniteTrainingError, ProjQModule


def first_cause(message: str) -> str:
    """The error of a class the CLI failed to build: jsonargparse reports a data module (a
    subclass) that raised as the errors of every member of its union type, ours first."""
    lines = message.splitlines()
    if "Errors:" in lines and lines.index("Errors:") + 1 < len(lines):
        first = lines[lines.index("Errors:") + 1].strip()
        return first.removeprefix("- ") if first.startswith("- ") else message
    return message


class ProjQArgumentParser(RecipeParsing, LightningArgumentParser):
    """LightningCLI's parser with :class:`~projq_train.cli.RecipeParsing`."""


def place_outputs(trainer: Namespace) -> None:
    """Make ``trainer.default_root_dir`` decide where a run writes: a ``ModelCheckpoint`` without
    a ``dirpath`` writes to ``<default_root_dir>/checkpoints``, one folder for every run of the
    recipe (the one ``--ckpt_path last`` looks in), not into the logger's new version folder.
    Lightning's own logger (``logger: true``) writes under ``default_root_dir`` already."""
    root = Path(trainer.default_root_dir or ".")  # Lightning's default root is the working directory
    for callback in trainer.callbacks or []:
        args = getattr(callback, "init_args", None)
        if (
            callback.class_path.endswith("ModelCheckpoint")
            and args is not None
            and args.get("dirpath") is None
        ):
            args.dirpath = str(root / "checkpoints")


class ProjQCLI(LightningCLI):
    """LightningCLI whose data module gets the model's tokenizer, whose outputs follow
    ``trainer.default_root_dir`` (:func:`place_outputs`), and whose invalid settings (checked
    when the classes are built, before any work) end in one parser error. Built by
    :func:`trainer_cli` only.

    ``build=False``: parse and check the recipe, build nothing (``config`` only, no seed set);
    ``add_arguments``: adds options of a command that reads the recipe (``estimate``)."""

    def __init__(
        self,
        *args: Any,
        build: bool = True,
        add_arguments: Callable[[LightningArgumentParser], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self._build, self._extra_arguments = build, add_arguments
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.tokenizer", "data.init_args.tokenizer", apply_on="instantiate")
        if self._extra_arguments is not None:
            self._extra_arguments(parser)

    def _set_seed(self) -> None:
        if self._build:  # nothing is built from a recipe that is only parsed: no seed to set or log
            super()._set_seed()

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        if self.config.get("subcommand"):
            place_outputs(self.config[self.config.subcommand].trainer)

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which overwrote the recipe's model settings with the
        checkpoint's (dropping overrides silently): a checkpoint whose model or data settings
        differ from the recipe and overrides is refused here, before anything is built."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        ckpt_path = config.get("ckpt_path") if config else None
        if not ckpt_path or ckpt_path in ("best", "hpc", "registry"):
            return  # nothing to resume, or resolved by Lightning from the trainer's state
        settings = config.as_dict()
        if ckpt_path == "last":
            dirs = [
                Path(cb["init_args"]["dirpath"])
                for cb in settings["trainer"].get("callbacks") or []
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
            if path.is_dir():
                return  # a sharded checkpoint (save_distributed_checkpoint): read by the strategy
            if not path.is_file():
                self.parser.error(f"--ckpt_path {ckpt_path}: no such file")
        try:
            checkpoint = read_checkpoint_file(path)
            verify_checkpoint(checkpoint, path)
            check_current_settings(checkpoint, path)
        except ValueError as err:
            self.parser.error(str(err))
        data = settings["data"].get("init_args", {}) if isinstance(settings.get("data"), dict) else {}
        differ = identity_differences(checkpoint, settings["model"], data, training=subcommand == "fit")
        if differ:
            self.parser.error(
                f"{path} was trained with other settings than these: {'; '.join(differ)}. Use the "
                f"recipe it was made with; only trainer settings and {', '.join(MAY_CHANGE)} may change"
            )

    def before_instantiate_classes(self) -> None:
        """Settings the classes cannot check when they are built (the optimizer is built last)."""
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        optimizer = config.as_dict()["model"].get("optimizer")
        lr = optimizer.get("init_args", {}).get("lr") if isinstance(optimizer, dict) else None
        if isinstance(lr, (int, float)) and not lr > 0:
            self.parser.error(f"model.optimizer.init_args.lr must be positive, got {lr}")
        trainer = config.trainer
        callbacks = trainer.callbacks or []
        if trainer.enable_progress_bar is not False and not any(
            "ProgressBar" in c.class_path for c in callbacks
        ):
            trainer.callbacks = [
                *callbacks,
                Namespace(class_path=f"{__name__}.StepProgressBar", init_args=Namespace()),
            ]

    def before_fit(self) -> None:
        self._fit_started = time.monotonic()

    def after_fit(self) -> None:
        """The end of a run: where the checkpoints are, the final losses, wall time, peak memory."""
        if self.trainer.is_global_zero:
            print(fit_summary(self.trainer, time.monotonic() - self._fit_started))

    def instantiate_classes(self) -> None:
        if not self._build:
            return
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:
            self.parser.error(first_cause(str(err)))


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, described by the optimizer step out of ``max_steps`` (the epoch
    out of ``max_epochs`` when training is counted in epochs) instead of the epoch alone."""

    def _describe(self, trainer: L.Trainer) -> None:
        if trainer.max_steps > 0:
            self.train_progress_bar.set_description(f"step {trainer.global_step}/{trainer.max_steps}")
        elif trainer.max_epochs is not None and trainer.max_epochs > 0:
            self.train_progress_bar.set_description(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._describe(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_batch_end(trainer, *args)
        self._describe(trainer)


def fit_summary(trainer: L.Trainer, seconds: float) -> str:
    """Lines for the end of ``fit``: best and last checkpoint, final train and val loss, wall time
    and the peak memory of this process (host resident set; the device's too when on CUDA)."""
    ckpt = trainer.checkpoint_callback
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train_loss", "val_loss")}
    peak = f"host {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"  # ru_maxrss: KiB
    if trainer.strategy.root_device.type == "cuda":
        peak += f", device {torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30:.2f} GiB"
    lines = [
        f"fit done: step {trainer.global_step} in {seconds / 60:.1f} min; peak memory {peak}",
        "  final " + (", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())) or "losses: none logged"),
    ]
    if ckpt is not None:
        best = getattr(ckpt, "best_model_path", "") or "none"
        lines += [f"  best checkpoint: {best}", f"  last checkpoint: {ckpt.last_model_path or 'none'}"]
    return "\n".join(lines)


def trainer_cli(
    argv: list[str],
    run: bool = True,
    build: bool = True,
    add_arguments: Callable[[LightningArgumentParser], None] | None = None,
    parser_kwargs: dict[str, Any] | None = None,
) -> ProjQCLI:
    """The one way ``fit``, ``validate`` and ``test`` are built, for the command line, benchmarks
    and tests. ``run``: ``argv`` starts with the subcommand, which runs; otherwise ``argv`` is a
    fit recipe and overrides, and the model, data module and trainer are built but not run.
    ``build=False``: only parse and check (``.config``); ``add_arguments``, ``parser_kwargs``:
    what a command reading the same recipes adds (``estimate``)."""
    try:
        with warnings.catch_warnings():  # args= given while sys.argv holds another command: intended
            warnings.filterwarnings("ignore", message=".*args parameter is intended")
            return ProjQCLI(
                ProjQModule,
                L.LightningDataModule,
                subclass_mode_data=True,
                parser_class=ProjQArgumentParser,
                save_config_kwargs={"overwrite": True},
                args=argv,
                run=run,
                build=build,
                add_arguments=add_arguments,
                parser_kwargs=parser_kwargs or {},
            )
    except NonFiniteTrainingError as err:
        sys.exit(f"error: {err}")
    except FileNotFoundError as err:  # an input that is not there
        sys.exit(f"error: {err}")
    except OSError as err:  # a full disk, a lost mount: checkpoints written before stay intact
        where = f": {err.filename}" if err.filename else ""
        sys.exit(f"error: {err.strerror or err}{where}; the run stopped (checkpoints are written atomically)")
