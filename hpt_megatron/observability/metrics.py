"""Metric sinks: one JSON line per step and TensorBoard scalars/histograms; rank-0 printing."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch.distributed as dist

logger = logging.getLogger("hpt_megatron")


def is_rank0() -> bool:
    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args: Any, **kwargs: Any) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


class MetricsLogger:
    """``log(step, scalars, histograms)`` appends to ``metrics.jsonl`` and writes TensorBoard events
    under ``tensorboard/``. Keys are namespaced (``loss/``, ``rollout/``, ``hpt/``, ``perf/``...)."""

    def __init__(self, run_dir: str | Path, jsonl: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl" if jsonl else None
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(
        self, step: int, scalars: dict[str, float], histograms: dict[str, list[float]] | None = None
    ) -> None:
        record = {"step": step, **{k: _finite_or_none(float(v)) for k, v in sorted(scalars.items())}}
        if self.jsonl_path is not None:
            with self.jsonl_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), step)
            for k, values in (histograms or {}).items():
                if values:
                    import numpy as np

                    self._tb.add_histogram(k, np.asarray(values, dtype=np.float64), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path: str | Path, after_step: int) -> None:
    """Drop records past ``after_step`` (a resumed run rewrites the steps it repeats)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r["step"] <= after_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
