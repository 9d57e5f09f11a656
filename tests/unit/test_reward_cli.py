"""``python -m hpt_megatron.reward``: jsonl in, jsonl out, and errors that name file, line and field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpt_megatron.reward.cli import main
from tests.unit.reward_cases import load_rows, response_with

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_round_trip_through_the_module_entry_point(tmp_path):
    math_row = load_rows("valid.parquet")[0]
    choice_row = load_rows("valid.gpqa.parquet")[0]
    wrong_label = next(label for label in "ABCD" if label != choice_row["ground_truth"])
    records = [
        {
            "response": response_with(math_row["ground_truth"]),
            "ground_truth": math_row["ground_truth"],
            "id": 0,
        },
        {
            "response": response_with(wrong_label),
            "ground_truth": choice_row["ground_truth"],
            "data_source": choice_row["data_source"],
            "id": 1,
        },
        {"response": "no final answer", "ground_truth": 7, "id": 2},  # a JSON number is accepted
    ]
    source, target = write_jsonl(tmp_path / "in.jsonl", records), tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "hpt_megatron.reward", "--input", str(source), "--output", str(target)]
    done = subprocess.run([*command, "--workers", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "scored 3 items" in done.stdout
    scored = read_jsonl(target)
    assert [s["id"] for s in scored] == [0, 1, 2]
    assert [s["reward"] for s in scored] == [1.0, 0.0, 0.0]
    assert scored[1]["extracted"] == wrong_label and scored[2]["extracted"] is None
    assert all(s["timed_out"] is False for s in scored)
    assert scored[0]["response"] == records[0]["response"]  # input fields are kept


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"response": "\\boxed{1}"}, "missing field 'ground_truth'"),
        ({"ground_truth": "1"}, "missing field 'response'"),
        ({"response": ["a"], "ground_truth": "1"}, "field 'response' must be a string"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path, capsys, line, message):
    good = {"response": "\\boxed{1}", "ground_truth": "1"}
    source = write_jsonl(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(source), "--output", str(tmp_path / "out.jsonl")])
    assert exit_info.value.code == 2
    assert f"bad.jsonl:3: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()  # nothing is graded before every line is valid
