"""Loading HPT-schema parquet/JSONL files: the public benchmarks, bad rows, the skip policy."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpt_megatron.data.datasets import load_examples, write_rows

BENCHMARKS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "benchmarks"
BENCHMARK_FILES = sorted(BENCHMARKS.glob("*.parquet"))
# Stated in the reference notes on the method; the test recounts them from the file independently.
KNOWN_VALID_COUNTS = {"aime": 240, "amc": 332, "math": 500, "minerva": 272, "olympiad_bench": 675}

needs_benchmarks = pytest.mark.skipif(not BENCHMARK_FILES, reason=f"no benchmark files under {BENCHMARKS}")


def good_row(i: int = 0, **overrides):
    row = {
        "data_source": "toy",
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"What is {i}+1?"},
        ],
        "target": [{"role": "assistant", "content": f"{i}+1={i + 1}\n\\boxed{{{i + 1}}}"}],
        "ability": "math",
        "reward_model": {"ground_truth": str(i + 1), "style": "rule"},
        "extra_info": {"split": "train", "index": i},
    }
    row.update(overrides)
    return row


@needs_benchmarks
@pytest.mark.parametrize("path", BENCHMARK_FILES, ids=lambda p: p.name)
def test_every_benchmark_row_loads_and_sources_match(path):
    examples, report = load_examples(path, on_bad_row="error")
    table = pq.read_table(path, columns=["data_source", "reward_model"])
    assert len(examples) == table.num_rows == report.kept
    assert not report.skipped
    assert Counter(e.data_source for e in examples) == Counter(table.column("data_source").to_pylist())
    truths = [r["ground_truth"] for r in table.column("reward_model").to_pylist()]
    assert [e.ground_truth for e in examples] == truths
    assert all(e.demonstration is None and e.messages[-1].role == "user" for e in examples)
    assert len({e.uid for e in examples}) == len(examples)


@needs_benchmarks
def test_valid_parquet_counts_agree_with_the_reference_notes():
    table = pq.read_table(BENCHMARKS / "valid.parquet", columns=["data_source"])
    assert Counter(table.column("data_source").to_pylist()) == KNOWN_VALID_COUNTS
    _, report = load_examples(BENCHMARKS / "valid.parquet")
    assert dict(report.by_source) == KNOWN_VALID_COUNTS


def write_parquet_rows(path: Path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_missing_ground_truth_names_file_row_and_field(tmp_path):
    rows = [good_row(i) for i in range(5)]
    rows[3] = good_row(3, reward_model={"ground_truth": None, "style": "rule"})
    path = write_parquet_rows(tmp_path / "bad.parquet", rows)
    with pytest.raises(
        ValueError, match=r"bad\.parquet row 3: field 'reward_model\.ground_truth' is missing"
    ):
        load_examples(path)
    examples, report = load_examples(path, on_bad_row="skip")
    assert [e.uid for e in examples] == ["bad.parquet:0", "bad.parquet:1", "bad.parquet:2", "bad.parquet:4"]
    assert report.skipped == {"field 'reward_model.ground_truth' is missing": 1}
    assert report.first_skipped_at["field 'reward_model.ground_truth' is missing"] == "bad.parquet row 3"


def test_wrong_prompt_type_is_named_with_the_fix(tmp_path):
    rows = [good_row(i) for i in range(3)]
    # A prompt stored as a bare string (a common mistake) cannot share a parquet column with message
    # lists, so this file stores every prompt as a string.
    rows = [dict(r, prompt=f"What is {i}+1?") for i, r in enumerate(rows)]
    path = write_parquet_rows(tmp_path / "strings.parquet", rows)
    with pytest.raises(ValueError) as info:
        load_examples(path)
    message = str(info.value)
    assert "strings.parquet row 0: field 'prompt' must be a list of {role, content} messages" in message
    assert "got str" in message and "[{'role': 'user', 'content': ...}]" in message
    examples, report = load_examples(path, on_bad_row="skip")
    assert examples == [] and sum(report.skipped.values()) == 3


def test_skip_counts_each_reason(tmp_path):
    rows = [good_row(i) for i in range(8)]
    rows[1]["prompt"] = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows[2]["prompt"] = [{"role": "bot", "content": "q"}]
    rows[4]["target"] = [{"role": "assistant", "content": "   "}]
    rows[5]["target"] = None
    rows[6]["reward_model"] = {"ground_truth": "", "style": "rule"}
    path = write_parquet_rows(tmp_path / "mixed.parquet", rows)
    examples, report = load_examples(path, on_bad_row="skip", require_demonstration=True)
    assert [e.uid for e in examples] == ["mixed.parquet:0", "mixed.parquet:3", "mixed.parquet:7"]
    assert report.skipped == {
        "field 'prompt[i].role' must be 'user' in the last message": 1,
        "field 'prompt[i].role' must be one of system, user, assistant": 1,
        "field 'target[i].content' is empty": 1,
        "field 'target' is missing": 1,
        "field 'reward_model.ground_truth' is empty": 1,
    }
    assert "skipped 1: field 'target' is missing (first at mixed.parquet row 5)" in report.summary()
    # Evaluation data needs no demonstration: the empty and the missing target are fine then.
    examples, report = load_examples(path, on_bad_row="skip", require_demonstration=False)
    assert len(examples) == 5
    assert examples[2].demonstration is None and examples[3].demonstration is None


def test_empty_demonstration_error_names_the_row(tmp_path):
    rows = [good_row(0), good_row(1, target=[{"role": "assistant", "content": ""}])]
    path = write_parquet_rows(tmp_path / "train.parquet", rows)
    with pytest.raises(ValueError, match=r"train\.parquet row 1: field 'target\[0\]\.content' is empty"):
        load_examples(path, require_demonstration=True)


def test_missing_column_is_a_file_level_error(tmp_path):
    rows = [{k: v for k, v in good_row(i).items() if k != "reward_model"} for i in range(2)]
    path = write_parquet_rows(tmp_path / "nocol.parquet", rows)
    with pytest.raises(ValueError, match=r"nocol\.parquet: column\(s\) 'reward_model' missing"):
        load_examples(path, on_bad_row="skip")


def test_jsonl_loads_like_parquet_and_names_lines(tmp_path):
    rows = [good_row(i) for i in range(4)]
    parquet_examples, _ = load_examples(write_rows(rows, tmp_path / "same.parquet"))
    jsonl_examples, _ = load_examples(write_rows(rows, tmp_path / "same.jsonl"))
    strip = [(e.data_source, e.messages, e.demonstration, e.ground_truth, e.extra) for e in parquet_examples]
    assert strip == [
        (e.data_source, e.messages, e.demonstration, e.ground_truth, e.extra) for e in jsonl_examples
    ]

    bad = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(good_row(0)),
        "",
        json.dumps(good_row(1, reward_model={"style": "rule"})),
        "{not json",
        json.dumps([1, 2]),
        json.dumps(good_row(2, reward_model={"ground_truth": 3})),
    ]
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: field 'reward_model\.ground_truth' is missing"):
        load_examples(bad)
    examples, report = load_examples(bad, on_bad_row="skip")
    assert [e.uid for e in examples] == ["bad.jsonl:1", "bad.jsonl:6"]
    assert examples[1].ground_truth == "3"  # numbers are accepted and stringified
    assert report.skipped == {
        "field 'reward_model.ground_truth' is missing": 1,
        "is not valid JSON": 1,
        "is not a JSON object": 1,
    }


def test_file_problems_are_named(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_examples(tmp_path / "absent.parquet")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"must end in \.parquet or \.jsonl"):
        load_examples(tmp_path / "data.csv")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        load_examples(tmp_path / "broken.parquet")
    with pytest.raises(ValueError, match="on_bad_row='ignore' is not valid; use one of error, skip"):
        load_examples(tmp_path / "broken.parquet", on_bad_row="ignore")


def test_several_files_keep_order_and_unique_uids(tmp_path):
    a = write_rows([good_row(i) for i in range(2)], tmp_path / "a" / "part.parquet")
    b = write_rows([good_row(i) for i in range(3)], tmp_path / "b" / "part.parquet")
    examples, report = load_examples([a, b])
    assert len(examples) == 5 and len({e.uid for e in examples}) == 5
    assert list(report.rows_read.values()) == [2, 3]
