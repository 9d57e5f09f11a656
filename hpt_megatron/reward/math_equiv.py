"""Mathematical equivalence of a predicted final answer and a ground truth.

Decided by the first stage that applies:

1. normalised strings are identical (``\\dfrac{1}{2}`` vs ``\\frac12`` is not decided here, ``90^\\circ`` vs
   ``90`` is);
2. both are words (``\\text{east}``): case-insensitive string equality and nothing else, because a LaTeX
   parser reads ``Evelyn`` as a product of commuting symbols;
3. both are plain numbers (``4.5e33``, ``62.5%``): exact decimal comparison within ``rel_tol``; math-verify
   would round floats to 6 places and call ``3e-10`` equal to ``4e-10``;
4. math-verify: LaTeX parsed by latex2sympy's grammar (nothing is ``eval``-ed), then numeric and
   symbolic sympy comparison, sets, intervals, matrices and equations.

No stage bounds its own running time: untrusted input must be graded through
``hpt_megatron.reward.pool.Verifier``, which kills a worker process that overruns its deadline.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from math_verify import LatexExtractionConfig, parse, verify

from hpt_megatron.reward.normalize import (
    canonical_answer,
    normalize_answer,
    numbers_equal,
    parse_number,
    scientific_to_latex,
)

# Only the LaTeX extractor: math-verify's plain-expression extractor goes through sympy's parse_expr,
# which evaluates Python code.
_LATEX_ONLY = (LatexExtractionConfig(boxed_match_priority=0),)
_WORD_RE = re.compile(r"^[A-Za-z]{3,}$")

# Deadlines are enforced by killing worker processes, so math-verify's SIGALRM timeouts are turned off;
# this silences its one-time warning about that, and its per-item parse-failure chatter.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _parse_latex(answer: str) -> tuple:
    latex = scientific_to_latex(normalize_answer(answer))
    return tuple(parse("\\boxed{" + latex + "}", extraction_config=_LATEX_ONLY, parsing_timeout=None))


# Ground truths repeat (n rollouts per prompt); parsing one is about half the cost of a comparison.
_parse_ground_truth = lru_cache(maxsize=4096)(_parse_latex)


def math_verify_equal(answer: str, ground_truth: str) -> bool:
    """Stage 4 alone: math-verify on the normalised LaTeX of both sides."""
    gold = _parse_ground_truth(ground_truth)
    pred = _parse_latex(answer)
    if not gold or not pred:
        return False
    return verify(list(gold), list(pred), timeout_seconds=None)


def math_equal(answer: str, ground_truth: str, rel_tol: float = 1e-6) -> bool:
    """True iff the extracted ``answer`` is equivalent to ``ground_truth`` (see the module docstring)."""
    pred, gold = canonical_answer(answer), canonical_answer(ground_truth)
    if pred == gold:
        return True
    if _WORD_RE.match(pred) and _WORD_RE.match(gold):
        return pred.lower() == gold.lower()
    pred_number, gold_number = parse_number(pred), parse_number(gold)
    if pred_number is not None and gold_number is not None:
        return numbers_equal(pred_number, gold_number, rel_tol)
    return math_verify_equal(answer, ground_truth)
