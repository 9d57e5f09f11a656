"""Final-answer extraction: the last box wins, nested and escaped braces, \\fbox, fallback, linear time."""

from __future__ import annotations

import time

import pytest

from hpt_megatron.reward import GradeConfig, extract_answer, grade, last_boxed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{\\frac{a}{b^{2}}}} done", "\\sqrt{\\frac{a}{b^{2}}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("\\fbox{7}", "7"),
        ("\\boxed{3} and later \\fbox{4}", "4"),
        ("so $\\boxed 5$.", "5"),
        ("\\boxed {  12 }", "12"),
        ("\\boxed{1} and a truncated \\boxed{2", "1"),  # an unterminated last box is not an answer
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text", ["no box here", "\\boxed", "\\boxedfoo{1}", "\\boxed{unterminated"])
def test_no_box_means_no_answer_and_zero_reward(text):
    assert last_boxed(text) is None
    result = grade(text, "1")
    assert result.reward == 0.0 and result.extracted is None


def test_answer_is_fallback_is_off_by_default():
    text = "Adding the two parts, the answer is $42$. That settles it."
    assert extract_answer(text) is None
    assert grade(text, "42").reward == 0.0
    assert extract_answer(text, fallback=True) == "42"
    assert grade(text, "42", config=GradeConfig(answer_fallback=True)).reward == 1.0


def test_box_takes_precedence_over_the_fallback():
    text = "The answer is 3. On reflection, \\boxed{4}"
    assert extract_answer(text, fallback=True) == "4"


def test_fallback_takes_the_last_phrase_up_to_the_sentence_end():
    text = "I thought the answer is 1.\nCorrection: the final answer is: \\frac{3}{4}. Done."
    assert extract_answer(text, fallback=True) == "\\frac{3}{4}"


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 50_000,  # every box unterminated
        "{" * 60_000 + "\\boxed{1}",
        "\\boxed{}" * 40_000,
        "the answer is x" + " " * 60_000 + "y",
    ],
)
def test_extraction_is_fast_on_adversarial_text(text):
    start = time.perf_counter()
    extract_answer(text, fallback=True)
    assert time.perf_counter() - start < 2.0


def test_only_the_tail_of_a_long_response_is_searched():
    config = GradeConfig(max_response_chars=100)
    text = "\\boxed{1}" + "x" * 200
    assert grade(text, "1").reward == 1.0
    assert grade(text, "1", config=config).extracted is None


def test_overlong_answer_scores_zero_without_parsing():
    config = GradeConfig(max_answer_chars=10)
    result = grade("\\boxed{" + "1+" * 20 + "1}", "21", config=config)
    assert result.reward == 0.0 and result.error is not None and "10" in result.error
