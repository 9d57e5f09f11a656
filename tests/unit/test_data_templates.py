"""Prompt building: system prompt drop/keep, the three templates, demonstrations, length filtering."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from hpt_megatron.data.datasets import load_examples, write_rows
from hpt_megatron.data.prompt_dataset import build_prompt_dataset
from hpt_megatron.data.schema import Example, Message
from hpt_megatron.data.templates import QWEN_MATH_SYSTEM_PROMPT, PromptBuilder, select_messages
from hpt_megatron.data.tokenizer import save_tokenizer

# A chat template that, like some real ones, has no place for a system message and drops it.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(save_tokenizer(tmp_path_factory.mktemp("tok")))


def example(
    question="Tom has 7 apples. How many apples does Tom have now?",
    system="You are a bot.",
    demonstration="7\n\\boxed{7}",
):
    messages = (
        (Message("system", system), Message("user", question)) if system else (Message("user", question),)
    )
    return Example(
        uid="t:0",
        data_source="toy",
        messages=messages,
        demonstration=demonstration,
        ground_truth="7",
        location="t.parquet row 0",
    )


def test_select_messages_drop_and_keep():
    messages = example().messages
    assert select_messages(messages, system_prompt="keep", default_system_prompt="X") == list(messages)
    dropped = select_messages(messages, system_prompt="drop", default_system_prompt=None)
    assert dropped == [messages[1]]
    replaced = select_messages(messages, system_prompt="drop", default_system_prompt=QWEN_MATH_SYSTEM_PROMPT)
    assert replaced == [Message("system", QWEN_MATH_SYSTEM_PROMPT), messages[1]]
    with pytest.raises(ValueError, match="system_prompt='off' is not valid; use one of drop, keep"):
        select_messages(messages, system_prompt="off", default_system_prompt=None)


def test_tokenizer_template_drop_uses_the_default_math_system_prompt(tokenizer):
    question = example().question
    text = PromptBuilder(tokenizer).render(example())
    assert text == (
        f"<|im_start|>system\n{QWEN_MATH_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{question}"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    bare = PromptBuilder(tokenizer, default_system_prompt=None).render(example())
    assert bare == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    kept = PromptBuilder(tokenizer, system_prompt="keep").render(example())
    assert (
        kept.startswith("<|im_start|>system\nYou are a bot.<|im_end|>\n")
        and QWEN_MATH_SYSTEM_PROMPT not in kept
    )


def test_default_system_prompt_only_where_the_template_shows_one(tokenizer):
    tokenizer.chat_template, saved = NO_SYSTEM_TEMPLATE, tokenizer.chat_template
    try:
        builder = PromptBuilder(tokenizer)
        assert builder.default_system_prompt is None
        assert QWEN_MATH_SYSTEM_PROMPT not in builder.render(example())
    finally:
        tokenizer.chat_template = saved


def test_llama_base_template_text_is_exact(tokenizer):
    text = PromptBuilder(tokenizer, template="llama_base").render(example(question="What is 2+3?"))
    assert text == (
        "Question:\nWhat is 2+3?\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.\nAnswer:\nLet's think step by step."
    )
    plain = PromptBuilder(tokenizer, template="llama_base", boxed_instruction=None).render(
        example(question="Q")
    )
    assert plain == "Question:\nQ\nAnswer:\nLet's think step by step."
    with pytest.warns(UserWarning, match="system_prompt='keep' has no effect"):
        PromptBuilder(tokenizer, template="llama_base", system_prompt="keep")


def test_raw_template(tokenizer):
    assert PromptBuilder(tokenizer, template="raw").render(example(question="Q")) == "Q"
    kept = PromptBuilder(tokenizer, template="raw", system_prompt="keep").render(example(question="Q"))
    assert kept == "You are a bot.\n\nQ"


def test_unknown_template_and_missing_chat_template(tokenizer):
    with pytest.raises(
        ValueError, match="template='chatml' is not valid; use one of tokenizer, llama_base, raw"
    ):
        PromptBuilder(tokenizer, template="chatml")
    tokenizer.chat_template, saved = None, tokenizer.chat_template
    try:
        with pytest.raises(ValueError, match=r"has no chat_template; use data\.template=llama_base or raw"):
            PromptBuilder(tokenizer)
    finally:
        tokenizer.chat_template = saved


def test_prompt_and_demonstration_ids(tokenizer):
    builder = PromptBuilder(tokenizer, default_system_prompt=None)
    [prompt_ids] = builder.encode_prompts([example()])
    assert tokenizer.decode(prompt_ids) == builder.render(example())
    ids, truncated = builder.encode_demonstration("12-3=9\n\\boxed{9}", max_response_len=100)
    assert not truncated and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == "12-3=9\n\\boxed{9}"
    short, truncated = builder.encode_demonstration("12-3=9\n\\boxed{9}", max_response_len=4)
    assert truncated and short == ids[:4]


def test_build_prompt_dataset_filters_long_prompts_and_counts(tokenizer, tmp_path):
    rows = []
    for i in range(6):
        question = "Tom has 7 apples." + " He buys 1 more." * (i * 3) + " How many apples does Tom have now?"
        rows.append(
            {
                "data_source": "toy",
                "prompt": [{"role": "user", "content": question}],
                "target": [{"role": "assistant", "content": f"{i}\n\\boxed{{{i}}}"}],
                "reward_model": {"ground_truth": str(i)},
            }
        )
    path = write_rows(rows, tmp_path / "len.parquet")
    builder = PromptBuilder(tokenizer, default_system_prompt=None)
    lengths = [len(ids) for ids in builder.encode_prompts(load_examples(path)[0])]
    limit = sorted(lengths)[3]  # keeps the four shortest prompts
    kwargs = dict(tokenizer=tokenizer, default_system_prompt=None, max_prompt_len=limit, max_response_len=5)
    dataset = build_prompt_dataset(path, **kwargs)
    assert len(dataset) == 4 and dataset.report.too_long_prompts == 2
    assert dataset.report.max_prompt_tokens == limit
    assert [item.example.uid for item in dataset.batch([0, 3])] == ["len.parquet:0", "len.parquet:3"]
    assert "prompts over max_prompt_len skipped: 2" in dataset.report.summary()
    demo = dataset.demonstration_ids(0)  # "0", "\n", "\\", "boxed", "{", "0", "}", EOS: cut to 5
    assert tokenizer.convert_ids_to_tokens(demo) == ["0", "\n", "\\", "boxed", "{"]
    assert dataset.report.truncated_demonstrations == {0}
    with pytest.raises(
        ValueError,
        match=rf"len\.parquet row 4: field 'prompt' is {lengths[4]} tokens .* "
        rf"over data\.max_prompt_len={limit}",
    ):
        build_prompt_dataset(path, on_long_prompt="error", **kwargs)
