"""Grading against the public benchmarks' ground truths, and equivalences that are mathematical facts."""

from __future__ import annotations

import re

import pytest

from hpt_megatron.reward import GradeConfig, grade
from tests.unit.reward_cases import load_rows, response_with

INTEGER_RE = re.compile(r"-?\d+")
DECIMAL_RE = re.compile(r"-?(?:\d+\.\d*|\.\d+|\d+(?:\.\d*)?e[+-]?\d+)", re.IGNORECASE)


def report(label: str, failures: list, total: int) -> float:
    print(f"\n{label}: {total - len(failures)}/{total} as expected; exceptions:")
    for failure in failures:
        print("  ", failure)
    return 1 - len(failures) / max(total, 1)


def unique_items(rows: list[dict]) -> list[tuple[str, str]]:
    return sorted({(row["data_source"], row["ground_truth"]) for row in rows})


def plain(answer: str) -> str:
    return answer.replace("$", "").replace(" ", "")


def wrong_answer(gold: str, position: int, golds: list[str]) -> str | None:
    """An answer that is not the gold: an integer plus one, a decimal doubled, or a far-away other gold."""
    bare = gold.strip().strip("$")
    if INTEGER_RE.fullmatch(bare):
        return str(int(bare) + 1)
    if DECIMAL_RE.fullmatch(bare):
        value = float(bare)
        return repr(value * 2 if value else 1.0)
    other = golds[(position + len(golds) // 2) % len(golds)]
    return None if plain(other) == plain(gold) else other


def test_every_gold_answer_is_graded_correct():
    rows = load_rows("valid.all.parquet")
    failures = []
    for row in rows:
        result = grade(response_with(row["ground_truth"]), row["ground_truth"], row["data_source"])
        if result.reward != 1.0:
            failures.append((row["data_source"], row["ground_truth"], result))
    assert report("gold answers of valid.all.parquet", failures, len(rows)) >= 0.99


def test_wrong_answers_are_graded_incorrect():
    items = unique_items(load_rows("valid.all.parquet"))
    golds = [gold for _, gold in items]
    failures, total = [], 0
    for position, (source, gold) in enumerate(items):
        wrong = wrong_answer(gold, position, golds)
        if wrong is None:
            continue
        total += 1
        if grade(response_with(wrong), gold, source).reward != 0.0:
            failures.append((source, gold, wrong))
    assert report("wrong answers against valid.all.parquet", failures, total) >= 0.99


def option_texts(question: str) -> dict[str, str]:
    """Option label -> text, from lines such as ``C) Planetary days will become shorter.``"""
    return dict(re.findall(r"^([A-J1-9])\) ?(.*)$", question, flags=re.MULTILINE))


@pytest.mark.parametrize("name", ["valid.arc_c.parquet", "valid.gpqa.parquet"])
def test_multiple_choice_gold_label_correct_and_other_labels_wrong(name):
    rows = load_rows(name)
    failures, total = [], 0
    for row in rows:
        gold, source = row["ground_truth"], row["data_source"]
        options = option_texts(row["question"])
        assert gold in options, f"{name}: ground truth {gold} is not among the options {sorted(options)}"
        for label, text in options.items():
            expected = 1.0 if label == gold else 0.0
            for answer in (label, f"({label})", f"{label}. {text}", f"\\text{{{label}}}"):
                total += 1
                if grade(response_with(answer), gold, source).reward != expected:
                    failures.append((name, gold, answer))
    assert report(f"option answers of {name}", failures, total) == 1.0


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac12"),
        ("90", "90^\\circ"),
        ("10080", "10,\\!080"),
        ("864", "864 \\mbox{ inches}^2"),
        ("5", "x=5"),
        ("-2, 1", "1,-2"),
        ("0.625", "62.5\\%"),
        ("62.5", "62.5%"),
        ("\\frac{9}{5}", "1\\frac{4}{5}"),
        ("4.5 \\times 10^{33}", "4.5e33"),
        ("10^{-8}", "1e-8"),
        ("-\\frac{1}{3}", "-1./3"),
        ("\\arcsin\\left(\\frac{10}{13}\\right)", "np.arcsin(10/13)"),
        ("\\cosh(at)", "\\frac{1}{2}(\\exp{a*t} + \\exp{-a*t})"),
        ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{3}}{3}"),
        ("\\sqrt{20}", "2\\sqrt{5}"),
        ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("3x - 6 + x^3", "x^3+3x-6"),
        (
            "\\begin{pmatrix}-1/3\\\\2/3\\\\5/3\\end{pmatrix}",
            "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
        ),
        ("East", "\\text{east}"),
        ("C", "\\text{(C)}"),
    ],
)
def test_equivalent_forms_are_correct(answer, gold):
    assert grade(response_with(answer), gold).reward == 1.0


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        ("1002002", "1002001"),  # close large integers are still different
        ("3.5e-10", "3.89e-10"),  # tiny numbers are not rounded to zero
        ("0", "1e-8"),
        ("(4, 2)", "(2, 4)"),  # ordered pairs
        ("[3, 4]", "(3, 4]"),  # interval ends
        ("6.25\\%", "62.5%"),
        ("x^3+3x+6", "x^3+3x-6"),
        ("west", "\\text{east}"),
        ("nylevE", "\\text{Evelyn}"),  # words are not products of commuting symbols
        ("0.3333", "\\frac{1}{3}"),
        ("D", "\\text{(C)}"),
    ],
)
def test_different_values_are_wrong(answer, gold):
    assert grade(response_with(answer), gold).reward == 0.0


@pytest.mark.parametrize(
    ("answer", "as_choice", "as_math"),
    [
        ("B", 1.0, 1.0),
        ("B. 10^{-4} eV", 1.0, 0.0),
        ("Option B", 1.0, 0.0),
        ("C", 0.0, 0.0),
        ("B and C", 0.0, 0.0),
    ],
)
def test_choice_routing_by_letter_is_opt_in(answer, as_choice, as_math):
    by_letter = GradeConfig(choice_by_letter=True)
    assert grade(response_with(answer), "B", "mmlu", config=by_letter).reward == as_choice
    assert grade(response_with(answer), "B", "mmlu").reward == as_math


def test_malformed_items_name_the_field():
    with pytest.raises(ValueError, match="ground_truth must be a string"):
        grade("\\boxed{1}", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ground_truth is empty"):
        grade("\\boxed{1}", "  ")
    with pytest.raises(ValueError, match="not an option label"):
        grade("\\boxed{A}", "Paris", "arc_c")


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="max_answer_chars"):
        GradeConfig(max_answer_chars=0)
    with pytest.raises(ValueError, match="rel_tol"):
        GradeConfig(rel_tol=2.0)
