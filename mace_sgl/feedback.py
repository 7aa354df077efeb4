"""Validation of POST /mace/feedback bodies: plain Python, no SGLang, no I/O.

A body is one JSON object or a non-empty JSON list of them. A list is accepted or
rejected as a whole; the error names the item and the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

FIELDS = {"prompt", "chosen", "rejected", "adapter", "weight"}
ROLES = {"system", "user", "assistant"}
# Adapter names become directory names (STATE/adapters/NAME): a safe set and a bound.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
ADAPTER_NAME_RULE = "use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"


class FeedbackError(ValueError):
    """Bad input: `status` is the HTTP status to answer, the message its reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _bad(where: str, reason: str) -> FeedbackError:
    return FeedbackError(400, f"{where}: {reason}")


def _non_empty_str(item: dict[str, Any], key: str, where: str) -> str:
    if key not in item or item[key] is None:
        raise _bad(where, f"`{key}` is required")
    value = item[key]
    if not isinstance(value, str):
        raise _bad(where, f"`{key}` must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _bad(where, f"`{key}` must not be empty")
    return value


def _prompt(item: dict[str, Any], where: str) -> str | list[dict[str, str]]:
    if isinstance(item.get("prompt"), list):
        messages = item["prompt"]
        if not messages:
            raise _bad(where, "`prompt` as chat messages must not be empty")
        for i, m in enumerate(messages):
            at = f"{where}: prompt[{i}]"
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise FeedbackError(400, f"{at}: a message is an object with `role` and `content`")
            if m["role"] not in ROLES:
                raise FeedbackError(400, f"{at}: role must be one of {sorted(ROLES)}")
            if not isinstance(m["content"], str):
                raise FeedbackError(400, f"{at}: content must be a string")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    return _non_empty_str(item, "prompt", where)


def validate_item(item: Any, where: str, default_adapter: str) -> dict[str, Any]:
    """One feedback object, checked and normalised (adapter and weight filled in)."""
    if not isinstance(item, dict):
        raise _bad(where, f"expected a JSON object, got {type(item).__name__}")
    unknown = sorted(set(item) - FIELDS)
    if unknown:
        raise _bad(where, f"unknown fields {unknown}; allowed: {sorted(FIELDS)}")
    prompt = _prompt(item, where)
    chosen = _non_empty_str(item, "chosen", where)
    rejected = _non_empty_str(item, "rejected", where)
    if chosen == rejected:
        raise _bad(where, "`chosen` and `rejected` must differ")
    adapter = item.get("adapter", default_adapter)
    if adapter is None:
        adapter = default_adapter
    if not isinstance(adapter, str) or not ADAPTER_NAME.match(adapter):
        raise _bad(where, f"`adapter` must be an adapter name: {ADAPTER_NAME_RULE}")
    weight = item.get("weight", 1.0)
    if weight is None:
        weight = 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise _bad(where, "`weight` must be a number")
    if not math.isfinite(weight) or weight <= 0:
        raise _bad(where, "`weight` must be a positive finite number")
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "adapter": adapter,
        "weight": float(weight),
    }


def parse_feedback(
    body: bytes,
    max_bytes: int,
    default_adapter: str,
    count_tokens: Callable[[str | list[dict[str, str]], str], int] | None = None,
    max_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Parse and validate a request body into normalised items, or raise FeedbackError.

    count_tokens(prompt, completion) gives the token length of prompt plus completion
    as the trainer will see it; with max_tokens, longer pairs are rejected.
    """
    if len(body) > max_bytes:
        raise FeedbackError(413, f"body is {len(body)} bytes; the limit is {max_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FeedbackError(400, f"body is not valid UTF-8: {e}") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise FeedbackError(400, f"body is not valid JSON: {e}") from None
    if isinstance(data, list):
        if not data:
            raise FeedbackError(400, "body is an empty list")
        items = [validate_item(x, f"item {i}", default_adapter) for i, x in enumerate(data)]
    else:
        items = [validate_item(data, "body", default_adapter)]
    if count_tokens is not None and max_tokens is not None:
        for i, item in enumerate(items):
            for key in ("chosen", "rejected"):
                n = count_tokens(item["prompt"], item[key])
                if n > max_tokens:
                    raise FeedbackError(
                        400,
                        f"item {i}: prompt + {key} is {n} tokens; the model context is "
                        f"{max_tokens}",
                    )
    return items


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")
