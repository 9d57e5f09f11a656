"""Shared helpers of the end-to-end tests: a shrunk tiny_cpu run and its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_cpu.yaml"

# Small and fast: a few steps of HPT on the synthetic task (the model/task are tiny_cpu's).
FAST = [
    "data.synthetic.train=2000",
    "data.synthetic.val=32",
    "rollout.n=4",
    "rollout.max_new_tokens=40",
    "trainer.prompts_per_step=16",
    "trainer.mini_batch_prompts=16",
    "trainer.eval_every=0",
    "trainer.eval_before_train=false",
    "trainer.save_every=0",
    "logging.progress=false",
    "logging.tensorboard=false",
    "reward.num_workers=1",
]


def overrides(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [*FAST, f"trainer.output_dir={run_dir}", f"trainer.total_steps={steps}", *extra]


def hpt_train(
    run_dir: Path, steps: int, *extra: str, timeout: float = 600, **popen
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hpt_megatron.cli", str(TINY), *overrides(run_dir, steps, *extra)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def comparable(record: dict) -> dict:
    """A step's metrics without wall-clock measurements."""
    return {k: v for k, v in record.items() if not k.startswith("perf/")}
