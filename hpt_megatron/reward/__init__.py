"""Binary math / multiple-choice reward: the last boxed answer checked against the ground truth.

``grade`` scores one response in-process; ``Verifier`` scores batches of untrusted responses in worker
processes under a hard per-item timeout. ``python -m hpt_megatron.reward`` scores a jsonl file and
``python -m hpt_megatron.reward.bench`` measures throughput.
"""

from hpt_megatron.reward.extract import extract_answer, last_boxed
from hpt_megatron.reward.grader import GradeConfig, ScoreResult, grade
from hpt_megatron.reward.math_equiv import math_equal
from hpt_megatron.reward.pool import RewardItem, Verifier, VerifierStats

__all__ = [
    "GradeConfig",
    "RewardItem",
    "ScoreResult",
    "Verifier",
    "VerifierStats",
    "extract_answer",
    "grade",
    "last_boxed",
    "math_equal",
]
