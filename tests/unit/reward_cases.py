"""Shared inputs of the reward tests: the public benchmark files and a response template."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

BENCHMARKS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "benchmarks"


def load_rows(name: str) -> list[dict]:
    """Rows of a benchmark parquet as dicts with data_source, ground_truth and the last user message."""
    table = pq.read_table(BENCHMARKS / name, columns=["data_source", "prompt", "reward_model"]).to_pylist()
    return [
        {
            "data_source": row["data_source"],
            "ground_truth": row["reward_model"]["ground_truth"],
            "question": row["prompt"][-1]["content"],
        }
        for row in table
    ]


def response_with(answer: str) -> str:
    """A short reasoning text that ends in ``\\boxed{answer}``, with an earlier decoy box."""
    return (
        "We first try a small case and get \\boxed{0}, which is only a check.\n"
        "Expanding the general case and simplifying each term carefully, the pattern holds.\n"
        f"Therefore, the final answer is $\\boxed{{{answer}}}$."
    )
