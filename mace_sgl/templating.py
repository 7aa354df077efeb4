"""How a feedback prompt and completion become token ids: one rule for the route's length
check and for the trainer."""

from __future__ import annotations

from typing import Any


def encode_pair(
    tokenizer: Any, prompt: str | list[dict[str, str]], completion: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as the served model sees them.

    A chat prompt goes through the tokenizer's chat template with the generation prompt,
    exactly as /v1/chat/completions renders it; a string prompt is tokenized as
    /generate does. The completion ends with EOS, since a served answer ends there too.
    """
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt)["input_ids"]
    else:
        prompt_ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    return list(prompt_ids), list(completion_ids)
