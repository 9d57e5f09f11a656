"""The embedded synthetic task: multi-step arithmetic word problems, generated deterministically.

A problem reads like "Tom has 7 apples. He buys 5 more. Then he gives away 3. How many apples does Tom
have now?"; its demonstration writes one equation per step, each starting from the previous result,
and ends with the boxed answer:

    7+5=12
    12-3=9
    \\boxed{9}

Why it is shaped like this: a tiny transformer on a laptop CPU has to learn it within minutes, so the
words come from a small fixed lexicon, sequences are short, and every step only needs the previous
line and one number of the question. And a randomly initialised model must never be rewarded by
chance, so the answer has to be written as backslash, "boxed", "{", the digits and "}" - five or more
specific tokens in a row (see ``tokenizer.py``), which a random policy essentially never emits.

Train and validation splits are disjoint by construction: a problem's arithmetic (start value and
operations) is hashed to decide its split, independently of the seed, so no validation chain of
operations ever appears in any training set, whatever the seeds.

    python -m hpt_megatron.data.synthetic --out DIR --train 20000 --val 500 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpt_megatron.data.datasets import write_rows

DATA_SOURCE = "synthetic_arith"
OPERATIONS = ("add", "sub", "mul")
OPERATOR_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
SPLITS = ("train", "val")
_MAX_MISSES_IN_A_ROW = 20_000

NAMES = (
    ("Tom", "he"),
    ("Ann", "she"),
    ("Ben", "he"),
    ("Mia", "she"),
    ("Sam", "he"),
    ("Eva", "she"),
    ("Leo", "he"),
    ("Zoe", "she"),
)
ITEMS = ("apples", "pens", "cards", "books", "coins", "shells", "stamps", "marbles")
PHRASES = {
    "add": ("buys {n} more", "finds {n} more", "gets {n} more"),
    "sub": ("gives away {n}", "loses {n}", "sells {n}"),
    "mul": ("multiplies them by {n}",),
}
FIXED_WORDS = ("has", "Then", "How", "many", "does", "have", "now", "boxed")


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the generator. Values stay within [0, max_value] at every step.

    The defaults are sized for the CPU demo. Measured with a 2-layer, 128-wide transformer trained by
    SFT on batches of 64 demonstrations (lr 3e-3, greedy decoding on held-out problems): about 60%
    accuracy after 600 steps, 75% after 1000, 93-98% after 1500 - a few minutes on two cores. Values up
    to 50 need roughly twice the steps. Copying numbers into the equations is learned within a few
    hundred steps; the arithmetic facts are what takes the time.
    """

    min_steps: int = 2
    max_steps: int = 3
    max_start: int = 10
    max_operand: int = 9
    max_factor: int = 3
    max_value: int = 20
    operations: tuple[str, ...] = ("add", "sub")

    def __post_init__(self) -> None:
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown or not self.operations:
            raise ValueError(
                f"operations={self.operations!r}: use a non-empty subset of {', '.join(OPERATIONS)}"
            )
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"steps: need 1 <= min_steps ({self.min_steps}) <= max_steps ({self.max_steps})")
        if not 2 <= self.max_start <= self.max_value:
            raise ValueError(
                f"max_start={self.max_start}: need 2 <= max_start <= max_value ({self.max_value})"
            )
        if self.max_operand < 1 or ("mul" in self.operations and self.max_factor < 2):
            raise ValueError("max_operand must be >= 1 and max_factor >= 2 when 'mul' is used")


@dataclass(frozen=True)
class Problem:
    name: str
    pronoun: str
    item: str
    start: int
    steps: tuple[tuple[str, int], ...]  # (operation, operand)
    phrasing: tuple[int, ...]  # which phrase of PHRASES[op] each step uses

    def values(self) -> list[int]:
        """The running value after each step, starting with ``start``."""
        values = [self.start]
        for op, n in self.steps:
            values.append(apply_operation(values[-1], op, n))
        return values

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def question(self) -> str:
        sentences = [f"{self.name} has {self.start} {self.item}."]
        for i, ((op, n), choice) in enumerate(zip(self.steps, self.phrasing)):
            action = PHRASES[op][choice].format(n=n)
            sentences.append(
                f"{self.pronoun.capitalize()} {action}." if i == 0 else f"Then {self.pronoun} {action}."
            )
        sentences.append(f"How many {self.item} does {self.name} have now?")
        return " ".join(sentences)

    def demonstration(self) -> str:
        values = self.values()
        lines = [
            f"{values[i]}{OPERATOR_SYMBOL[op]}{n}={values[i + 1]}" for i, (op, n) in enumerate(self.steps)
        ]
        lines.append(f"\\boxed{{{values[-1]}}}")
        return "\n".join(lines)

    def signature(self) -> str:
        """The arithmetic alone (no names or wording): what decides the split."""
        return f"{self.start}|" + ",".join(f"{op}{n}" for op, n in self.steps)


def apply_operation(value: int, op: str, operand: int) -> int:
    if op == "add":
        return value + operand
    if op == "sub":
        return value - operand
    assert op == "mul", op
    return value * operand


def split_of(problem: Problem, *, val_fraction: float) -> str:
    """'val' for a fixed, seed-independent share of arithmetic signatures, else 'train'."""
    digest = hashlib.blake2b(problem.signature().encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


def _feasible_steps(value: int, difficulty: Difficulty) -> list[tuple[str, int]]:
    steps = []
    for op in difficulty.operations:
        operands = (
            range(2, difficulty.max_factor + 1) if op == "mul" else range(1, difficulty.max_operand + 1)
        )
        steps += [(op, n) for n in operands if 0 <= apply_operation(value, op, n) <= difficulty.max_value]
    return steps


def _sample_steps(
    rng: random.Random, start: int, count: int, difficulty: Difficulty
) -> list[tuple[str, int]] | None:
    steps, value = [], start
    for _ in range(count):
        feasible = _feasible_steps(value, difficulty)
        if not feasible:
            return None
        op = rng.choice(sorted({o for o, _ in feasible}))  # operation first, so each is equally likely
        n = rng.choice([m for o, m in feasible if o == op])
        steps.append((op, n))
        value = apply_operation(value, op, n)
    return steps


def sample_problem(rng: random.Random, difficulty: Difficulty) -> Problem:
    """Draw one problem whose running value stays within [0, max_value]."""
    for _ in range(100):
        start = rng.randint(2, difficulty.max_start)
        steps = _sample_steps(rng, start, rng.randint(difficulty.min_steps, difficulty.max_steps), difficulty)
        if steps is not None:
            break
    else:
        raise ValueError(
            f"{difficulty} cannot keep {difficulty.min_steps} steps within max_value; raise "
            "max_value or allow more operations"
        )
    name, pronoun = rng.choice(NAMES)
    phrasing = tuple(rng.randrange(len(PHRASES[op])) for op, _ in steps)
    return Problem(
        name=name, pronoun=pronoun, item=rng.choice(ITEMS), start=start, steps=tuple(steps), phrasing=phrasing
    )


def generate_problems(
    n: int, *, split: str, seed: int, difficulty: Difficulty = Difficulty(), val_fraction: float = 0.125
) -> list[Problem]:
    """``n`` distinct problems of ``split``; deterministic in (n, split, seed, difficulty, val_fraction).

    Each split draws from its own random stream, so the size of one split never changes the other.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {', '.join(SPLITS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    rng = random.Random(f"hpt-synthetic/{split}/{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    misses = 0  # draws in a row that gave nothing new: the space of problems is exhausted when large
    while len(problems) < n and misses < _MAX_MISSES_IN_A_ROW:
        problem = sample_problem(rng, difficulty)
        if split_of(problem, val_fraction=val_fraction) != split or problem.question() in seen:
            misses += 1
            continue
        misses = 0
        seen.add(problem.question())
        problems.append(problem)
    if len(problems) < n:
        raise ValueError(
            f"found only {len(problems)} distinct {split} problems of the {n} asked for; "
            "ask for fewer or widen the difficulty (more steps, larger numbers)"
        )
    return problems


def problem_to_row(problem: Problem, *, split: str, index: int) -> dict[str, Any]:
    """One row in the HPT parquet schema."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": problem.question()}],
        "target": [{"role": "assistant", "content": problem.demonstration()}],
        "ability": "math",
        "reward_model": {"ground_truth": str(problem.answer), "style": "rule"},
        "extra_info": {"split": split, "index": index, "num_steps": len(problem.steps)},
    }


def write_dataset(
    out: str | Path,
    *,
    train: int,
    val: int,
    seed: int,
    difficulty: Difficulty = Difficulty(),
    val_fraction: float = 0.125,
    suffix: str = ".parquet",
) -> dict[str, Path]:
    """Write ``train`` + ``val`` problems to ``out/train<suffix>`` and ``out/val<suffix>``."""
    paths = {}
    for split, count in (("train", train), ("val", val)):
        problems = generate_problems(
            count, split=split, seed=seed, difficulty=difficulty, val_fraction=val_fraction
        )
        rows = [problem_to_row(p, split=split, index=i) for i, p in enumerate(problems)]
        paths[split] = write_rows(rows, Path(out) / f"{split}{suffix}")
    return paths


def lexicon() -> list[str]:
    """Every word the generator can write, for the task's tokenizer (numbers and punctuation aside)."""
    texts = [*ITEMS, *FIXED_WORDS, *(p.format(n="") for phrases in PHRASES.values() for p in phrases)]
    for name, pronoun in NAMES:
        texts += [name, pronoun, pronoun.capitalize()]
    return sorted({word for text in texts for word in text.split()})


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    default = Difficulty()
    parser = argparse.ArgumentParser(description="Write the synthetic arithmetic task as HPT parquet files.")
    parser.add_argument("--out", required=True, help="output folder (train.parquet, val.parquet)")
    parser.add_argument("--train", type=int, default=20000, help="number of training problems")
    parser.add_argument("--val", type=int, default=500, help="number of validation problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-steps", type=int, default=default.min_steps)
    parser.add_argument("--max-steps", type=int, default=default.max_steps)
    parser.add_argument("--max-start", type=int, default=default.max_start)
    parser.add_argument("--max-operand", type=int, default=default.max_operand)
    parser.add_argument("--max-factor", type=int, default=default.max_factor)
    parser.add_argument("--max-value", type=int, default=default.max_value)
    parser.add_argument(
        "--operations",
        default=",".join(default.operations),
        help=f"comma-separated subset of {','.join(OPERATIONS)}",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.125,
        help="share of arithmetic signatures reserved for validation",
    )
    parser.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    difficulty = Difficulty(
        min_steps=args.min_steps,
        max_steps=args.max_steps,
        max_start=args.max_start,
        max_operand=args.max_operand,
        max_factor=args.max_factor,
        max_value=args.max_value,
        operations=tuple(op.strip() for op in args.operations.split(",") if op.strip()),
    )
    paths = write_dataset(
        args.out,
        train=args.train,
        val=args.val,
        seed=args.seed,
        difficulty=difficulty,
        val_fraction=args.val_fraction,
        suffix=f".{args.format}",
    )
    for split, path in paths.items():
        print(f"wrote {split}: {path}")


if __name__ == "__main__":
    main()
