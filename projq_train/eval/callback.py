"""Task metrics inside ``projq-train fit|validate|test``: a Lightning callback for the recipe's
``trainer.callbacks`` that scores the model on evaluation tasks at the end of validation and test::

    trainer:
      callbacks:
        - class_path: projq_train.eval.callback.TaskEval
          init_args: {tasks: [wikitext2, boolq], data_root: ../shared/data/datasets, limit: 200}

Metrics are logged as ``<val|test>/<task>/<metric>`` (e.g. ``test/boolq/acc_loglik``). With several
processes each scores its share of the rows and the totals are summed across them.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from projq_train.eval.harness import COUNTS, ChoiceMode, EvalSettings, evaluate
from projq_train.eval.tasks import DATA_ROOT, Task, check_task_name, resolve_task


class TaskEval(Callback):
    """Score the model on evaluation tasks after every validation (not the sanity check) and test.

    Args:
        tasks: Task names or ``name=path``, as for ``projq-train eval``.
        data_root: Folder with the task data (default ``$PROJQ_DATA_ROOT`` or ``data``).
        limit: Score only the first rows of each choice/math task and windows of each text.
        choice_mode: Multiple choice by answer log-likelihood, by generation, or both.
        seqlen: Perplexity window length (default: the model's context, at most 2048 tokens).
        stride: Perplexity window step (default ``seqlen // 2``).
        batch_size: Sequences per forward pass.
        on_validation: Also score at the end of each validation, not only at test.
    """

    def __init__(
        self,
        tasks: list[str],
        data_root: str = DATA_ROOT,
        limit: int | None = None,
        choice_mode: ChoiceMode = "loglik",
        seqlen: int | None = None,
        stride: int | None = None,
        batch_size: int = 8,
        on_validation: bool = True,
    ) -> None:
        for spec in tasks:  # a misspelled task fails when the recipe is read
            check_task_name(spec)
        self.specs, self.data_root = tasks, data_root
        self.tasks: list[Task] = []
        self.settings = EvalSettings(limit, choice_mode, seqlen, stride, batch_size)
        self.on_validation = on_validation

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Find the task data before any work of a stage that scores (before training, for fit)."""
        if stage == "test" or (self.on_validation and stage in ("fit", "validate")):
            self.tasks = [resolve_task(spec, self.data_root) for spec in self.specs]

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        template = getattr(trainer.datamodule, "template", "alpaca")
        with trainer.precision_plugin.forward_context():
            results = evaluate(
                pl_module.model,
                pl_module.tokenizer,
                self.tasks,
                template,
                self.settings,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                progress=trainer.is_global_zero,
            )
        for task, metrics in results.items():
            for metric, value in metrics.items():
                if metric not in COUNTS:
                    pl_module.log(f"{prefix}/{task}/{metric}", value)  # equal on every rank

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._score(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._score(trainer, pl_module, "test")
