"""Turning an ``Example`` into prompt token ids and demonstration token ids.

Three templates:

- ``tokenizer``: the tokenizer's own chat template over the prompt messages, with a generation prompt.
- ``llama_base``: the base-model template of the paper's Llama-3.1-8B runs,
  "Question:\\n{question}\\nAnswer:\\nLet's think step by step.", where the question is the last user
  message with the boxed-answer instruction appended on a new line.
- ``raw``: the message contents joined by blank lines, no template at all.

System prompt: HPT drops the dataset's system message (``system_prompt="drop"``); with the tokenizer
template, ``default_system_prompt`` (Qwen's math prompt unless overridden; ``None`` for none) then takes
its place, if the chat template renders system messages at all. ``"keep"`` leaves the messages as they
are. The base and raw templates never insert a default system prompt.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from hpt_megatron.data.schema import Example, Message

TEMPLATES = ("tokenizer", "llama_base", "raw")
SYSTEM_PROMPT_MODES = ("drop", "keep")
QWEN_MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
BOXED_INSTRUCTION = QWEN_MATH_SYSTEM_PROMPT
LLAMA_BASE_TEMPLATE = "Question:\n{question}\nAnswer:\nLet's think step by step."

_SYSTEM_PROBE = "hpt-system-probe-7f3a"


def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"data.{name}={value!r} is not valid; use one of {', '.join(valid)}")


def select_messages(
    messages: Sequence[Message], *, system_prompt: str, default_system_prompt: str | None
) -> list[Message]:
    """Apply the system-prompt policy: drop the dataset's system messages (adding the default) or keep."""
    _check_choice("system_prompt", system_prompt, SYSTEM_PROMPT_MODES)
    if system_prompt == "keep":
        return list(messages)
    kept = [m for m in messages if m.role != "system"]
    if default_system_prompt:
        kept.insert(0, Message(role="system", content=default_system_prompt))
    return kept


def render_llama_base(question: str, *, boxed_instruction: str | None = BOXED_INSTRUCTION) -> str:
    """The paper's Llama-3.1 base template, the boxed-answer instruction appended to the question."""
    if boxed_instruction:
        question = f"{question}\n{boxed_instruction}"
    return LLAMA_BASE_TEMPLATE.format(question=question)


def template_renders_system(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template shows a system message (some templates reject or drop it)."""
    probe = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates signal "no system role" by raising arbitrary jinja errors
        return False
    return _SYSTEM_PROBE in text


class PromptBuilder:
    """Renders and tokenizes prompts and demonstrations for one tokenizer and one template choice."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        template: str = "tokenizer",
        system_prompt: str = "drop",
        default_system_prompt: str | None = QWEN_MATH_SYSTEM_PROMPT,
        boxed_instruction: str | None = BOXED_INSTRUCTION,
    ):
        _check_choice("template", template, TEMPLATES)
        _check_choice("system_prompt", system_prompt, SYSTEM_PROMPT_MODES)
        if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "data.template='tokenizer' but the tokenizer has no chat_template; use "
                "data.template=llama_base or raw, or a tokenizer that ships a chat template"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; demonstrations must end with one")
        if template == "llama_base" and system_prompt == "keep":
            warnings.warn(
                "data.system_prompt='keep' has no effect with data.template='llama_base': that "
                "template only shows the question",
                stacklevel=2,
            )
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.boxed_instruction = boxed_instruction
        self.default_system_prompt = default_system_prompt
        if template != "tokenizer" or not template_renders_system(tokenizer):
            self.default_system_prompt = None

    def render(self, example: Example) -> str:
        """The prompt text the model sees, ending where the response starts."""
        if self.template == "llama_base":
            return render_llama_base(example.question, boxed_instruction=self.boxed_instruction)
        messages = select_messages(
            example.messages,
            system_prompt=self.system_prompt,
            default_system_prompt=self.default_system_prompt,
        )
        if self.template == "raw":
            return "\n\n".join(m.content for m in messages)
        return self.tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
        )

    def encode_prompts(self, examples: Sequence[Example]) -> list[list[int]]:
        """Prompt token ids. A chat template writes its own special tokens, so none are added then;
        the base and raw templates get the tokenizer's usual ones (e.g. Llama's BOS)."""
        return self.encode_texts([self.render(e) for e in examples])

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of already rendered prompts (see ``encode_prompts``)."""
        if not texts:
            return []
        add_special = self.template != "tokenizer"
        return list(self.tokenizer(list(texts), add_special_tokens=add_special)["input_ids"])

    def encode_demonstration(self, text: str, *, max_response_len: int) -> tuple[list[int], bool]:
        """Demonstration ids + EOS, truncated to ``max_response_len``; returns (ids, was_truncated)."""
        if max_response_len < 1:
            raise ValueError(f"data.max_response_len={max_response_len} must be at least 1")
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(self.tokenizer.eos_token_id)
        return ids[:max_response_len], len(ids) > max_response_len
