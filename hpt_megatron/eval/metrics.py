"""Metrics of sampled evaluation: the unbiased pass@k, avg@k, and pooling of repeated problems.

Benchmark files repeat their small benchmarks (LUFFY's valid.parquet holds every AIME problem 8 times
and every AMC problem 4 times) so that one sample per row gives several samples per problem. Copies are
one problem: 8 copies x 4 samples are 32 samples of that problem, and pass@k is computed over those 32,
not over 8 separate problems of 4 samples each (which would cap k at 4 and weight the problem 8 times).
A problem is identified by its data source, its prompt messages and its ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hpt_megatron.data.schema import Example


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n, c of them correct,
    is correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    The ratio is the product over i in (n-c, n] of (1 - k/i), which never forms the huge binomials
    (C(2048, 1024) overflows a float) and loses no precision to cancellation.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: need 0 <= c <= n correct samples, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass@k: k={k} needs 1 <= k <= n={n} samples per problem; draw more samples or lower k"
        )
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; ``correct[p]`` holds the grades of problem p's samples."""
    return sum(pass_at_k(len(c), sum(c), k) for c in correct) / len(correct)


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """avg@k: the fraction of correct samples, averaged over problems (k = samples per problem)."""
    return sum(sum(c) / len(c) for c in correct) / len(correct)


def curve_ks(n: int, requested: Iterable[int] = ()) -> list[int]:
    """The k of a pass@k curve over n samples: powers of two up to n, n itself, and the requested k <= n."""
    powers = {2**i for i in range(n.bit_length()) if 2**i <= n}
    return sorted(powers | {n} | {k for k in requested if k <= n})


@dataclass(frozen=True)
class Problem:
    """One problem and the rows (copies) that state it, in file order."""

    examples: tuple[Example, ...]

    @property
    def example(self) -> Example:
        return self.examples[0]

    @property
    def data_source(self) -> str:
        return self.example.data_source


def problem_key(example: Example) -> tuple:
    """What makes two rows the same problem: data source, prompt messages and ground truth."""
    messages = tuple((m.role, m.content) for m in example.messages)
    return example.data_source, messages, example.ground_truth


def group_problems(examples: Iterable[Example]) -> list[Problem]:
    """Pool rows that state the same problem; problems come in order of their first row."""
    copies: dict[tuple, list[Example]] = {}
    for example in examples:
        copies.setdefault(problem_key(example), []).append(example)
    return [Problem(tuple(rows)) for rows in copies.values()]


@dataclass(frozen=True)
class SourceMetrics:
    """Aggregate of one data source. ``accuracy`` is avg@``samples_per_problem``; ``pass_at_k`` holds the
    requested k that the samples allow, ``curve`` pass@k at powers of two (for the plot)."""

    data_source: str
    problems: int
    rows: int
    samples_per_problem: int
    accuracy: float
    pass_at_k: dict[int, float]
    curve: dict[int, float]


def source_metrics(
    data_source: str, correct: Sequence[Sequence[bool]], *, rows: int, ks: Iterable[int]
) -> SourceMetrics:
    """Metrics of one source from the grades of each problem's samples (the same count for every problem)."""
    counts = {len(c) for c in correct}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(
            f"{data_source}: every problem needs the same positive number of samples, got {sorted(counts)}"
        )
    n = counts.pop()
    ks = sorted(set(ks))
    return SourceMetrics(
        data_source=data_source,
        problems=len(correct),
        rows=rows,
        samples_per_problem=n,
        accuracy=avg_at_k(correct),
        pass_at_k={k: mean_pass_at_k(correct, k) for k in ks if k <= n},
        curve={k: mean_pass_at_k(correct, k) for k in curve_ks(n, ks)},
    )
