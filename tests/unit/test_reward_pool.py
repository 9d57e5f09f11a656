"""The worker pool: hard per-item timeouts, crashed and hung workers replaced, the pool keeps serving."""

from __future__ import annotations

import math
import os
import time

import pytest

from hpt_megatron.reward import GradeConfig, ScoreResult, Verifier, grade

TIMEOUT_S = 1.0
SLACK_S = 5.0  # start-up of replacement workers, scheduling noise on a busy machine


def misbehave_on_marker(response: str, ground_truth: str, data_source: str | None, config: GradeConfig):
    """Test hook run inside workers: 'CRASH' exits the process, 'HANG' never returns, 'RAISE' raises,
    'ALLOCATE' asks for 2 GiB, 'SLEEP <s>' sleeps then grades; anything else is graded normally."""
    if response == "CRASH":
        os._exit(3)
    if response == "HANG":
        time.sleep(3600)
    if response == "RAISE":
        raise RuntimeError("grader bug")
    if response == "ALLOCATE":
        bytearray(2 * 1024**3)
    if response.startswith("SLEEP "):
        seconds, _, response = response[len("SLEEP ") :].partition(" ")
        time.sleep(float(seconds))
    return grade(response, ground_truth, data_source, config)


@pytest.fixture(scope="module")
def verifier():
    with Verifier(num_workers=2, timeout_s=TIMEOUT_S, grade_fn=misbehave_on_marker) as pool:
        yield pool


def assert_correct(result: ScoreResult) -> None:
    assert result == ScoreResult(1.0, result.extracted), result


PATHOLOGICAL = [
    "\\boxed{10^{10^{10^{10}}}}",
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{(10^{10})!}",
    "\\boxed{" + "(" * 450 + "1" + ")" * 450 + "}",
]


def test_pathological_inputs_time_out_and_the_pool_keeps_serving(verifier):
    items = []
    for text in PATHOLOGICAL:
        items += [(text, "2", None), ("\\boxed{\\frac{2}{4}}", "0.5", None)]
    timeouts_before = verifier.stats.timeouts
    start = time.monotonic()
    results = verifier.score(items)
    elapsed = time.monotonic() - start
    # Two workers: the pathological items run two at a time, each cut off after TIMEOUT_S.
    assert elapsed < math.ceil(len(PATHOLOGICAL) / 2) * TIMEOUT_S + SLACK_S
    for text, result in zip(PATHOLOGICAL, results[::2]):
        assert result.timed_out and result.reward == 0.0, (text, result)
        assert result.extracted == text[len("\\boxed{") : -1]
    for result in results[1::2]:
        assert_correct(result)
    assert verifier.stats.timeouts - timeouts_before == len(PATHOLOGICAL)


def test_megabytes_of_text_are_capped_not_parsed(verifier):
    start = time.monotonic()
    results = verifier.score([("x" * 5_000_000 + "\\boxed{3}", "3", None), ("y " * 2_000_000, "3", None)])
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S
    assert_correct(results[0])
    assert results[1] == ScoreResult(0.0, None)


def test_crashed_worker_is_replaced(verifier):
    crashes_before = verifier.stats.crashes
    results = verifier.score([("CRASH", "1", None), ("\\boxed{1}", "1", None), ("CRASH", "1", None)])
    assert results[0].reward == 0.0 and "exited with code 3" in results[0].error
    assert_correct(results[1])
    assert verifier.stats.crashes - crashes_before == 2
    assert all(r.reward == 1.0 for r in verifier.score([("\\boxed{1}", "1", None)] * 4))


def test_hung_worker_is_killed_and_replaced(verifier):
    start = time.monotonic()
    results = verifier.score([("HANG", "1", None), ("HANG", "1", None), ("\\boxed{1}", "1", None)])
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S
    assert [r.timed_out for r in results] == [True, True, False]
    assert_correct(results[2])


def test_exception_in_grader_costs_one_item(verifier):
    errors_before = verifier.stats.errors
    results = verifier.score([("RAISE", "1", None), ("\\boxed{1}", "1", None)])
    assert results[0].reward == 0.0 and results[0].error == "RuntimeError: grader bug"
    assert_correct(results[1])
    assert verifier.stats.errors - errors_before == 1


def test_memory_limit_fails_the_item_not_the_machine():
    with Verifier(num_workers=1, timeout_s=30.0, memory_limit_mb=512, grade_fn=misbehave_on_marker) as pool:
        results = pool.score([("ALLOCATE", "1", None), ("\\boxed{1}", "1", None)])
    assert results[0].reward == 0.0 and results[0].error.startswith("MemoryError")
    assert_correct(results[1])


def test_results_keep_input_order_when_items_finish_out_of_order(verifier):
    items = [(f"SLEEP {0.3 if i % 2 == 0 else 0.0} \\boxed{{{i}}}", str(i), None) for i in range(6)]
    results = verifier.score(items)
    assert [r.extracted for r in results] == [str(i) for i in range(6)]
    assert all(r.reward == 1.0 for r in results)


def test_metrics_are_namespaced(verifier):
    metrics = verifier.metrics()
    assert set(metrics) == {"reward/items", "reward/timeouts", "reward/crashes", "reward/errors"}


def test_bad_item_is_named_by_position(verifier):
    with pytest.raises(ValueError, match=r"item 1: ground_truth must be a string"):
        verifier.score([("\\boxed{1}", "1"), ("\\boxed{1}", 1)])


def test_spawn_start_method_and_close():
    pool = Verifier(num_workers=1, timeout_s=30.0, start_method="spawn")
    assert_correct(pool.score([("\\boxed{\\frac{1}{2}}", "0.5", "math")])[0])
    pool.close()
    pool.close()
    with pytest.raises(ValueError, match="after close"):
        pool.score([("\\boxed{1}", "1")])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_workers": 0}, "num_workers"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"start_method": "fork"}, "fork"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Verifier(**kwargs)
