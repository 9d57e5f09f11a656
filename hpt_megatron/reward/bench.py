"""Throughput of the verifier: in-process ``grade`` against ``Verifier`` pools.

    python -m hpt_megatron.reward.bench --data path/to/valid.parquet [--prompts 125] [--rollouts 8]

Items look like RL rollouts: ``--rollouts`` responses per prompt, each a few hundred characters of
reasoning (from the prompt text) ending in a boxed answer that is the prompt's ground truth (correct) or
another prompt's (wrong) with probability 1/2. Correct answers are mostly settled by string comparison;
wrong ones go through math-verify, so the mix sets the cost.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import pyarrow.parquet as pq

from hpt_megatron.reward.grader import grade
from hpt_megatron.reward.pool import RewardItem, Verifier


def _reasoning(prompt: list[dict], rng: random.Random) -> str:
    question = prompt[-1]["content"]
    start = rng.randrange(max(1, len(question) - 300))
    return f"Let me restate the key facts: {question[start : start + 300]}\nWorking through it step by step, "


def build_items(path: Path, prompts: int, rollouts: int, seed: int) -> list[RewardItem]:
    """``prompts`` random rows of an HPT-format parquet, ``rollouts`` synthetic responses each."""
    rows = pq.read_table(path, columns=["data_source", "prompt", "reward_model"]).to_pylist()
    if len(rows) < 2:
        raise ValueError(f"{path}: need at least 2 rows to draw wrong answers from, found {len(rows)}")
    rng = random.Random(seed)
    items = []
    for row in rng.choices(rows, k=prompts):
        gold = row["reward_model"]["ground_truth"]
        for _ in range(rollouts):
            answer = gold if rng.random() < 0.5 else rng.choice(rows)["reward_model"]["ground_truth"]
            response = _reasoning(row["prompt"], rng) + f"the final answer is $\\boxed{{{answer}}}$."
            items.append(RewardItem(response, gold, row["data_source"]))
    return items


def bench_sequential(items: list[RewardItem]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    rewards = [grade(*item).reward for item in items]
    return time.perf_counter() - start, rewards


def bench_pool(items: list[RewardItem], workers: int, timeout_s: float) -> tuple[float, float, list[float]]:
    start = time.perf_counter()
    with Verifier(num_workers=workers, timeout_s=timeout_s) as verifier:
        verifier.score(items[:workers])  # wait until every worker is up
        startup = time.perf_counter() - start
        start = time.perf_counter()
        rewards = [r.reward for r in verifier.score(items)]
        return startup, time.perf_counter() - start, rewards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hpt_megatron.reward.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data", type=Path, required=True, help="HPT-format parquet (e.g. valid.parquet)")
    parser.add_argument("--prompts", type=int, default=125)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pool sizes to measure")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    items = build_items(args.data, args.prompts, args.rollouts, args.seed)
    chars = sum(len(item.response) for item in items) / len(items)
    print(f"{len(items)} items ({args.prompts} prompts x {args.rollouts}), mean response {chars:.0f} chars")
    # Other processes compete for the cores: the pool cannot beat the CPU time actually available.
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    seconds, reference = bench_sequential(items)
    print(
        f"sequential grade():  {len(items) / seconds:8.1f} items/s  mean reward {sum(reference) / len(items):.3f}"
    )
    for workers in args.workers:
        startup, seconds, rewards = bench_pool(items, workers, args.timeout)
        agree = sum(a == b for a, b in zip(rewards, reference))
        print(
            f"Verifier({workers} workers): {len(items) / seconds:8.1f} items/s  startup {startup:.2f} s  "
            f"agrees with sequential on {agree}/{len(items)}"
        )


if __name__ == "__main__":
    main()
