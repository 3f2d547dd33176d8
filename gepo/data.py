"""Prompt data: where questions and gold answers come from, and the one prompt format."""

from __future__ import annotations

from typing import Any


def format_prompt(tokenizer: Any, question: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt for `question`: the tokenizer's chat template when it has one, else a plain format.

    This is the only place a prompt is built, so learner, samplers and evaluation always agree on it.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = f"{system_prompt}\n\n" if system_prompt else ""
    text += f"Question: {question}\nAnswer:"
    return list(tokenizer(text)["input_ids"])
