"""Stage timing with NVTX ranges, and profiler windows (cudaProfilerStart/Stop or torch.profiler).

    timer = StageTimer()
    with timer.stage("rollout"):
        ...
    timer.metrics()  # {"perf/time/rollout": seconds, ...}

NVTX ranges are pushed only when CUDA is available (they are no-ops, not errors, on CPU), so the same
code runs under ``nsys profile`` on GPUs and unprofiled on a laptop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch


def nvtx_available() -> bool:
    return torch.cuda.is_available()


@contextlib.contextmanager
def nvtx_range(name: str, enabled: bool = True) -> Iterator[None]:
    """An NVTX range (for nsys) on CUDA machines, and a torch.profiler range everywhere: the same
    names appear in an nsys report and in a torch.profiler trace, on GPU or CPU. Both cost
    microseconds when no profiler is attached."""
    active = enabled and nvtx_available()
    if active:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if active:
            torch.cuda.nvtx.range_pop()


def reset_peak_memory() -> None:
    """Start a new peak-memory window (CUDA only: a process's peak RSS cannot be reset)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: torch.device | str = "cpu") -> float:
    """Peak memory in GiB: CUDA bytes allocated since ``reset_peak_memory`` on a GPU, else the
    process's peak resident set size since it started."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StageTimer:
    def __init__(self, nvtx: bool = True, sync_cuda: bool = False):
        self.nvtx = nvtx
        self.sync_cuda = sync_cuda and torch.cuda.is_available()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with nvtx_range(name, self.nvtx):
            start = time.perf_counter()
            try:
                yield
            finally:
                if self.sync_cuda:
                    torch.cuda.synchronize()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"perf/time/{k}": v for k, v in self.seconds.items()}

    def reset(self) -> None:
        self.seconds.clear()


class ProfileWindow:
    """Profile steps ``start..end`` (inclusive) on the chosen ranks: cudaProfilerStart/Stop for
    ``nsys profile --capture-range=cudaProfilerApi``, or a torch.profiler trace (CPU and GPU)
    written to ``trace_dir``."""

    def __init__(
        self, steps, rank: int, ranks: list[int], torch_profiler: bool = False, trace_dir: str = "."
    ):
        self.start, self.end = steps if steps is not None else (None, None)
        self.active_rank = rank in ranks
        self.torch_profiler = torch_profiler
        self.trace_dir = Path(trace_dir)
        self._prof = None
        self._cuda_started = False

    def _in_window(self, step: int) -> bool:
        return self.active_rank and self.start is not None and self.start <= step <= self.end

    def step_begin(self, step: int) -> None:
        if not self._in_window(step) or step != self.start:
            return
        if self.torch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self._prof.__enter__()
        elif torch.cuda.is_available():
            torch.cuda.cudart().cudaProfilerStart()
            self._cuda_started = True

    def step_end(self, step: int) -> Path | None:
        if not self._in_window(step) or step != self.end:
            return None
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            path = self.trace_dir / f"trace_steps{self.start}-{self.end}.json"
            self._prof.export_chrome_trace(str(path))
            self._prof = None
            return path
        if self._cuda_started:
            torch.cuda.cudart().cudaProfilerStop()
            self._cuda_started = False
        return None
