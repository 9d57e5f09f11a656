"""Data: HPT-schema datasets, schema checks, prompt templates, the sampler, the synthetic task.

Layout: ``schema`` (the row schema and its validation), ``datasets`` (parquet/JSONL reading with a bad-row
policy), ``templates`` (system prompt handling and the chat / base / raw templates), ``prompt_dataset``
(validated, templated, length-filtered prompts), ``sampler`` (resumable batches of prompts),
``synthetic`` and ``tokenizer`` (the embedded arithmetic task and its tokenizer).
"""

from hpt_megatron.data.datasets import LoadReport, load_examples, write_rows
from hpt_megatron.data.prompt_dataset import DataReport, PromptDataset, PromptItem, build_prompt_dataset
from hpt_megatron.data.sampler import PromptSampler
from hpt_megatron.data.schema import Example, Message
from hpt_megatron.data.templates import (
    BOXED_INSTRUCTION,
    QWEN_MATH_SYSTEM_PROMPT,
    SYSTEM_PROMPT_MODES,
    TEMPLATES,
    PromptBuilder,
)

__all__ = [
    "BOXED_INSTRUCTION",
    "QWEN_MATH_SYSTEM_PROMPT",
    "SYSTEM_PROMPT_MODES",
    "TEMPLATES",
    "DataReport",
    "Example",
    "LoadReport",
    "Message",
    "PromptBuilder",
    "PromptDataset",
    "PromptItem",
    "PromptSampler",
    "build_prompt_dataset",
    "load_examples",
    "write_rows",
]
