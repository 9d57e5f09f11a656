"""The HPT/LUFFY row schema, typed, and the validation of one raw row.

A row (a parquet row or a JSONL object) has these fields:

    data_source   str                       which benchmark or corpus the row comes from
    prompt        [{role, content}, ...]    chat messages; the last one is the user's question
    target        [{role: assistant, content}]  the demonstration (optional for evaluation files)
    reward_model  {ground_truth: str, style?: str}
    extra_info    {...}                     optional, carried along untouched

``parse_row`` turns one raw row into an ``Example`` or raises ``BadRow``, which names the field, what is
wrong, and how to fix it; the loader adds the file and row to the message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Example:
    """One validated prompt: what the trainer and the evaluator consume."""

    uid: str
    data_source: str
    messages: tuple[Message, ...]
    demonstration: str | None
    ground_truth: str
    extra: dict[str, Any] = field(default_factory=dict)
    location: str = ""  # where the row came from, for messages: "train.parquet row 17"

    @property
    def question(self) -> str:
        """The content of the last user message (what base-model templates wrap)."""
        return self.messages[-1].content


class BadRow(ValueError):
    """A row that breaks the schema.

    The message names the field, the problem, the offending detail and the fix; ``reason`` leaves out the
    detail and message indices, so skipped rows can be counted per kind of problem.
    """

    def __init__(self, field_name: str | None, problem: str, fix: str, *, detail: str = ""):
        self.field_name = field_name
        generic_field = re.sub(r"\[\d+\]", "[i]", field_name) if field_name else None
        self.reason = f"field '{generic_field}' {problem}" if generic_field else problem
        subject = f"field '{field_name}' " if field_name else ""
        detail = f" ({detail})" if detail else ""
        super().__init__(f"{subject}{problem}{detail}; {fix}")


def _got(value: Any) -> str:
    return f"got {'null' if value is None else type(value).__name__}"


def _parse_message(value: Any, where: str) -> Message:
    if not isinstance(value, Mapping):
        raise BadRow(
            where,
            "must be a {role, content} message",
            "store each message as {'role': ..., 'content': ...}",
            detail=_got(value),
        )
    role, content = value.get("role"), value.get("content")
    if role not in ROLES:
        raise BadRow(
            f"{where}.role",
            f"must be one of {', '.join(ROLES)}",
            "use the standard chat roles",
            detail=f"got {role!r}",
        )
    if not isinstance(content, str):
        raise BadRow(
            f"{where}.content", "must be a string", "store the message text as a string", detail=_got(content)
        )
    return Message(role=role, content=content)


def _is_list(value: Any) -> bool:
    return isinstance(value, list | tuple)


def parse_prompt(value: Any) -> tuple[Message, ...]:
    """Validate the ``prompt`` field: a non-empty list of messages ending with a user turn."""
    if value is None:
        raise BadRow("prompt", "is missing", "every row needs a prompt (a list of chat messages)")
    if not _is_list(value):
        raise BadRow(
            "prompt",
            "must be a list of {role, content} messages",
            "store the question as [{'role': 'user', 'content': ...}]",
            detail=_got(value),
        )
    messages = tuple(_parse_message(m, f"prompt[{i}]") for i, m in enumerate(value))
    if not messages:
        raise BadRow("prompt", "is an empty list", "add at least one user message")
    last = len(messages) - 1
    if messages[last].role != "user":
        raise BadRow(
            f"prompt[{last}].role",
            "must be 'user' in the last message",
            "end the prompt with the user's question",
            detail=f"got {messages[last].role!r}",
        )
    if not messages[last].content.strip():
        raise BadRow(f"prompt[{last}].content", "is empty", "write the question there")
    return messages


def parse_target(value: Any, *, require: bool) -> str | None:
    """Validate ``target``: one assistant message holding the demonstration (empty counts as absent)."""
    if value is None:
        if require:
            raise BadRow("target", "is missing", "training rows need a demonstration (target) here")
        return None
    if not _is_list(value) or len(value) != 1:
        detail = f"got {len(value)} messages" if _is_list(value) else _got(value)
        raise BadRow(
            "target",
            "must be a list with one assistant message",
            "store it as [{'role': 'assistant', 'content': ...}]",
            detail=detail,
        )
    message = _parse_message(value[0], "target[0]")
    if message.role != "assistant":
        raise BadRow(
            "target[0].role",
            "must be 'assistant'",
            "the demonstration is the assistant's turn",
            detail=f"got {message.role!r}",
        )
    if require and not message.content.strip():
        raise BadRow("target[0].content", "is empty", "drop the row or supply a demonstration")
    return message.content if message.content.strip() else None


def parse_ground_truth(value: Any) -> str:
    """Validate ``reward_model.ground_truth``; integers and floats are accepted and stringified."""
    if value is None:
        raise BadRow("reward_model", "is missing", "add {'ground_truth': <answer>, 'style': 'rule'}")
    if not isinstance(value, Mapping):
        raise BadRow(
            "reward_model",
            "must be a struct",
            "store it as {'ground_truth': <answer>, 'style': 'rule'}",
            detail=_got(value),
        )
    truth = value.get("ground_truth")
    if truth is None:
        raise BadRow("reward_model.ground_truth", "is missing", "add the reference answer as a string")
    if isinstance(truth, int | float) and not isinstance(truth, bool):
        truth = str(truth)
    if not isinstance(truth, str):
        raise BadRow(
            "reward_model.ground_truth",
            "must be a string",
            "store the reference answer as a string",
            detail=_got(truth),
        )
    if not truth.strip():
        raise BadRow("reward_model.ground_truth", "is empty", "add the reference answer")
    return truth


def parse_row(
    row: Mapping[str, Any], *, uid: str, require_demonstration: bool, location: str = ""
) -> Example:
    """Turn one raw row into an ``Example``; raises ``BadRow`` naming the first bad field."""
    source = row.get("data_source")
    if not isinstance(source, str):
        raise BadRow(
            "data_source",
            "must be a string",
            "name the corpus or benchmark the row comes from",
            detail=_got(source),
        )
    messages = parse_prompt(row.get("prompt"))
    demonstration = parse_target(row.get("target"), require=require_demonstration)
    truth = parse_ground_truth(row.get("reward_model"))
    extra = row.get("extra_info")
    if extra is not None and not isinstance(extra, Mapping):
        raise BadRow(
            "extra_info",
            "must be a struct or null",
            "store extra fields as a {key: value} struct",
            detail=_got(extra),
        )
    return Example(
        uid=uid,
        data_source=source,
        messages=messages,
        demonstration=demonstration,
        ground_truth=truth,
        extra=dict(extra or {}),
        location=location,
    )


def example_to_row(example: Example, *, split: str | None = None) -> dict[str, Any]:
    """The inverse of ``parse_row``: a raw row in the HPT schema (used to write parquet/JSONL)."""
    extra = dict(example.extra)
    if split is not None:
        extra["split"] = split
    target = None
    if example.demonstration is not None:
        target = [{"role": "assistant", "content": example.demonstration}]
    return {
        "data_source": example.data_source,
        "prompt": [m.as_dict() for m in example.messages],
        "target": target,
        "ability": "math",
        "reward_model": {"ground_truth": example.ground_truth, "style": "rule"},
        "extra_info": extra,
    }
