"""String normalisation of final answers and exact parsing of plain numbers.

Two forms of an answer are used by the grader:

- ``normalize_answer``: LaTeX with presentation noise removed (``\\left``, ``\\text{}``, units, degrees,
  ``\\dfrac``, thousands separators, ...). Spaces are kept (collapsed) so it can still be parsed.
- ``canonical_answer``: the normalised form with all whitespace removed, for string comparison.

``parse_number`` reads integers, decimals, scientific notation and percentages into a ``Decimal``
without evaluating anything, so huge exponents such as ``1e999999999`` cost nothing.
"""

from __future__ import annotations

import decimal
import re
from dataclasses import dataclass

# Commands whose argument is kept and whose name is dropped: \text{cm} -> cm.
_TEXT_COMMANDS = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mathit", "mbox", "operatorname")
_TEXT_RE = re.compile(r"\\(?:" + "|".join(_TEXT_COMMANDS) + r")\s*\{([^{}]*)\}")
# A backslash pair \\ (matrix row break) is not a spacing command.
_THOUSANDS_SPACE_RE = re.compile(r"(?<!\\),\\!\s*")  # 10,\!080 and 11,\! 111 are thousands separators
_SPACING_RE = re.compile(r"(?<!\\)\\[!,;:> ]|\\q?quad(?![a-zA-Z])|~|\\displaystyle(?![a-zA-Z])")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])")
_UNIT_WORDS = frozenset((
    "degrees", "degree", "deg", "radians", "units", "unit", "sq", "square", "cubic", "inches", "inch",
    "in", "feet", "foot", "ft", "yards", "yd", "miles", "mi", "mph", "meters", "meter", "m",
    "centimeters", "cm", "millimeters", "mm", "kilometers", "km", "seconds", "second", "sec", "s",
    "minutes", "minute", "min", "hours", "hour", "hr", "days", "day", "dollars", "dollar", "cents",
    "cent", "grams", "gram", "g", "kg", "pounds", "lbs", "lb", "liters", "liter", "l", "ml",
))  # fmt: skip
# A trailing word, optionally squared or cubed, not part of a LaTeX command.
_TRAILING_WORD_RE = re.compile(r"(?<![a-zA-Z\\])([a-zA-Z]+)(?:\s*\^\s*\{?[23]\}?)?$")
_FRAC_ALIAS_RE = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_LETTER_IN_PARENS_RE = re.compile(r"^\(([A-Za-z])\)$")
_BARE_FUNCTION_RE = re.compile(
    r"(?<![\\a-zA-Z])(arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|exp|ln|log|sqrt)\("
)
_SCI_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\w.])")
_DANGLING_POINT_RE = re.compile(r"(?<=\d)\.(?!\d)")


def unwrap_text_commands(s: str) -> str:
    """``\\text{cm}`` -> ``cm``, innermost first, for every command in ``_TEXT_COMMANDS``."""
    previous = None
    while previous != s:
        previous, s = s, _TEXT_RE.sub(r"\1", s)
    return s


def _strip_units(s: str) -> str:
    """Drop trailing unit words: after a number any unit, after a bracket only words of 3+ letters."""
    while (m := _TRAILING_WORD_RE.search(s)) and m.group(1) in _UNIT_WORDS:
        head = s[: m.start()].rstrip()
        if not head or not (head[-1].isdigit() or (len(m.group(1)) > 2 and head[-1] in "})")):
            break
        s = head
    return s


def normalize_answer(answer: str) -> str:
    """Remove presentation-only LaTeX from a final answer; the result still parses as LaTeX."""
    s = answer.strip().replace("\\$", "").replace("$", "")
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _FRAC_ALIAS_RE.sub(r"\\frac", s)
    s = _THOUSANDS_SPACE_RE.sub(",", s)
    s = _SPACING_RE.sub(" ", s)
    s = unwrap_text_commands(s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "%").replace("np.", "")
    s = _BARE_FUNCTION_RE.sub(r"\\\1(", s)
    s = " ".join(s.split()).rstrip(".").strip()
    s = _strip_units(s)
    s = _DANGLING_POINT_RE.sub("", s)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    letter = _LETTER_IN_PARENS_RE.match(s)
    return letter.group(1) if letter else s


def canonical_answer(answer: str) -> str:
    """Normalised answer without whitespace, for exact string comparison."""
    return "".join(normalize_answer(answer).split())


def scientific_to_latex(answer: str) -> str:
    """``4.5e33`` -> ``4.5\\times10^{33}``; LaTeX parsers read ``e`` as Euler's number otherwise."""
    return _SCI_RE.sub(r"\1\\times10^{\2}", answer)


@dataclass(frozen=True)
class Number:
    value: decimal.Decimal
    percent: bool
    decimal_point: bool  # written with a fractional part, so possibly rounded


_EXP = r"[+-]?\d+"
_NUMBER_RE = re.compile(
    rf"^(?P<sign>[+-]?)"
    rf"(?:(?P<mantissa>\d+(?:\.\d*)?|\.\d+)(?:[eE](?P<exp1>{_EXP})|(?:\\times|\\cdot|\*|×)10\^\{{?(?P<exp2>{_EXP})\}}?)?"
    rf"|10\^\{{?(?P<exp3>{_EXP})\}}?)"
    rf"(?P<percent>%)?$"
)
# Exact for any answer under max_answer_chars; a wide exponent range keeps 1e999999999 from overflowing.
_DECIMAL_CONTEXT = decimal.Context(prec=2_000, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


def parse_number(answer: str) -> Number | None:
    """A plain real number (``-12``, ``.5``, ``4.5e33``, ``3\\times10^{8}``, ``10^{-3}``, ``62.5%``), else None."""
    m = _NUMBER_RE.match("".join(answer.split()).replace("{,}", ""))
    if m is None:
        return None
    mantissa = m.group("mantissa") or "1"
    exponent = m.group("exp1") or m.group("exp2") or m.group("exp3") or "0"
    value = _DECIMAL_CONTEXT.create_decimal(f"{m.group('sign')}{mantissa}E{exponent}")
    return Number(value, m.group("percent") is not None, "." in mantissa)


def _close(a: decimal.Decimal, b: decimal.Decimal, rel_tol: float) -> bool:
    diff = _DECIMAL_CONTEXT.abs(_DECIMAL_CONTEXT.subtract(a, b))
    scale = _DECIMAL_CONTEXT.max_mag(a, b).copy_abs()
    return diff <= _DECIMAL_CONTEXT.multiply(scale, decimal.Decimal(repr(rel_tol)))


def numbers_equal(pred: Number, gold: Number, rel_tol: float) -> bool:
    """Equal within ``rel_tol`` if either is written with a decimal point, else exactly (1002001 is not
    1002002); ``62.5%`` also matches ``62.5`` and ``0.625``."""
    if not (pred.decimal_point or gold.decimal_point):
        rel_tol = 0.0
    if _close(pred.value, gold.value, rel_tol):
        return True
    if pred.percent == gold.percent:
        return False
    hundred = decimal.Decimal(100)
    as_fraction = [_DECIMAL_CONTEXT.divide(n.value, hundred) if n.percent else n.value for n in (pred, gold)]
    return _close(as_fraction[0], as_fraction[1], rel_tol)
