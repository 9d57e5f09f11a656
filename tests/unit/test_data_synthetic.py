"""The synthetic arithmetic task: determinism, disjoint splits, correct demonstrations, the file path."""

from __future__ import annotations

import re

import pyarrow.parquet as pq
import pytest

from hpt_megatron.data import synthetic
from hpt_megatron.data.datasets import load_examples
from hpt_megatron.data.synthetic import Difficulty, generate_problems

# An independent reading of the question text: which words mean which operation.
WORD_OPS = {
    "buys": "+",
    "finds": "+",
    "gets": "+",
    "gives": "-",
    "loses": "-",
    "sells": "-",
    "multiplies": "*",
}
ANSWER_RE = re.compile(r"\\boxed\{(\d+)\}$")


def solve_from_text(question: str) -> tuple[int, list[tuple[str, int]]]:
    """Recompute the answer from the words of the question alone."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    value = int(re.search(r"has (\d+) ", sentences[0]).group(1))
    steps = []
    for sentence in sentences[1:-1]:
        verb = next(w for w in sentence.split() if w in WORD_OPS)
        operand = int(re.search(r"(\d+)", sentence).group(1))
        steps.append((WORD_OPS[verb], operand))
        value = {"+": value + operand, "-": value - operand, "*": value * operand}[WORD_OPS[verb]]
    return value, steps


def check_demonstration(question: str, demonstration: str, ground_truth: str) -> None:
    answer, steps = solve_from_text(question)
    *equations, last = demonstration.split("\n")
    assert ANSWER_RE.fullmatch(last) and int(ANSWER_RE.fullmatch(last).group(1)) == answer == int(
        ground_truth
    )
    assert len(equations) == len(steps)
    previous = int(re.search(r"has (\d+) ", question).group(1))
    for line, (op, operand) in zip(equations, steps):
        left, right = line.split("=")
        a, b = left.split(op)
        assert (int(a), int(b)) == (previous, operand), line
        assert int(right) == eval(left), line  # the arithmetic of each line is right
        previous = int(right)


def test_generation_is_deterministic():
    a = generate_problems(200, split="train", seed=5)
    assert a == generate_problems(200, split="train", seed=5)
    assert a != generate_problems(200, split="train", seed=6)
    # One split's size never changes the other split.
    assert generate_problems(50, split="val", seed=5) == generate_problems(80, split="val", seed=5)[:50]


def test_splits_are_disjoint_across_seeds():
    train = generate_problems(3000, split="train", seed=0) + generate_problems(3000, split="train", seed=1)
    val = generate_problems(300, split="val", seed=0) + generate_problems(300, split="val", seed=9)
    assert not {p.question() for p in train} & {p.question() for p in val}
    assert not {p.signature() for p in train} & {p.signature() for p in val}


@pytest.mark.parametrize(
    "difficulty",
    [
        Difficulty(),
        Difficulty(operations=("add", "sub", "mul"), max_steps=4),
        Difficulty(min_steps=1, max_steps=1, max_operand=3),
    ],
)
def test_every_demonstration_is_arithmetically_right(difficulty):
    for problem in generate_problems(500, split="train", seed=2, difficulty=difficulty):
        assert difficulty.min_steps <= len(problem.steps) <= difficulty.max_steps
        check_demonstration(problem.question(), problem.demonstration(), str(problem.answer))
        assert all(0 <= v <= difficulty.max_value for v in problem.values())


def test_operations_are_balanced():
    problems = generate_problems(
        1000, split="train", seed=0, difficulty=Difficulty(operations=("add", "sub"))
    )
    ops = [op for p in problems for op, _ in p.steps]
    assert 0.4 < ops.count("add") / len(ops) < 0.6


def test_cli_writes_the_hpt_schema_and_loads(tmp_path):
    synthetic.main(["--out", str(tmp_path), "--train", "300", "--val", "40", "--seed", "3"])
    train, report = load_examples(tmp_path / "train.parquet", require_demonstration=True)
    val, _ = load_examples(tmp_path / "val.parquet", require_demonstration=True)
    assert (len(train), len(val)) == (300, 40) and report.by_source == {"synthetic_arith": 300}
    for example in train + val:
        assert [m.role for m in example.messages] == ["user"]
        check_demonstration(example.question, example.demonstration, example.ground_truth)
    assert not {e.question for e in train} & {e.question for e in val}
    names = pq.read_schema(tmp_path / "train.parquet").names
    assert {"data_source", "prompt", "target", "reward_model", "extra_info"} <= set(names)


def test_impossible_requests_are_named(tmp_path):
    tiny = Difficulty(min_steps=1, max_steps=1, max_start=2, max_operand=1, max_value=3)
    with pytest.raises(ValueError, match=r"found only .* distinct val problems"):
        generate_problems(100, split="val", seed=0, difficulty=tiny)
    with pytest.raises(ValueError, match=r"operations=.*subset of add, sub, mul"):
        Difficulty(operations=("div",))
    with pytest.raises(ValueError, match="split='test'"):
        generate_problems(1, split="test", seed=0)
