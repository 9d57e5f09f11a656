"""Find the final answer in a model response: the last ``\\boxed{...}`` (or ``\\fbox{...}``).

``\\boxed 5`` (no braces) is accepted. Braces escaped as ``\\{`` and ``\\}`` do not count when matching the
closing brace. An unterminated box (a truncated response) is skipped in favour of an earlier complete one.
"""

from __future__ import annotations

import re

_BOX_COMMAND_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
# An escaped character (\{ and \} included) or a brace; escapes never open or close a group.
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_SPACES_RE = re.compile(r"\s*")
_UNBRACED_RE = re.compile(r"[^\s$]+")
# Plain string scans only: no pattern here can backtrack over a long run of text.
_ANSWER_IS_RE = re.compile(r"answer\s+is", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.\s")


def _closing_braces(text: str) -> dict[int, int]:
    """Map the position of every ``{`` that gets closed to the position of its ``}``, in one pass."""
    closing: dict[int, int] = {}
    open_positions: list[int] = []
    for token in _BRACE_TOKEN_RE.finditer(text):
        if token.group() == "{":
            open_positions.append(token.start())
        elif token.group() == "}" and open_positions:
            closing[open_positions.pop()] = token.start()
    return closing


def _box_content(text: str, end_of_command: int, closing: dict[int, int]) -> str | None:
    """The argument of the box command ending at ``end_of_command``, or None; O(1) unless it succeeds."""
    start = _SPACES_RE.match(text, end_of_command).end()
    if text.startswith("{", start):
        end = closing.get(start)
        return None if end is None else text[start + 1 : end]
    if start == end_of_command:  # \boxed5 is not a box command
        return None
    token = _UNBRACED_RE.match(text, start)  # \boxed 5$ -> 5
    return token.group() if token else None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed``/``\\fbox`` in ``text`` (stripped), or None.

    Linear in ``len(text)``: braces are matched once for the whole text, not once per box.
    """
    commands = list(_BOX_COMMAND_RE.finditer(text))
    if not commands:
        return None
    closing = _closing_braces(text)
    for command in reversed(commands):
        content = _box_content(text, command.end(), closing)
        if content is not None:
            return content.strip()
    return None


def answer_is_fallback(text: str) -> str | None:
    """The X of the last "the answer is X" in ``text``: the rest of that line up to a full stop,
    without ``:`` and ``$`` around it; None if there is no such phrase."""
    phrases = list(_ANSWER_IS_RE.finditer(text))
    if not phrases:
        return None
    line_end = text.find("\n", phrases[-1].end())
    rest = text[phrases[-1].end() : None if line_end < 0 else line_end]
    sentence = _SENTENCE_END_RE.split(rest, maxsplit=1)[0]
    answer = sentence.strip().lstrip(":").strip().rstrip(".").strip("$").strip()
    return answer or None


def extract_answer(text: str, fallback: bool = False) -> str | None:
    """The final answer: the last box; with ``fallback``, else the last "the answer is X"."""
    boxed = last_boxed(text)
    if boxed is not None or not fallback:
        return boxed
    return answer_is_fallback(text)
