"""Evaluation tasks: where their data lives, how a row becomes a prompt, how an answer is read.

Three kinds of task:

- ``perplexity``: a text (WikiText-2 test, or any .txt/.raw file or ``text`` rows), scored by
  sliding-window perplexity.
- ``choice``: LLM-Adapters commonsense rows ``{"instruction", "output", "answer"}`` whose
  instruction ends with ``Answer format: a/b/...`` (boolq, piqa, social_i_qa, hellaswag,
  winogrande, ARC-Easy, ARC-Challenge, openbookqa). Scored by ranking the answers'
  log-likelihood and by generating a reply and reading the first answer label in it (the
  LLM-Adapters protocol).
- ``gsm8k``: math word problems ``{"question", "answer"}`` (GSM8K's ``#### 18`` or a plain
  number) or LLM-Adapters math rows ``{"instruction", "answer"}``; scored by generating and taking
  the last number of the reply.

A task is named on the command line as ``name`` (found under ``data_root`` in the layout of
``../shared/data/datasets``: ``llm-adapters/dataset/<name>/test.json``,
``wikitext-2-raw/wiki.test.raw``, ``gsm8k/test.jsonl``) or ``name=path`` for any file or hub dataset
(test split); the kind of an unknown name is told from its data.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from projq_train.data.calibration import load_rows
from projq_train.data.prompts import alpaca_prompt, chat_prompt

Kind = Literal["perplexity", "choice", "gsm8k"]
COMMONSENSE = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"
)  # fmt: skip
DEFAULT_FILES: dict[str, tuple[Kind, str]] = {
    "wikitext2": ("perplexity", "wikitext-2-raw/wiki.test.raw"),
    "gsm8k": ("gsm8k", "gsm8k/test.jsonl"),
    **{name: ("choice", f"llm-adapters/dataset/{name}/test.json") for name in COMMONSENSE},
}
DATA_ROOT = os.environ.get("PROJQ_DATA_ROOT", "data")  # where task names find their data
TEXT_SUFFIXES = (".txt", ".raw")
ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Task:
    name: str
    kind: Kind
    source: str  # a local file or a hub dataset name


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: the prompt, the text that precedes the answer label in the
    training target (``"the correct answer is"``), the labels, and the index of the right one."""

    prompt: str
    answer_prefix: str
    labels: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class MathItem:
    prompt: str
    answer: float


def check_task_name(spec: str) -> None:
    """Refuse a bare task name that is not a known task (``name=path`` is always accepted)."""
    name, _, source = spec.partition("=")
    if not source and name.lower() not in {k.lower() for k in DEFAULT_FILES}:
        raise ValueError(
            f"unknown task {name!r}: known tasks are {sorted(DEFAULT_FILES)}; "
            "give any other data as name=path"
        )


def resolve_task(spec: str, data_root: str | Path) -> Task:
    """A task from ``name`` (a known task, found under ``data_root``) or ``name=path``."""
    check_task_name(spec)
    name, _, source = spec.partition("=")
    known = {k.lower(): k for k in DEFAULT_FILES}
    if not source:
        name = known[name.lower()]
        kind, rel = DEFAULT_FILES[name]
        path = Path(data_root) / rel
        if not path.is_file():
            raise FileNotFoundError(
                f"task {name}: {path} does not exist; set --data_root to the folder holding "
                f"{rel}, or give the file as {name}=path"
            )
        return Task(name, kind, str(path))
    if name.lower() in known:
        return Task(known[name.lower()], DEFAULT_FILES[known[name.lower()]][0], source)
    if Path(source).suffix in TEXT_SUFFIXES:
        return Task(name, "perplexity", source)
    first = load_rows(source, "test")[:1]
    kind = detect_kind(first[0] if first else None, source)
    return Task(name, kind, source)


def detect_kind(row, source: str) -> Kind:
    """The kind of task a dataset is, from its first row."""
    if isinstance(row, str) or (isinstance(row, dict) and set(row) == {"text"}):
        return "perplexity"
    if isinstance(row, dict) and "instruction" in row and ANSWER_FORMAT.search(row["instruction"]):
        return "choice"
    if isinstance(row, dict) and ("question" in row or "instruction" in row) and "answer" in row:
        return "gsm8k"
    raise ValueError(
        f"{source}: cannot tell the task kind from the first row {str(row)[:200]!r}: expected text, "
        "commonsense rows (instruction with 'Answer format: a/b', output, answer) or math rows "
        "(question or instruction, answer)"
    )


def load_text(task: Task) -> str:
    """The text of a perplexity task: a text file as is, or rows' ``text`` joined by blank lines."""
    if Path(task.source).suffix in TEXT_SUFFIXES:
        path = Path(task.source)
        if not path.is_file():
            raise FileNotFoundError(f"task {task.name}: {path} does not exist")
        return path.read_text()
    rows = load_rows(task.source, "test")
    texts = []
    for i, row in enumerate(rows):
        if not isinstance(row, (str, dict)) or (isinstance(row, dict) and "text" not in row):
            raise ValueError(f"{task.source}, row {i}: a perplexity task needs a 'text' field")
        texts.append(row if isinstance(row, str) else row["text"])
    return "\n\n".join(texts)


def render_prompt(instruction: str, template: str, tokenizer, input: str = "") -> str:
    """The prompt as the fine-tuned model saw it (``alpaca`` text or the tokenizer's ``chat`` template)."""
    if template == "chat":
        return chat_prompt(tokenizer, instruction, input)
    return alpaca_prompt(instruction, input)


def choice_item(row: dict, template: str, tokenizer, where: str) -> ChoiceItem:
    """A commonsense row as a question: labels from ``Answer format: a/b/c``, the gold label from
    ``answer`` and the text before the label from ``output`` (``"the correct answer is true"``)."""
    missing = [k for k in ("instruction", "answer") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing} needed by a multiple-choice task")
    found = ANSWER_FORMAT.search(row["instruction"])
    if not found:
        raise ValueError(f"{where}: the instruction has no 'Answer format: a/b/...' line naming the choices")
    labels = tuple(found.group(1).split("/"))
    answer = str(row["answer"]).strip()
    if answer not in labels:
        raise ValueError(f"{where}: the answer {answer!r} is not one of the choices {labels}")
    output = str(row.get("output", ""))
    prefix = output[: output.rfind(answer)] if answer in output else "the correct answer is "
    prompt = render_prompt(row["instruction"], template, tokenizer, row.get("input") or "")
    return ChoiceItem(prompt, prefix, labels, labels.index(answer))


def read_choice(reply: str, labels: tuple[str, ...]) -> int | None:
    """The first answer label in a generated reply (LLM-Adapters' rule), as an index; ``None`` if
    there is none. Longer labels win where one contains another (``answer1`` vs ``answer10``)."""
    pattern = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    found = re.search(pattern, reply.lower())
    return labels.index(found.group(0)) if found else None


def gold_number(answer) -> float:
    """The reference answer of a math row: GSM8K's text after ``####`` or a plain number."""
    text = str(answer).split("####")[-1].replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"the answer {str(answer)[-80:]!r} does not end in a number") from None


def math_item(row: dict, template: str, tokenizer, where: str) -> MathItem:
    question = row.get("question", row.get("instruction"))
    if question is None or "answer" not in row:
        raise ValueError(f"{where}: a math row needs 'question' (or 'instruction') and 'answer'")
    try:
        answer = gold_number(row["answer"])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return MathItem(render_prompt(question, template, tokenizer), answer)


def read_number(reply: str) -> float | None:
    """The last number in a reply (commas dropped), as LLM-Adapters reads math answers."""
    found = NUMBER.findall(reply.replace(",", ""))
    return float(found[-1]) if found else None


def number_matches(predicted: float | None, gold: float) -> bool:
    return predicted is not None and math.isclose(predicted, gold, rel_tol=0, abs_tol=1e-4)


def load_items(task: Task, template: str, tokenizer, limit: int | None) -> list[ChoiceItem] | list[MathItem]:
    """The first ``limit`` rows of a choice or gsm8k task as items; every row used is checked."""
    rows = load_rows(task.source, "test")[:limit]
    if not rows:
        raise ValueError(f"task {task.name}: {task.source} has no rows")
    make = choice_item if task.kind == "choice" else math_item
    items = []
    for i, row in enumerate(rows):
        where = f"{task.source}, row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with fields, got {type(row).__name__}")
        items.append(make(row, template, tokenizer, where))
    return items
