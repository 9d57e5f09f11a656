"""Model text is never executed: the only strings sympy evaluates while grading are number literals."""

from __future__ import annotations

import importlib
import re

import pytest
import sympy.parsing.sympy_parser as sympy_parser

from hpt_megatron.reward import grade
from tests.unit.reward_cases import load_rows, response_with

# Number(text) in latex2sympy's parser goes through sympy's eval-based parser with a lexer-checked
# numeric token; sympy renders it as e.g. "Integer (12 )" or "Float ('1.5' )".
NUMBER_LITERAL_RE = re.compile(r"(?:Integer|Float|Rational) \(['\d.\s+\-eE]*\)\s*")

HOSTILE = [
    "__import__('os').system('echo owned')",
    "\\text{__import__('os').system('echo owned')}",
    "(lambda: __import__('os'))()",
    "1+1; import os",
    "eval('1')",
    "x.__class__.__mro__",
    "\\operatorname{exec}(1)",
    "9**9**9",
    "open('/etc/passwd').read()",
]


@pytest.fixture
def evaluated(monkeypatch):
    """Code strings handed to sympy's eval-based parser during the test."""
    # sympy.simplify imports sympy.physics on first use, whose unit tables evaluate constant strings.
    importlib.import_module("sympy.physics.units")
    grade(response_with("x+1"), "y")
    codes: list[str] = []
    real_eval = sympy_parser.eval_expr

    def spy(code, local_dict, global_dict):
        codes.append(code)
        return real_eval(code, local_dict, global_dict)

    monkeypatch.setattr(sympy_parser, "eval_expr", spy)
    return codes


def test_hostile_answers_are_never_evaluated(evaluated):
    for text in HOSTILE:
        for gold in ("6", "x+1", "\\frac{1}{2}"):
            assert grade(response_with(text), gold).reward == 0.0
    unexpected = [code for code in evaluated if not NUMBER_LITERAL_RE.fullmatch(code)]
    assert not unexpected


def test_only_number_literals_are_evaluated_on_benchmark_answers(evaluated):
    rows = load_rows("valid.parquet")[::20]
    for position, row in enumerate(rows):
        other = rows[(position + 1) % len(rows)]["ground_truth"]
        grade(response_with(other), row["ground_truth"], row["data_source"])
    unexpected = [code for code in evaluated if not NUMBER_LITERAL_RE.fullmatch(code)]
    assert evaluated and not unexpected
