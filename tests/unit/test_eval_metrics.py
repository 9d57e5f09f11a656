"""pass@k against brute-force enumeration, avg@k, and pooling of rows that repeat a problem."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from fractions import Fraction
from math import comb
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hpt_megatron.data import load_examples
from hpt_megatron.data.schema import Example, Message
from hpt_megatron.eval.metrics import (
    avg_at_k,
    curve_ks,
    group_problems,
    mean_pass_at_k,
    pass_at_k,
    source_metrics,
)

BENCHMARKS = Path("/work/shared/data/benchmarks")


def enumerated_pass_at_k(n: int, c: int, k: int) -> float:
    """The fraction of k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_over_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(enumerated_pass_at_k(n, c, k), abs=1e-12), (
                    n,
                    c,
                    k,
                )


@pytest.mark.parametrize(("n", "c", "k"), [(2048, 1, 1024), (2048, 7, 1024), (2048, 2000, 3), (1000, 1, 999)])
def test_pass_at_k_is_exact_where_binomials_overflow_floats(n, c, k):
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-15)


def test_pass_at_k_edge_cases():
    assert pass_at_k(5, 0, 5) == 0.0  # nothing correct
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(8, 3, 6) == 1.0  # only 5 wrong samples: any 6 include a correct one
    for n, c in [(1, 0), (1, 1), (7, 3), (32, 5)]:
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)


@pytest.mark.parametrize(
    ("n", "c", "k", "words"),
    [(4, 1, 5, ["k=5", "n=4"]), (4, 1, 0, ["k=0"]), (4, 5, 1, ["c=5", "n=4"]), (4, -1, 1, ["c=-1"])],
)
def test_pass_at_k_rejects_impossible_arguments(n, c, k, words):
    with pytest.raises(ValueError) as err:
        pass_at_k(n, c, k)
    assert all(w in str(err.value) for w in words)


def test_source_metrics_against_independent_averages():
    rng = random.Random(0)
    correct = [[rng.random() < p for _ in range(6)] for p in (0.0, 0.2, 0.5, 0.9, 1.0)]
    m = source_metrics("amc", correct, rows=20, ks=[1, 2, 4, 6, 9])
    flat = [x for c in correct for x in c]
    assert (m.problems, m.rows, m.samples_per_problem) == (5, 20, 6)
    assert m.accuracy == pytest.approx(sum(flat) / len(flat))  # equal samples: mean over all samples
    assert sorted(m.pass_at_k) == [1, 2, 4, 6]  # 9 > 6 samples is left out
    for k, value in m.pass_at_k.items():
        by_enumeration = [enumerated_pass_at_k(6, sum(c), k) for c in correct]
        assert value == pytest.approx(sum(by_enumeration) / 5)
    assert m.pass_at_k[1] == pytest.approx(m.accuracy)
    assert all(m.curve[k] == pytest.approx(m.pass_at_k[k]) for k in (1, 2, 4, 6))
    assert avg_at_k(correct) == pytest.approx(m.accuracy)
    assert mean_pass_at_k(correct, 6) == pytest.approx(sum(any(c) for c in correct) / 5)


def test_source_metrics_needs_one_sample_count():
    with pytest.raises(ValueError, match=r"same positive number of samples, got \[2, 3\]"):
        source_metrics("aime", [[True, False], [True, True, False]], rows=2, ks=[1])


@pytest.mark.parametrize(("n", "requested"), [(1, []), (32, [1]), (12, [3, 5, 40]), (2048, [1000])])
def test_curve_has_every_power_of_two_up_to_n_and_n(n, requested):
    ks = curve_ks(n, requested)
    assert ks == sorted(set(ks)) and max(ks) == n and min(ks) == 1
    assert {2**i for i in range(12) if 2**i <= n} <= set(ks)
    assert {k for k in requested if k <= n} <= set(ks)
    assert set(ks) - {2**i for i in range(12)} - set(requested) <= {n}


def example(source: str, question: str, answer: str, *, system: str | None = None, uid: str = "") -> Example:
    messages = ((Message("system", system),) if system else ()) + (Message("user", question),)
    return Example(uid, source, messages, None, answer)


def test_grouping_pools_copies_and_separates_different_problems():
    rows = [
        example("aime", "Q1", "1", uid="a"),
        example("aime", "Q2", "2", uid="b"),
        example("aime", "Q1", "1", uid="c"),  # a copy of the first
        example("amc", "Q1", "1", uid="d"),  # same text, another benchmark
        example("aime", "Q1", "7", uid="e"),  # same text, another answer
        example("aime", "Q1", "1", system="be brief", uid="f"),  # another prompt
        example("aime", "Q1", "1", uid="g"),
    ]
    problems = group_problems(rows)
    assert [[e.uid for e in p.examples] for p in problems] == [["a", "c", "g"], ["b"], ["d"], ["e"], ["f"]]


def test_grouping_of_the_benchmark_file_matches_an_independent_count():
    path = BENCHMARKS / "valid.parquet"
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")
    table = pq.read_table(path, columns=["data_source", "prompt", "reward_model"]).to_pylist()
    keys = Counter(
        (r["data_source"], json.dumps(r["prompt"], sort_keys=True), str(r["reward_model"]["ground_truth"]))
        for r in table
    )
    oracle: dict[str, Counter] = {}  # source -> Counter(copies per problem -> number of problems)
    for (source, _, _), copies in keys.items():
        oracle.setdefault(source, Counter())[copies] += 1
    # the file is what the paper's setup says: AIME 30 x 8, AMC 83 x 4, every other row its own problem
    assert oracle["aime"] == Counter({8: 30}) and oracle["amc"] == Counter({4: 83})
    assert all(set(c) == {1} for s, c in oracle.items() if s not in ("aime", "amc"))

    examples, _ = load_examples(path)
    grouped: dict[str, Counter] = {}
    for problem in group_problems(examples):
        assert len({e.uid for e in problem.examples}) == len(problem.examples)
        grouped.setdefault(problem.data_source, Counter())[len(problem.examples)] += 1
    assert grouped == oracle
