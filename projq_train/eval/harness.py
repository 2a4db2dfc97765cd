"""Batched scoring of a causal LM on evaluation tasks (see :mod:`projq_train.eval.tasks`).

- :func:`perplexity`: windows of ``seqlen`` tokens every ``stride`` tokens; each window scores only
  the tokens the previous one did not, so with ``stride < seqlen`` every token after the first is
  predicted once, with at least ``seqlen - stride`` tokens of context (side by side windows,
  ``stride = seqlen``, cannot predict their first tokens).
- :func:`choice_logprobs`: ``log p(" label" | prompt + "the correct answer is")`` for each label,
  in one forward pass per question when the labels differ only in their last token (the usual
  case: ``" answer1"`` … ``" answer4"``), else one per label. Batches are padded on the left with
  explicit position ids, and logits are computed only for the scored positions.
- :func:`generate`: greedy decoding of a batch of prompts (left-padded).
- :func:`evaluate`: every task, as ``{task: {metric: value}}``, with torchmetrics accumulators that
  sum across processes when ``rank``/``world_size`` shard the data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm
from transformers import GenerationConfig

from projq_train.eval.tasks import (
    ChoiceItem,
    Task,
    load_items,
    load_text,
    number_matches,
    read_choice,
    read_number,
)
from projq_train.quant.linear import dequantize_once

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
COUNTS = ("n", "tokens")  # result entries that are sizes, not metrics
ChoiceMode = Literal["loglik", "generate", "both"]
# a scoring request: input ids and, per (question, label) it scores, the (position, token) pairs
# whose log-probabilities sum to that label's score; the logits at `position` predict `token`
Request = tuple[list[int], dict[tuple[int, int], list[tuple[int, int]]]]


def _batches(n: int, batch_size: int, lengths: Sequence[int]) -> Iterator[list[int]]:
    """Indices ``0..n-1`` grouped into batches of similar length (longest first)."""
    order = sorted(range(n), key=lambda i: -lengths[i])
    for s in range(0, n, batch_size):
        yield order[s : s + batch_size]


def _pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids``, each ``(B, T)``, padded on the left."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = torch.tensor(s)
        mask[b, T - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _pad_id(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _encode(tokenizer, text: str, template: str) -> list[int]:
    """Prompt tokens as in training: the Alpaca text gets the tokenizer's BOS, chat text has its own."""
    return tokenizer(text, add_special_tokens=template != "chat")["input_ids"]


def perplexity_windows(n_tokens: int, seqlen: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` per window: tokens ``[begin, end)`` are read and the last ``scored``
    of them are predicted (never the text's first token)."""
    if not 0 < stride <= seqlen:
        raise ValueError(f"the perplexity stride must be in [1, seqlen={seqlen}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seqlen, n_tokens)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            windows.append((begin, end, scored))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: Tensor,
    seqlen: int,
    stride: int,
    batch_size: int,
    max_windows: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict[str, float]:
    """Sliding-window perplexity of the token stream ``ids (N,)``; see the module docstring."""
    device = next(model.parameters()).device
    windows = perplexity_windows(ids.numel(), seqlen, stride)[:max_windows][rank::world_size]
    metric = Perplexity(ignore_index=IGNORE_INDEX).to(device)
    scored = torch.zeros((), device=device)
    for batch in tqdm(
        list(_batches(len(windows), batch_size, [e - b for b, e, _ in windows])),
        desc="perplexity",
        disable=not progress,
    ):
        T = max(windows[i][1] - windows[i][0] for i in batch)
        x = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        for b, i in enumerate(batch):
            begin, end, n = windows[i]
            x[b, : end - begin] = ids[begin:end]
            mask[b, : end - begin] = 1
            labels[b, end - begin - n : end - begin] = ids[end - n : end]
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        metric.update(logits[:, :-1].float(), labels[:, 1:].to(device))
        scored += (labels[:, 1:] != IGNORE_INDEX).sum().to(device)
    if world_size > 1:
        torch.distributed.all_reduce(scored)
    return {"perplexity": metric.compute().item(), "tokens": int(scored.item())}


def choice_requests(item: ChoiceItem, q: int, tokenizer, template: str) -> list[Request]:
    """The scoring requests of question ``q``: the context is the prompt plus the answer prefix
    without its trailing space, each continuation is ``" " + label``: the tokens the whole text
    has after the context's (tokenized on its own where the whole text splits differently)."""
    context = item.prompt + item.answer_prefix.rstrip()
    ctx = _encode(tokenizer, context, template)
    sep = " " if item.answer_prefix != item.answer_prefix.rstrip() else ""
    conts = []
    for label in item.labels:
        whole = _encode(tokenizer, context + sep + label, template)
        alone = whole[len(ctx) :] if whole[: len(ctx)] == ctx and len(whole) > len(ctx) else None
        conts.append(alone or tokenizer(sep + label, add_special_tokens=False)["input_ids"])
    common = 0
    while all(len(c) > common + 1 for c in conts) and len({c[common] for c in conts}) == 1:
        common += 1
    if all(len(c) == common + 1 for c in conts):  # one forward pass scores every label
        ids = ctx + conts[0][:common]
        shared = [(len(ctx) - 1 + j, conts[0][j]) for j in range(common)]
        return [(ids, {(q, k): shared + [(len(ids) - 1, c[-1])] for k, c in enumerate(conts)})]
    return [
        (ctx + c[:-1], {(q, k): [(len(ctx) - 1 + j, t) for j, t in enumerate(c)]})
        for k, c in enumerate(conts)
    ]


@torch.no_grad()
def choice_logprobs(
    model: nn.Module,
    tokenizer,
    items: list[ChoiceItem],
    template: str,
    batch_size: int,
    progress: bool = False,
) -> list[list[float]]:
    """``log p(label | question)`` for every label of every question (see the module docstring)."""
    device = next(model.parameters()).device
    requests = [r for q, item in enumerate(items) for r in choice_requests(item, q, tokenizer, template)]
    scores = [[0.0] * len(item.labels) for item in items]
    for batch in tqdm(
        list(_batches(len(requests), batch_size, [len(r[0]) for r in requests])),
        desc="choices (loglik)",
        disable=not progress,
    ):
        seqs = [requests[i][0] for i in batch]
        ids, mask, positions = _pad_left(seqs, _pad_id(tokenizer), device)
        T = ids.shape[1]
        keep = max(
            len(s) - p
            for s, i in zip(seqs, batch, strict=True)
            for t in requests[i][1].values()
            for p, _ in t
        )
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, keep, V): positions T - keep .. T - 1
        for b, i in enumerate(batch):
            shift = T - len(seqs[b]) - (T - keep)  # sequence position p is row p + shift of logp
            for (q, k), targets in requests[i][1].items():
                scores[q][k] = sum(logp[b, p + shift, t].item() for p, t in targets)
    return scores


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    template: str,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy replies (special tokens dropped) to ``prompts``, in order. Prompt and reply stay
    within the model's maximum length (``max_position_embeddings``): a longer prompt keeps its
    end (the question), and a reply is cut where the length runs out."""
    device = next(model.parameters()).device
    max_length = getattr(model.config, "max_position_embeddings", None) or float("inf")
    encoded = [_encode(tokenizer, p, template) for p in prompts]
    encoded = [e[-(max_length - 1) :] if len(e) >= max_length else e for e in encoded]
    pad_id = _pad_id(tokenizer)
    replies = [""] * len(prompts)
    for batch in tqdm(
        list(_batches(len(encoded), batch_size, [len(e) for e in encoded])), desc=desc, disable=not progress
    ):
        ids, mask, _ = _pad_left([encoded[i] for i in batch], pad_id, device)
        config = GenerationConfig(
            max_new_tokens=min(max_new_tokens, max_length - ids.shape[1]),
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for b, i in enumerate(batch):
            replies[i] = tokenizer.decode(out[b, ids.shape[1] :], skip_special_tokens=True)
    return replies


def _mean(values: list[float], device) -> float:
    """The mean over all processes (torchmetrics sums the value and the count across ranks)."""
    metric = MeanMetric().to(device)
    if values:
        metric.update(torch.tensor(values, dtype=torch.float64, device=device))
    else:  # a rank without items still joins the sum
        metric.update(torch.zeros(1, dtype=torch.float64, device=device), weight=0.0)
    return metric.compute().item()


def _choice_metrics(model, tokenizer, items, template, mode, new_tokens, batch_size, show, name):
    device, out = next(model.parameters()).device, {}
    if mode in ("loglik", "both"):
        scores = choice_logprobs(model, tokenizer, items, template, batch_size, show)
        best = [max(range(len(s)), key=s.__getitem__) for s in scores]
        out["acc_loglik"] = _mean([float(b == it.gold) for b, it in zip(best, items, strict=True)], device)
    if mode in ("generate", "both"):
        prompts = [it.prompt for it in items]
        replies = generate(model, tokenizer, prompts, template, new_tokens, batch_size, show, name)
        picked = [read_choice(r, it.labels) for r, it in zip(replies, items, strict=True)]
        out["acc_generate"] = _mean(
            [float(p == it.gold) for p, it in zip(picked, items, strict=True)], device
        )
        out["unparsed"] = _mean([float(p is None) for p in picked], device)
    return out


def _math_metrics(model, tokenizer, items, template, new_tokens, batch_size, show, name):
    device = next(model.parameters()).device
    prompts = [it.prompt for it in items]
    numbers = [
        read_number(r)
        for r in generate(model, tokenizer, prompts, template, new_tokens, batch_size, show, name)
    ]
    hits = [float(number_matches(x, it.answer)) for x, it in zip(numbers, items, strict=True)]
    return {"accuracy": _mean(hits, device), "unparsed": _mean([float(x is None) for x in numbers], device)}


@dataclass(frozen=True)
class EvalSettings:
    """How :func:`evaluate` scores the tasks (the options of ``projq-train eval`` and ``report``
    and of the :class:`~projq_train.eval.callback.TaskEval` callback)."""

    limit: int | None = None
    """Only the first rows of each choice/math task and the first windows of each text."""
    choice_mode: ChoiceMode = "loglik"
    """Multiple choice by answer log-likelihood (fast), by generation, or both."""
    seqlen: int | None = None
    """Perplexity window length (default: the model's context, at most 2048 tokens)."""
    stride: int | None = None
    """Perplexity window step (default ``seqlen // 2``)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    choice_new_tokens: int = 32
    """Generated tokens per multiple-choice reply."""
    math_new_tokens: int = 256
    """Generated tokens per math reply."""


def evaluate(
    model: nn.Module,
    tokenizer,
    tasks: list[Task],
    template: Literal["alpaca", "chat"] = "alpaca",
    settings: EvalSettings = EvalSettings(),
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics of ``model`` on every task, scored as ``settings`` say. With ``world_size > 1``
    each rank scores its share of the items and every rank returns the totals.

    Per kind: perplexity → ``perplexity``, ``tokens``; choice → ``acc_loglik`` and/or
    ``acc_generate`` (``unparsed``: the share of replies naming no label), ``n``;
    gsm8k → ``accuracy``, ``unparsed``, ``n``."""
    was_training = model.training
    model.eval()
    show = progress and rank == 0
    results: dict[str, dict[str, float]] = {}
    s = settings
    # on CPU the packed layers have no fused kernel: unpack each weight once, not on every batch
    on_cpu = next(model.parameters()).device.type == "cpu"
    try:
        with dequantize_once(model) if on_cpu else nullcontext():
            for task in tasks:
                log.info("evaluating %s (%s, %s)", task.name, task.kind, task.source)
                if task.kind == "perplexity":
                    ids = torch.tensor(tokenizer(load_text(task), add_special_tokens=False)["input_ids"])
                    window = s.seqlen or min(2048, getattr(model.config, "max_position_embeddings", 2048))
                    step = s.stride or max(1, window // 2)
                    args = (window, step, s.batch_size, s.limit, rank, world_size, show)
                    results[task.name] = perplexity(model, ids, *args)
                    continue
                items = load_items(task, template, tokenizer, s.limit)
                mine, name = items[rank::world_size], f"{task.name} (generate)"
                if task.kind == "choice":
                    args = (s.choice_mode, s.choice_new_tokens, s.batch_size, show, name)
                    out = _choice_metrics(model, tokenizer, mine, template, *args)
                else:
                    args = (s.math_new_tokens, s.batch_size, show, name)
                    out = _math_metrics(model, tokenizer, mine, template, *args)
                results[task.name] = out | {"n": len(items)}
    finally:
        model.train(was_training)
    return results
