"""Score a jsonl file of responses.

    python -m hpt_megatron.reward --input responses.jsonl --output scored.jsonl --workers 2 --timeout 5

Each input line is a JSON object with ``response``, ``ground_truth`` and optionally ``data_source``; the
output repeats it with ``reward``, ``extracted``, ``timed_out`` and ``error`` added.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from hpt_megatron.reward.grader import GradeConfig
from hpt_megatron.reward.pool import RewardItem, Verifier

_CHUNK = 1024  # lines scored per Verifier.score call, so memory stays flat on large files
_PROGRESS_MIN_ITEMS = 100


def _field(record: dict, name: str, where: str, required: bool) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            raise ValueError(
                f"{where}: missing field '{name}' (each line needs 'response' and 'ground_truth')"
            )
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a numeric ground truth written as a JSON number
    if not isinstance(value, str):
        raise ValueError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def parse_line(line: str, where: str) -> tuple[dict, RewardItem]:
    """One jsonl line -> (the record, its RewardItem); ``where`` is ``file:line`` for error messages."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    item = RewardItem(
        _field(record, "response", where, required=True),
        _field(record, "ground_truth", where, required=True),
        _field(record, "data_source", where, required=False),
    )
    return record, item


def read_jsonl(path: Path) -> Iterator[tuple[dict, RewardItem]]:
    """Records of a jsonl file, skipping blank lines; raises ValueError naming file and line."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield parse_line(line, f"{path}:{number}")


def _chunks(records: Iterator[tuple[dict, RewardItem]]) -> Iterator[list[tuple[dict, RewardItem]]]:
    chunk: list[tuple[dict, RewardItem]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def count_items(path: Path) -> int:
    """Validate every line of ``path`` (so a bad line 90,000 fails before any grading) and count them."""
    return sum(1 for _ in read_jsonl(path))


def score_file(input_path: Path, output_path: Path, verifier: Verifier, total: int) -> float:
    """Score the ``total`` items of ``input_path`` into ``output_path``; returns the mean reward."""
    reward_sum = 0.0
    with (
        output_path.open("w", encoding="utf-8") as out,
        tqdm(total=total, disable=total < _PROGRESS_MIN_ITEMS, desc="grading", unit="item") as bar,
    ):
        for chunk in _chunks(read_jsonl(input_path)):
            results = verifier.score([item for _, item in chunk])
            for (record, _), result in zip(chunk, results, strict=True):
                scored = {**record, "reward": result.reward, "extracted": result.extracted}
                scored.update(timed_out=result.timed_out, error=result.error)
                out.write(json.dumps(scored, ensure_ascii=False) + "\n")
                reward_sum += result.reward
            bar.update(len(chunk))
    return reward_sum / max(total, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpt_megatron.reward", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--input", type=Path, required=True, help="jsonl with response, ground_truth[, data_source]"
    )
    parser.add_argument("--output", type=Path, required=True, help="jsonl to write, one line per input line")
    parser.add_argument("--workers", type=int, default=2, help="grading processes (default 2)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per item before it scores 0")
    parser.add_argument(
        "--answer-fallback", action="store_true", help="without a box, grade 'the answer is X'"
    )
    parser.add_argument(
        "--choice-by-letter",
        action="store_true",
        help="grade any single-letter ground truth as multiple choice",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"--input {args.input} is not a file")
    config = GradeConfig(answer_fallback=args.answer_fallback, choice_by_letter=args.choice_by_letter)
    try:
        total = count_items(args.input)
        with Verifier(num_workers=args.workers, timeout_s=args.timeout, config=config) as verifier:
            mean = score_file(args.input, args.output, verifier, total)
            stats = verifier.stats
    except ValueError as e:  # a bad input line or option: a message, not a traceback
        parser.exit(2, f"error: {e}\n")
    print(
        f"scored {total} items -> {args.output}: mean reward {mean:.4f}, "
        f"{stats.timeouts} timeouts, {stats.crashes} worker crashes, {stats.errors} errors"
    )
