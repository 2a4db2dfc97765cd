"""Calibration text: rows from a dataset, rendered as the model will see them, cut into token windows."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from projq_train.config import CalibrationConfig
from projq_train.data.prompts import alpaca_prompt

BUILTIN = "builtin:"  # files shipped in projq_train/data: builtin:sample, builtin:toy_instructions
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")


def load_rows(source: str, split: str = "train") -> list[dict | str]:
    """Rows of a local .json/.jsonl/.parquet/.txt file (a .txt file is one row), a file shipped
    with the package (``builtin:<name>``), or a hub dataset split."""
    if source.startswith(BUILTIN):
        name = source.removeprefix(BUILTIN)
        found = sorted(p for p in Path(__file__).parent.glob(f"{name}.*") if p.suffix in LOCAL_SUFFIXES)
        if not found:
            shipped = sorted(p.stem for p in Path(__file__).parent.iterdir() if p.suffix in LOCAL_SUFFIXES)
            raise FileNotFoundError(f"no builtin dataset {name!r}; shipped: {shipped}")
        source = str(found[0])
    path = Path(source)
    if path.suffix not in LOCAL_SUFFIXES:
        from datasets import load_dataset

        return list(load_dataset(source, split=split))
    if path.is_dir():
        raise ValueError(f"dataset file {source} is a directory, not a {path.suffix} file")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {source} does not exist")
    if path.suffix == ".txt":
        rows = [path.read_text()] if path.read_text().strip() else []
    elif path.suffix == ".parquet":
        from datasets import load_dataset

        rows = list(load_dataset("parquet", data_files=str(path), split="train"))
    else:
        rows = _json_rows(path)
    if not rows:
        raise ValueError(f"dataset file {source} has no rows")
    return rows


def _json_rows(path: Path) -> list:
    lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
    try:
        parsed = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"dataset file {path} is not valid {path.suffix[1:].upper()}: {err}") from None
    if path.suffix == ".jsonl":
        return parsed
    if not parsed:
        return []
    if not isinstance(parsed[0], list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(parsed[0]).__name__}")
    return parsed[0]


def row_text(row: dict | str, template: str, where: str) -> str:
    """Render one row as text. ``where`` names the file and row in error messages."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with fields, got {type(row).__name__}")
    if template == "auto":
        template = "alpaca" if "instruction" in row else "qa" if "question" in row else "plain"
    needed = {"alpaca": ("instruction", "output"), "qa": ("question", "answer"), "plain": ("text",)}[template]
    missing = [k for k in needed if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing} needed by the {template!r} template")
    if template == "alpaca":
        return alpaca_prompt(row["instruction"], row.get("input") or "") + row["output"]
    if template == "qa":
        return f"Question: {row['question']}\nAnswer: {row['answer']}"
    return row["text"]


def _token_stream(texts: list[str], seed: int, tokenizer, need: int) -> Iterable[int]:
    """Token ids of the texts in a seeded random order, each followed by EOS, until ``need`` are out."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    total = 0
    for i in order:
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        yield from ids
        total += len(ids)
        if total >= need:
            return


def calibration_tokens(cfg: CalibrationConfig, tokenizer) -> Tensor:
    """``(nsamples, seqlen)`` token ids: rows are shuffled with ``cfg.seed``, rendered, joined with
    EOS and cut into consecutive windows; a short corpus gives overlapping random windows."""
    rows = load_rows(cfg.dataset, cfg.split)
    if not rows:
        raise ValueError(f"calibration dataset {cfg.dataset} is empty")
    texts = [
        row_text(r, cfg.template, f"{cfg.dataset}, row {i}") for i, r in enumerate(rows)
    ]  # checks every row
    need = cfg.nsamples * cfg.seqlen
    stream = torch.tensor(list(_token_stream(texts, cfg.seed, tokenizer, need)), dtype=torch.long)
    if stream.numel() < cfg.seqlen:
        raise ValueError(
            f"calibration dataset {cfg.dataset} has only {stream.numel()} tokens, "
            f"fewer than seqlen {cfg.seqlen}"
        )
    if stream.numel() >= need:
        return stream[:need].view(cfg.nsamples, cfg.seqlen)
    g = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, stream.numel() - cfg.seqlen + 1, (cfg.nsamples,), generator=g)
    return torch.stack([stream[s : s + cfg.seqlen] for s in starts.tolist()])
