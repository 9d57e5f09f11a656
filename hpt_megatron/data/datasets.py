"""Reading HPT-schema rows from parquet and JSONL files, with a per-row bad-data policy.

``load_examples`` validates every row (see ``schema.py``). With ``on_bad_row="error"`` the first bad
row stops loading with a message naming the file, the row and the field; with ``"skip"`` bad rows are
counted per reason and reported (the first location of each reason included), and loading goes on.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hpt_megatron.data.schema import REQUIRED_COLUMNS, BadRow, Example, parse_row

logger = logging.getLogger(__name__)

BAD_ROW_POLICIES = ("error", "skip")
SUFFIXES = (".parquet", ".jsonl")
_PARQUET_BATCH_ROWS = 1024


@dataclass
class LoadReport:
    """What loading did: rows read per file, rows kept, rows skipped per reason."""

    rows_read: dict[str, int] = field(default_factory=dict)
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_skipped_at: dict[str, str] = field(default_factory=dict)
    by_source: Counter[str] = field(default_factory=Counter)

    def record_skip(self, reason: str, location: str) -> None:
        self.skipped[reason] += 1
        self.first_skipped_at.setdefault(reason, location)

    def summary(self) -> str:
        total = sum(self.rows_read.values())
        lines = [
            f"read {total} rows from {len(self.rows_read)} file(s): kept {self.kept}, "
            f"skipped {sum(self.skipped.values())}"
        ]
        for reason, count in self.skipped.most_common():
            lines.append(f"  skipped {count}: {reason} (first at {self.first_skipped_at[reason]})")
        return "\n".join(lines)


def check_policy(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"data.{name}={value!r} is not valid; use one of {', '.join(valid)}")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"{path}: no such file; check the data file list")
    if not path.name.endswith(SUFFIXES):
        raise ValueError(f"{path}: unsupported file type; data files must end in {' or '.join(SUFFIXES)}")


def _iter_parquet(path: Path) -> Iterator[tuple[int, str, Mapping[str, Any] | BadRow]]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err
    names = parquet.schema_arrow.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"{path}: column(s) {', '.join(map(repr, missing))} missing (columns: "
            f"{', '.join(names)}); every row needs data_source, prompt and reward_model"
        )
    index = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            yield index, f"{path.name} row {index}", row
            index += 1


def _iter_jsonl(path: Path) -> Iterator[tuple[int, str, Mapping[str, Any] | BadRow]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            location = f"{path.name} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield (
                    number,
                    location,
                    BadRow(
                        None,
                        "is not valid JSON",
                        "fix or remove the line",
                        detail=f"{err.msg} at column {err.colno}",
                    ),
                )
                continue
            if not isinstance(row, dict):
                row = BadRow(
                    None,
                    "is not a JSON object",
                    "write one {field: value} object per line",
                    detail=f"got {type(row).__name__}",
                )
            yield number, location, row


def iter_rows(path: str | Path) -> Iterator[tuple[int, str, Mapping[str, Any] | BadRow]]:
    """Yield ``(index, location, row)`` for each row; an unparseable JSONL line comes as a ``BadRow``.

    ``index`` is the 0-based row for parquet and the 1-based line number for JSONL; ``location`` is
    the human form used in messages ("train.parquet row 17", "train.jsonl line 18").
    """
    path = Path(path)
    _check_file(path)
    return _iter_parquet(path) if path.name.endswith(".parquet") else _iter_jsonl(path)


def _uid_prefixes(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    return [p.name if names.count(p.name) == 1 else str(p) for p in paths]


def load_examples(
    files: str | Path | Iterable[str | Path],
    *,
    on_bad_row: str = "error",
    require_demonstration: bool = False,
) -> tuple[list[Example], LoadReport]:
    """Load and validate every row of ``files`` (parquet or JSONL, any mix), in file order.

    on_bad_row: "error" raises ValueError("<file> row <i>: field '<f>' ...; <fix>") at the first bad
        row; "skip" drops bad rows and counts them per reason in the report.
    require_demonstration: rows without a non-empty ``target`` are bad rows (training data for SFT,
        LUFFY, SRFT and HPT needs a demonstration; evaluation files do not).
    """
    check_policy("on_bad_row", on_bad_row, BAD_ROW_POLICIES)
    paths = [Path(files)] if isinstance(files, str | Path) else [Path(f) for f in files]
    if not paths:
        raise ValueError("no data files given; set the data file list")
    report, examples = LoadReport(), []
    for path, prefix in zip(paths, _uid_prefixes(paths)):
        read = 0
        for index, location, row in iter_rows(path):
            read += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                example = parse_row(
                    row,
                    uid=f"{prefix}:{index}",
                    location=location,
                    require_demonstration=require_demonstration,
                )
            except BadRow as err:
                if on_bad_row == "error":
                    raise ValueError(f"{path} {location.split(' ', 1)[1]}: {err}") from err
                report.record_skip(err.reason, location)
                continue
            examples.append(example)
            report.by_source[example.data_source] += 1
        report.rows_read[str(path)] = read
    report.kept = len(examples)
    if report.skipped:
        logger.warning("skipped bad rows: %s", report.summary())
    return examples, report


def write_rows(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write raw HPT-schema rows to ``path`` (.parquet or .jsonl), creating the parent folder."""
    path = Path(path)
    if not path.name.endswith(SUFFIXES):
        raise ValueError(f"{path}: unsupported file type; use a name ending in {' or '.join(SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    if path.name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
