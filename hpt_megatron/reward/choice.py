"""Multiple-choice grading: the ground truth is an option label (``A``-``J``, or ``1``-``9`` as in some ARC rows).

Accepted answers name exactly one label: ``B``, ``(B)``, ``B.``, ``B) text``, ``B. text``, ``(B) text``,
``\\text{B}``, ``Option B``, and a lone lower-case ``b``. ``B and C`` or ``Bob`` name no label.
"""

from __future__ import annotations

import re

from hpt_megatron.reward.normalize import unwrap_text_commands

_LABELS = "A-J1-9"
_PAREN_LABEL_RE = re.compile(rf"^\(([{_LABELS}])\)(?:\s.*)?$", re.DOTALL)
_LABEL_RE = re.compile(rf"^([{_LABELS}])(?:[.:)](?:\s.*)?)?$", re.DOTALL)
_PREFIX_RE = re.compile(
    r"^(?:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is)?\s*:?\s*)", re.IGNORECASE
)
_GROUND_TRUTH_RE = re.compile(r"^[A-J]$")


def choice_label(answer: str) -> str | None:
    """The single option label an answer names, or None."""
    s = unwrap_text_commands(answer.replace("$", "").replace("*", "")).strip()
    s = _PREFIX_RE.sub("", s)
    if re.fullmatch(r"[a-j]", s):
        return s.upper()
    match = _PAREN_LABEL_RE.match(s) or _LABEL_RE.match(s)
    return match.group(1) if match else None


def is_letter_ground_truth(ground_truth: str) -> bool:
    """A single capital letter A-J: used to route items to choice grading when asked to."""
    return _GROUND_TRUTH_RE.match(ground_truth.strip()) is not None


def choice_equal(answer: str, ground_truth: str) -> bool:
    """True iff the answer names the ground-truth label (the ground truth must itself be a label)."""
    gold = choice_label(ground_truth)
    assert gold is not None, f"not an option label: {ground_truth!r}; check_item rejects these"
    return choice_label(answer) == gold
