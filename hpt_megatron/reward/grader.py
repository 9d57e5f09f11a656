"""Binary reward of one response: extract the final answer, then grade it as math or multiple choice.

``grade`` runs in the calling process with no time bound; it is for trusted or already-capped text and
for tests. Rollouts from a policy go through ``hpt_megatron.reward.pool.Verifier``, which runs this same
function in worker processes under a hard per-item deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpt_megatron.reward.choice import choice_equal, choice_label, is_letter_ground_truth
from hpt_megatron.reward.extract import extract_answer
from hpt_megatron.reward.math_equiv import math_equal


@dataclass(frozen=True)
class GradeConfig:
    """Knobs of the verifier.

    answer_fallback: without a box, grade the X of the last "the answer is X" (the official reward does
        not: a response without a box scores 0).
    choice_by_letter: grade as multiple choice whenever the ground truth is a single letter A-J, not only
        for the data sources in ``choice_data_sources``.
    choice_data_sources: a data_source containing one of these substrings is graded as multiple choice.
    max_response_chars: only the last this many characters of a response are searched for the answer.
    max_answer_chars: a longer extracted math answer scores 0 without being parsed.
    rel_tol: relative tolerance when both answers are plain numbers.
    """

    answer_fallback: bool = False
    choice_by_letter: bool = False
    choice_data_sources: tuple[str, ...] = ("arc_c", "gpqa")
    max_response_chars: int = 65_536
    max_answer_chars: int = 1_000
    rel_tol: float = 1e-6

    def __post_init__(self) -> None:
        if self.max_response_chars <= 0 or self.max_answer_chars <= 0:
            raise ValueError(
                "GradeConfig: max_response_chars and max_answer_chars must be positive, got "
                f"{self.max_response_chars} and {self.max_answer_chars}"
            )
        if not 0 <= self.rel_tol < 1:
            raise ValueError(f"GradeConfig: rel_tol must be in [0, 1), got {self.rel_tol}")


@dataclass(frozen=True)
class ScoreResult:
    """reward is 1.0 or 0.0; extracted is the graded answer (None: nothing found); error says why an
    item could not be graded (it then scores 0)."""

    reward: float
    extracted: str | None
    timed_out: bool = False
    error: str | None = None


def is_choice_item(ground_truth: str, data_source: str | None, config: GradeConfig) -> bool:
    """Multiple choice by data source, or by a single-letter ground truth when ``choice_by_letter``."""
    source = (data_source or "").lower()
    if any(tag in source for tag in config.choice_data_sources):
        return True
    return config.choice_by_letter and is_letter_ground_truth(ground_truth)


def check_item(response: object, ground_truth: object, data_source: object, config: GradeConfig) -> None:
    """Reject malformed items (a caller's mistake) before grading, with the field and the fix."""
    for name, value in (("response", response), ("ground_truth", ground_truth)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__}: {value!r:.80}")
    if data_source is not None and not isinstance(data_source, str):
        raise ValueError(f"data_source must be a string or None, got {type(data_source).__name__}")
    if not ground_truth.strip():
        raise ValueError("ground_truth is empty; every item needs a reference answer")
    if is_choice_item(ground_truth, data_source, config) and choice_label(ground_truth) is None:
        raise ValueError(
            f"ground_truth {ground_truth!r:.80} of multiple-choice data_source {data_source!r} is not an "
            "option label (A-J or 1-9); fix the data or the data_source"
        )


def grade(
    response: str, ground_truth: str, data_source: str | None = None, config: GradeConfig | None = None
) -> ScoreResult:
    """Reward 1.0 iff the last boxed answer of ``response`` matches ``ground_truth``, in this process."""
    config = config or GradeConfig()
    check_item(response, ground_truth, data_source, config)
    answer = extract_answer(response[-config.max_response_chars :], fallback=config.answer_fallback)
    if answer is None:
        return ScoreResult(0.0, None)
    if is_choice_item(ground_truth, data_source, config):
        # Label matching is a linear regex, so an option quoted in full (GPQA has 1,000+ char DNA
        # sequences) needs no length cap.
        return ScoreResult(1.0 if choice_equal(answer, ground_truth) else 0.0, answer)
    if len(answer) > config.max_answer_chars:
        return ScoreResult(0.0, None, error=f"answer longer than {config.max_answer_chars} chars")
    return ScoreResult(1.0 if math_equal(answer, ground_truth, config.rel_tol) else 0.0, answer)
