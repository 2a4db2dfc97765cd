"""Instruction-tuning data: rows of (instruction, input, response) become token batches.

A row is a dict in one of three formats (``input`` is optional and may be empty):

- ``alpaca``: ``{"instruction", "input"?, "output"}``; the target is ``output``.
- ``commonsense`` (LLM-Adapters): ``{"instruction", "input"?, "output", "answer"}``; the target is
  ``output`` (e.g. "the correct answer is true"), as in LLM-Adapters.
- ``gsm8k``: ``{"question", "answer"}``; the question is the instruction, the target is ``answer``.

An example is ``prompt + response + EOS``. A batch is a dict of LongTensors, padded on the right to
the longest example rounded up to a multiple of ``pad_to_multiple_of`` (at most ``max_seq_length``):
``input_ids (B, T)``, ``attention_mask (B, T)`` (1 on tokens, 0 on padding) and
``labels (B, T)``, equal to ``input_ids`` but -100 on padding and, with ``mask_prompt``, on the prompt.
Labels are not shifted: the causal LM predicts ``labels[:, t + 1]`` from position ``t``.
"""

from __future__ import annotations

import functools
import logging
import random
import warnings
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from projq_train.data.calibration import load_rows
from projq_train.data.prompts import alpaca_prompt, chat_prompt, check_chat_template

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FIELDS = {  # the fields each format needs
    "alpaca": ("instruction", "output"),
    "commonsense": ("instruction", "output", "answer"),
    "gsm8k": ("question", "answer"),
}
Example = dict[str, list[int]]  # input_ids and labels, each (T,)


def detect_format(row: Any, source: str) -> str:
    """The format of a dataset, from the keys of its first row."""
    keys = sorted(row) if isinstance(row, dict) else []
    if "instruction" in keys:
        return "commonsense" if "answer" in keys else "alpaca"
    if "question" in keys:
        return "gsm8k"
    raise ValueError(
        f"{source}: cannot tell the format from the first row's fields {keys}; expected 'instruction' "
        "(alpaca, or commonsense with 'answer') or 'question' (gsm8k), or set `format` explicitly"
    )


def check_rows(rows: list, fmt: str, source: str) -> str:
    """Resolve ``auto`` and check that every row has the fields ``fmt`` needs; returns the format."""
    if not rows:
        raise ValueError(f"{source}: the dataset has no rows")
    fmt = detect_format(rows[0], source) if fmt == "auto" else fmt
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}, row {i}: expected an object with fields, got {type(row).__name__}")
        missing = [k for k in FIELDS[fmt] if k not in row]
        if missing:
            raise ValueError(f"{source}, row {i}: missing field(s) {missing} needed by the {fmt!r} format")
    return fmt


def tokenize_row(
    row: dict, fmt: str, template: str, tokenizer, max_seq_length: int, mask_prompt: bool
) -> Example:
    """``input_ids`` and ``labels`` (each ``(T,)``, ``T <= max_seq_length``) of one checked row."""
    if fmt == "gsm8k":
        instruction, input, response = row["question"], "", row["answer"]
    else:
        instruction, input, response = row["instruction"], row.get("input") or "", row["output"]
    if template == "chat":  # the chat text already holds BOS and friends
        prompt = tokenizer(chat_prompt(tokenizer, instruction, input), add_special_tokens=False)["input_ids"]
    else:
        prompt = tokenizer(alpaca_prompt(instruction, input))["input_ids"]
    reply = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = ([IGNORE_INDEX] * len(prompt) if mask_prompt else prompt) + reply
    return {"input_ids": (prompt + reply)[:max_seq_length], "labels": labels[:max_seq_length]}


def pack(examples: list[Example], max_seq_length: int, seed: int) -> list[Example]:
    """Concatenate the examples in a seeded random order and cut into ``(max_seq_length,)`` chunks,
    dropping the short tail. Chunks attend across example boundaries (no block-diagonal mask)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    ids = [t for i in order for t in examples[i]["input_ids"]]
    labels = [t for i in order for t in examples[i]["labels"]]
    n = len(ids) // max_seq_length * max_seq_length
    if n == 0:
        raise ValueError(f"packing: the training set has {len(ids)} tokens, fewer than max_seq_length")
    return [
        {"input_ids": ids[s : s + max_seq_length], "labels": labels[s : s + max_seq_length]}
        for s in range(0, n, max_seq_length)
    ]


def collate(
    examples: list[Example], pad_id: int, pad_to_multiple_of: int = 1, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, rounded up to a multiple of ``pad_to_multiple_of`` but not
    beyond ``max_length`` (nor below the longest example): ``input_ids``, ``attention_mask``,
    ``labels``, each ``(B, T)``. Padding has ``pad_id``, mask 0 and label -100."""
    B, longest = len(examples), max(len(e["input_ids"]) for e in examples)
    T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of  # rounded up to the multiple
    if max_length is not None:
        T = max(longest, min(T, max_length))
    batch = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
        "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long),
    }
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][b, :n] = torch.tensor(e["input_ids"])
        batch["labels"][b, :n] = torch.tensor(e["labels"])
        batch["attention_mask"][b, :n] = 1
    return batch


class ResumableSampler(DistributedSampler):
    """The training order: each epoch a permutation seeded with ``seed + epoch`` (Lightning calls
    ``set_epoch``), split between the ``num_replicas`` processes as by :class:`DistributedSampler`,
    so that no other sampler replaces it under DDP. ``resume_at`` makes the next iteration, if it
    is of that epoch, start after the samples that were already trained on (counted over all
    processes): a run resumed mid-epoch sees the same batches an uninterrupted run would, also
    with another number of processes as long as the global batch stays the same (process ``r``
    of ``n`` takes samples ``r, r + n, ...``, so a global batch is the same consecutive samples)."""

    def __init__(self, dataset: list[Example], num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.resume: tuple[int, int] | None = None  # (epoch, samples already seen by all processes)

    def resume_at(self, epoch: int, samples_done: int) -> None:
        self.resume = (epoch, samples_done)

    def __iter__(self):
        indices = list(super().__iter__())
        if self.resume is not None and self.resume[0] == self.epoch:
            indices = indices[self.resume[1] // self.num_replicas :]
        self.resume = None  # only the first epoch after a resume starts part-way
        return iter(indices)


class InstructionData(L.LightningDataModule):
    """Instruction-tuning rows from a hub dataset or a local .json/.jsonl/.parquet file, as padded
    (or, for training with ``packing``, packed) batches; see the module docstring for rows and shapes."""

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        test_path: str | None = None,
        format: Literal["auto", "alpaca", "commonsense", "gsm8k"] = "auto",
        template: Literal["alpaca", "chat"] = "alpaca",
        max_seq_length: int = 512,
        batch_size: int = 4,
        val_fraction: float = 0.05,
        limit: int | None = None,
        mask_prompt: bool = True,
        packing: bool = False,
        pad_to_multiple_of: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        split: str = "train",
        tokenizer: Any = None,
    ) -> None:
        """
        Args:
            path: Training rows: a hub dataset name or a local .json/.jsonl/.parquet file.
            val_path: A separate validation file; if unset, ``val_fraction`` of ``path`` is split off.
            test_path: Rows for ``trainer.test`` (same format as ``path``).
            format: Row format; ``auto`` picks it per file from the first row's fields.
            template: ``alpaca`` prompt text, or the tokenizer's ``chat`` template (one user turn).
            max_seq_length: Examples are truncated to this many tokens (the packed chunk length).
            batch_size: Examples per batch.
            val_fraction: Fraction of ``path`` held out for validation (at least one row) when
                ``val_path`` is unset; 0 means no validation.
            limit: Use only this many training rows (after the seeded shuffle), for short runs.
            mask_prompt: Take the loss only on the response tokens (and EOS).
            packing: Concatenate training examples into chunks of exactly ``max_seq_length`` tokens.
                Packed examples attend across their boundaries. Validation and test are never packed.
            pad_to_multiple_of: Batches are padded to a multiple of this many tokens so that the
                allocator reuses blocks of the same size; 1 disables it (pad to the longest example).
                Capped at ``max_seq_length``: when that is not a multiple, the longest batches are
                ``max_seq_length`` long instead of the next multiple, so no batch is longer than
                the data allows (packed batches stay exactly ``max_seq_length``).
            num_workers: DataLoader worker processes.
            seed: Seed of the validation split, the row shuffle, packing and the training order.
            split: Split name for hub datasets.
            tokenizer: The model's tokenizer; the CLI links it from the model, tests pass it directly.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        for name, value in (("max_seq_length", max_seq_length), ("batch_size", batch_size), ("limit", limit)):
            if value is not None and value < 1:
                raise ValueError(f"data {name} must be positive, got {value}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if pad_to_multiple_of < 1:
            raise ValueError(
                f"pad_to_multiple_of must be at least 1 (1 disables it), got {pad_to_multiple_of}"
            )
        self.path, self.val_path, self.test_path, self.split = path, val_path, test_path, split
        self.format, self.template, self.max_seq_length = format, template, max_seq_length
        self.batch_size, self.val_fraction, self.limit, self.seed = batch_size, val_fraction, limit, seed
        self.mask_prompt, self.packing, self.num_workers = mask_prompt, packing, num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.tokenizer = tokenizer
        self.train_data: list[Example] | None = None
        self.val_data: list[Example] = []
        self.test_data: list[Example] | None = None
        self._rows: dict[str, tuple[list, str]] = {}  # source -> (checked rows, format)
        self._sampler: ResumableSampler | None = None
        self._resume: tuple[int, int] | None = None  # from a checkpoint: (epoch, samples done)

    def setup(self, stage: str) -> None:
        """Load and check every row of every file the stage reads (fit also checks ``test_path``), then
        tokenize: train and validation for fit/validate, test for test."""
        if self.tokenizer is None:
            raise ValueError("InstructionData needs a tokenizer (the CLI links it from the model)")
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; it is needed to end each response")
        if self.template == "chat":
            check_chat_template(self.tokenizer)
        if stage == "test" and self.test_path is None:
            raise ValueError("trainer.test needs test data: set `test_path` in the data config")
        sources = (self.test_path,) if stage == "test" else (self.path, self.val_path, self.test_path)
        for source in sources:
            if source is not None and source not in self._rows:
                rows = load_rows(source, self.split)
                self._rows[source] = rows, check_rows(rows, self.format, source)
        if stage == "test" and self.test_data is None:
            self.test_data = self._tokenize(*self._rows[self.test_path], "test")
        elif stage in ("fit", "validate") and self.train_data is None:
            rows, fmt = self._rows[self.path]
            val_rows, val_fmt = self._rows[self.val_path] if self.val_path else ([], fmt)
            order = list(range(len(rows)))
            random.Random(self.seed).shuffle(order)
            if self.val_path is None and self.val_fraction > 0:
                if len(rows) < 2:
                    raise ValueError(f"{self.path}: {len(rows)} row(s) cannot be split into train and val")
                n_val = min(max(1, round(len(rows) * self.val_fraction)), len(rows) - 1)
                val_rows, order = [rows[i] for i in order[:n_val]], order[n_val:]
            train_rows = [rows[i] for i in order[: self.limit]]
            self.train_data = self._tokenize(train_rows, fmt, "train")
            self.val_data = self._tokenize(val_rows, val_fmt, "val") if val_rows else []
            if self.packing:
                self.train_data = pack(self.train_data, self.max_seq_length, self.seed)

    def _tokenize(self, rows: list[dict], fmt: str, name: str) -> list[Example]:
        args = (fmt, self.template, self.tokenizer, self.max_seq_length, self.mask_prompt)
        examples = [tokenize_row(row, *args) for row in rows]
        kept = [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"])]
        if not kept:
            raise ValueError(
                f"every {name} example has no response token left after truncation: "
                f"max_seq_length {self.max_seq_length} is too small for the prompts"
            )
        if len(kept) < len(examples):
            msg = "dropped %d of %d %s examples with no response token left within max_seq_length %d"
            log.warning(msg, len(examples) - len(kept), len(examples), name, self.max_seq_length)
        return kept

    def _loader(self, data: list[Example] | None, sampler: ResumableSampler | None = None) -> DataLoader:
        if data is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        pad_id = self.tokenizer.pad_token_id
        pad_id = self.tokenizer.eos_token_id if pad_id is None else pad_id
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler,
            # a generator of its own: making an iterator draws a seed from it, not from the global
            # generator that the adapters' dropout uses (a resumed run must draw what a straight one does)
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=functools.partial(
                collate,
                pad_id=pad_id,
                pad_to_multiple_of=self.pad_to_multiple_of,
                max_length=self.max_seq_length,
            ),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_data is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        # Lightning cannot see that this loader resumes mid-epoch (its position is in this module's
        # state, since Lightning loads a loader's own state only if the loader was made after the
        # checkpoint was read); its warning that it does not would be wrong
        warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._sampler = ResumableSampler(self.train_data, replicas, rank, self.seed)
        if self._resume is not None:
            self._sampler.resume_at(*self._resume)
            self._resume = None
        return self._loader(self.train_data, self._sampler)

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the data (saved in checkpoints): the epoch and how many of its
        samples all processes together have trained on."""
        trainer = self.trainer
        if trainer is None or self._sampler is None:
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        samples = batches * self.batch_size * self._sampler.num_replicas
        return {"epoch": trainer.current_epoch, "samples_done": samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        resume = (state_dict["epoch"], state_dict["samples_done"])
        if self._sampler is not None:  # the loader was made before the checkpoint was read
            self._sampler.resume_at(*resume)
        else:
            self._resume = resume

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_data) if self.val_data else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_data)
