"""The synthetic task's tokenizer: exact round trips, Hugging Face loading, the chat template."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from hpt_megatron.data import tokenizer as task_tokenizer
from hpt_megatron.data.synthetic import Difficulty, generate_problems
from hpt_megatron.data.templates import QWEN_MATH_SYSTEM_PROMPT, PromptBuilder, render_llama_base


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    task_tokenizer.main(["--out", str(out)])
    return out


@pytest.fixture(scope="module")
def hf(saved):
    return AutoTokenizer.from_pretrained(saved)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(
        300, split="train", seed=0, difficulty=Difficulty(operations=("add", "sub", "mul"))
    )


def test_files_are_hugging_face_format(saved):
    assert {p.name for p in saved.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["chat_template"] == task_tokenizer.CHAT_TEMPLATE
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|pad|>"


def test_round_trip_of_task_texts(hf, problems):
    for problem in problems:
        for text in (problem.question(), problem.demonstration()):
            ids = hf(text, add_special_tokens=False)["input_ids"]
            assert hf.unk_token_id not in ids
            assert hf.decode(ids) == text


def test_task_words_are_single_tokens_and_digits_are_split(hf, problems):
    vocab = hf.get_vocab()
    for problem in problems[:50]:
        tokens = hf.convert_ids_to_tokens(hf(problem.question(), add_special_tokens=False)["input_ids"])
        assert all(len(t.strip()) == 1 or t in vocab for t in tokens)
        assert all(t.strip().isalpha() for t in tokens if len(t.strip()) > 1)  # words only, never "12"
    assert hf.convert_ids_to_tokens(hf("\\boxed{105}", add_special_tokens=False)["input_ids"]) == [
        "\\",
        "boxed",
        "{",
        "1",
        "0",
        "5",
        "}",
    ]


def test_any_ascii_text_round_trips(hf):
    rng = random.Random(0)
    alphabet = "".join(sorted(set(task_tokenizer.string.printable)))
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
    for text in ("Thomas hash have  haveN", QWEN_MATH_SYSTEM_PROMPT, render_llama_base("Tom has 3 pens.")):
        assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_and_prompt_lengths(hf, problems):
    problem = problems[0]
    messages = [
        {"role": "user", "content": problem.question()},
        {"role": "assistant", "content": problem.demonstration()},
    ]
    text = hf.apply_chat_template(messages, tokenize=False)
    assert text == (
        f"<|im_start|>user\n{problem.question()}<|im_end|>\n"
        f"<|im_start|>assistant\n{problem.demonstration()}<|im_end|>\n"
    )
    prompt = hf.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    # The prompt + demonstration + EOS tokens are exactly the tokens of the full chat turn.
    builder = PromptBuilder(hf, default_system_prompt=None)
    prompt_ids = hf(prompt, add_special_tokens=False)["input_ids"]
    demo_ids, _ = builder.encode_demonstration(problem.demonstration(), max_response_len=100)
    assert (
        prompt_ids + demo_ids + hf("\n", add_special_tokens=False)["input_ids"]
        == hf(text, add_special_tokens=False)["input_ids"]
    )


def test_sequences_stay_short(hf):
    problems = generate_problems(500, split="train", seed=1)
    builder = PromptBuilder(hf, default_system_prompt=None)
    prompts = [
        hf.apply_chat_template(
            [{"role": "user", "content": p.question()}], tokenize=False, add_generation_prompt=True
        )
        for p in problems
    ]
    prompt_lengths = [len(hf(t, add_special_tokens=False)["input_ids"]) for t in prompts]
    demo_lengths = [
        len(builder.encode_demonstration(p.demonstration(), max_response_len=999)[0]) for p in problems
    ]
    assert max(prompt_lengths) <= 48 and max(demo_lengths) <= 40
    assert len(hf) == task_tokenizer.build_tokenizer().get_vocab_size() < 256


def test_vocabulary_is_stable():
    assert task_tokenizer.build_vocab() == task_tokenizer.build_vocab()
    vocab = task_tokenizer.build_vocab()
    assert [vocab[t] for t in task_tokenizer.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]


def test_a_random_policy_cannot_stumble_on_a_rewarded_answer(hf):
    # The reward reads the last \boxed{...}; writing one costs at least five specific tokens, so a policy
    # spreading its probability over the vocabulary hits a given answer at a given position with chance
    # below len(vocab) ** -5 - over a whole 40-token response, far below one in a billion.
    for answer in range(0, 101):
        tokens = hf.convert_ids_to_tokens(hf(f"\\boxed{{{answer}}}", add_special_tokens=False)["input_ids"])
        assert len(tokens) >= 5 and tokens[:3] == ["\\", "boxed", "{"]
    assert 40 * len(hf) ** -5 < 1e-9
