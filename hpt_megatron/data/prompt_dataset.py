"""A loaded, validated, templated and length-filtered set of prompts: what the trainer samples from.

Prompts are tokenized up front (they are short and the length filter needs them); demonstrations are
tokenized on demand, because most prompts of an HPT run never need theirs (only prompts the policy
fails on get an SFT row) and long reasoning traces would otherwise dominate memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpt_megatron.data.datasets import LoadReport, check_policy, load_examples
from hpt_megatron.data.schema import Example
from hpt_megatron.data.templates import BOXED_INSTRUCTION, QWEN_MATH_SYSTEM_PROMPT, PromptBuilder

logger = logging.getLogger(__name__)

LONG_PROMPT_POLICIES = ("skip", "error")


@dataclass(frozen=True)
class PromptItem:
    index: int
    example: Example
    prompt_ids: list[int]


@dataclass
class DataReport:
    """Loading report plus what templating and filtering did."""

    load: LoadReport
    too_long_prompts: int = 0
    max_prompt_tokens: int = 0
    truncated_demonstrations: set[int] = field(default_factory=set)

    def summary(self) -> str:
        return (
            f"{self.load.summary()}\n  prompts over max_prompt_len skipped: {self.too_long_prompts}; "
            f"longest kept prompt: {self.max_prompt_tokens} tokens; demonstrations truncated so far: "
            f"{len(self.truncated_demonstrations)}"
        )


def filter_long_prompts(
    examples: Sequence[Example],
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_prompt_len: int,
    on_long_prompt: str,
) -> tuple[list[int], int]:
    """Indices of prompts within ``max_prompt_len`` tokens, and how many were over (skip policy)."""
    check_policy("on_long_prompt", on_long_prompt, LONG_PROMPT_POLICIES)
    if max_prompt_len < 1:
        raise ValueError(f"data.max_prompt_len={max_prompt_len} must be at least 1")
    keep = []
    for i, ids in enumerate(prompt_ids):
        if len(ids) <= max_prompt_len:
            keep.append(i)
        elif on_long_prompt == "error":
            raise ValueError(
                f"{examples[i].location}: field 'prompt' is {len(ids)} tokens after the template, "
                f"over data.max_prompt_len={max_prompt_len}; raise data.max_prompt_len or set "
                "data.on_long_prompt=skip"
            )
    return keep, len(prompt_ids) - len(keep)


class PromptDataset(Sequence[PromptItem]):
    """Examples with their prompt token ids; ``demonstration_ids(i)`` tokenizes a demonstration."""

    def __init__(
        self,
        examples: Sequence[Example],
        prompt_ids: Sequence[Sequence[int]],
        *,
        builder: PromptBuilder,
        max_response_len: int,
        report: DataReport,
    ):
        assert len(examples) == len(prompt_ids)
        self.examples = list(examples)
        self._prompt_ids = [np.asarray(ids, dtype=np.int32) for ids in prompt_ids]
        self.builder = builder
        self.max_response_len = max_response_len
        self.report = report

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PromptItem:  # type: ignore[override]
        return PromptItem(
            index=index, example=self.examples[index], prompt_ids=self._prompt_ids[index].tolist()
        )

    def batch(self, indices: Iterable[int]) -> list[PromptItem]:
        return [self[i] for i in indices]

    def demonstration_ids(self, index: int) -> list[int]:
        """The demonstration + EOS, truncated to max_response_len; ValueError if the row has none."""
        example = self.examples[index]
        if example.demonstration is None:
            raise ValueError(
                f"{example.location}: field 'target' is missing, but this prompt needs its "
                "demonstration; load training data with require_demonstration=True"
            )
        ids, truncated = self.builder.encode_demonstration(
            example.demonstration, max_response_len=self.max_response_len
        )
        if truncated:
            self.report.truncated_demonstrations.add(index)
        return ids


def build_prompt_dataset(
    files: str | Path | Iterable[str | Path],
    *,
    tokenizer: Any,
    on_bad_row: str = "error",
    require_demonstration: bool = False,
    template: str = "tokenizer",
    system_prompt: str = "drop",
    default_system_prompt: str | None = QWEN_MATH_SYSTEM_PROMPT,
    boxed_instruction: str | None = BOXED_INSTRUCTION,
    max_prompt_len: int = 1024,
    on_long_prompt: str = "skip",
    max_response_len: int = 8192,
) -> PromptDataset:
    """Load ``files``, validate every row, render and tokenize prompts, drop (or reject) long ones."""
    check_policy("on_long_prompt", on_long_prompt, LONG_PROMPT_POLICIES)
    for name, value in (("max_prompt_len", max_prompt_len), ("max_response_len", max_response_len)):
        if value < 1:
            raise ValueError(f"data.{name}={value} must be at least 1")
    builder = PromptBuilder(
        tokenizer,
        template=template,
        system_prompt=system_prompt,
        default_system_prompt=default_system_prompt,
        boxed_instruction=boxed_instruction,
    )
    examples, load_report = load_examples(
        files, on_bad_row=on_bad_row, require_demonstration=require_demonstration
    )
    prompt_ids = builder.encode_prompts(examples)
    keep, too_long = filter_long_prompts(
        examples, prompt_ids, max_prompt_len=max_prompt_len, on_long_prompt=on_long_prompt
    )
    report = DataReport(
        load=load_report,
        too_long_prompts=too_long,
        max_prompt_tokens=max((len(prompt_ids[i]) for i in keep), default=0),
    )
    if not keep:
        raise ValueError(
            f"no prompts left from {files} after validation and the length filter:\n{report.summary()}"
        )
    dataset = PromptDataset(
        [examples[i] for i in keep],
        [prompt_ids[i] for i in keep],
        builder=builder,
        max_response_len=max_response_len,
        report=report,
    )
    logger.info("prompt data: %s", report.summary())
    return dataset
