"""Prompt templates: how an instruction row becomes the text the model reads."""

from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for an instruction and optional input (the response follows it)."""
    if input and input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def check_chat_template(tokenizer) -> None:
    """Raise a clear error if the tokenizer cannot render chat messages."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; use `template: alpaca` for this model")


def chat_prompt(tokenizer, instruction: str, input: str = "") -> str:
    """The tokenizer's chat template applied to one user turn (instruction, then the input after a
    blank line), ending where the assistant's reply starts. The text already holds any BOS token."""
    check_chat_template(tokenizer)
    content = f"{instruction}\n\n{input}" if input and input.strip() else instruction
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
