"""Grade untrusted responses in worker processes, each item under a hard deadline.

A worker grades one item at a time. An item that overruns ``timeout_s`` (a huge exponent, a parser
blow-up) scores 0 with ``timed_out=True``; its worker is killed and replaced. A worker that dies mid-item
scores that item 0 with an error and is replaced too. The caller never waits longer than about
``timeout_s`` per item and worker, whatever the text.

SIGALRM-based timeouts only work in a process's main thread; killing a process works from anywhere.
Workers come from a ``forkserver`` (default) or ``spawn``, never from ``fork``, so a parent holding
threads (torch, NCCL, ray) is never forked. The forkserver pre-imports the grader, so a replacement
worker starts in milliseconds.

    with Verifier(num_workers=4, timeout_s=5.0) as verifier:
        results = verifier.score([(response, ground_truth, data_source), ...])
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import resource
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from hpt_megatron.reward.extract import extract_answer
from hpt_megatron.reward.grader import GradeConfig, ScoreResult, check_item, grade

logger = logging.getLogger(__name__)

GradeFn = Callable[[str, str, str | None, GradeConfig], ScoreResult]
_READY = "ready"
_STARTUP_TIMEOUT_S = 120.0
_START_METHODS = ("forkserver", "spawn")


class RewardItem(NamedTuple):
    response: str
    ground_truth: str
    data_source: str | None = None


@dataclass
class VerifierStats:
    """Counts since the Verifier was created. ``errors`` excludes timeouts and crashes."""

    items: int = 0
    timeouts: int = 0
    crashes: int = 0
    errors: int = 0


_STATM = Path("/proc/self/statm")


def _limit_memory(memory_limit_mb: int | None) -> None:
    """Cap the address space at its current size plus ``memory_limit_mb``.

    Relative to the start-up footprint, because a worker first imports the parent's ``__main__``
    module (multiprocessing does so for spawn and forkserver), which may map gigabytes (torch).
    """
    if memory_limit_mb is not None:
        current = int(_STATM.read_text().split()[0]) * resource.getpagesize()
        limit = current + memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker_main(
    conn: Connection, grade_fn: GradeFn, config: GradeConfig, memory_limit_mb: int | None
) -> None:
    """Serve (index, item) requests until the parent sends None or goes away."""
    _limit_memory(memory_limit_mb)
    grade_fn("\\boxed{1}", "1", None, config)  # compile regexes and fill caches before the first deadline
    conn.send(_READY)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        index, item = request
        try:
            result = grade_fn(*item, config)
        except Exception as e:  # process boundary: a grading bug must cost one item, not the worker
            result = ScoreResult(0.0, None, error=f"{type(e).__name__}: {e}"[:500])
        conn.send((index, result))


class _Worker:
    """One worker process, its pipe, and the item it is grading (if any)."""

    def __init__(self, ctx: mp.context.BaseContext, args: tuple) -> None:
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn, *args), daemon=True)
        self.process.start()
        child_conn.close()  # so the parent's end reports EOF when the worker dies
        self.ready = False
        self.index: int | None = None
        self.item: RewardItem | None = None
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S

    def dispatch(self, index: int, item: RewardItem, timeout_s: float) -> None:
        self.conn.send((index, tuple(item)))
        self.index = index
        self.item = item
        self.deadline = time.monotonic() + timeout_s

    def finish(self) -> None:
        self.index = None
        self.item = None
        self.deadline = math.inf

    def exit_code(self) -> int | None:
        self.process.join(timeout=5.0)
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        if self.process.is_alive() and self.index is None:
            self.conn.send(None)
            self.process.join(timeout=2.0)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class Verifier:
    """A pool of grading processes with a hard per-item timeout; see the module docstring.

    num_workers: processes grading in parallel (one item each at a time).
    timeout_s: wall-clock budget of one item, measured from when a worker receives it.
    config: grading knobs (``GradeConfig``), identical in every worker.
    memory_limit_mb: address space a worker may map beyond its start-up footprint (None: no limit; the
        limit needs Linux); an allocation past it fails that item instead of exhausting the machine.
    start_method: "forkserver" or "spawn".
    grade_fn: a module-level function with ``grade``'s signature, run in the workers (tests use it to
        make a worker crash; it can also swap in another reward function).

    Not thread-safe: call ``score`` from one thread at a time.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        config: GradeConfig | None = None,
        memory_limit_mb: int | None = 4096,
        start_method: str = "forkserver",
        grade_fn: GradeFn = grade,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"Verifier: num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"Verifier: timeout_s must be > 0, got {timeout_s}")
        if memory_limit_mb is not None and not _STATM.exists():
            raise ValueError(f"Verifier: memory_limit_mb needs {_STATM} (Linux); pass memory_limit_mb=None")
        if start_method not in _START_METHODS:
            raise ValueError(
                f"Verifier: start_method must be one of {_START_METHODS}, got {start_method!r} "
                "('fork' is unsafe once the parent runs threads)"
            )
        self.config = config or GradeConfig()
        self.timeout_s = timeout_s
        self.stats = VerifierStats()
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # Takes effect when the process-wide forkserver starts; workers then fork with sympy loaded.
            self._ctx.set_forkserver_preload([grade.__module__])
        self._worker_args = (grade_fn, self.config, memory_limit_mb)
        self._workers = [_Worker(self._ctx, self._worker_args) for _ in range(num_workers)]

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop all workers (killing any that is mid-item). Idempotent."""
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def metrics(self) -> dict[str, float]:
        """Counters under the ``reward/`` namespace, for the training logger."""
        return {f"reward/{name}": float(value) for name, value in asdict(self.stats).items()}

    def score(
        self,
        items: Sequence[RewardItem | tuple[str, str] | tuple[str, str, str | None]],
        progress: bool = False,
    ) -> list[ScoreResult]:
        """Grade ``items`` (response, ground_truth[, data_source]); results are in input order."""
        if not self._workers:
            raise ValueError("Verifier.score called after close(); create a new Verifier")
        prepared = [self._prepare(i, item) for i, item in enumerate(items)]
        results: list[ScoreResult | None] = [None] * len(prepared)
        queue = deque(range(len(prepared)))
        with tqdm(total=len(prepared), disable=not progress, desc="grading", unit="item") as bar:
            while queue or any(w.index is not None for w in self._workers):
                self._dispatch(queue, prepared)
                done = self._collect(results) + self._expire(results)
                bar.update(done)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _prepare(self, position: int, item: RewardItem | tuple) -> RewardItem:
        item = RewardItem(*item)
        try:
            check_item(item.response, item.ground_truth, item.data_source, self.config)
        except ValueError as e:
            raise ValueError(f"Verifier.score: item {position}: {e}") from None
        # Only the tail is searched for the answer; capping here also bounds what crosses the pipe.
        return item._replace(response=item.response[-self.config.max_response_chars :])

    def _dispatch(self, queue: deque[int], items: list[RewardItem]) -> None:
        for worker in self._workers:
            if queue and worker.ready and worker.index is None:
                index = queue.popleft()
                worker.dispatch(index, items[index], self.timeout_s)

    def _collect(self, results: list[ScoreResult | None]) -> int:
        """Receive what workers have sent before the nearest deadline; returns items finished."""
        timeout = max(0.0, min(w.deadline for w in self._workers) - time.monotonic())
        by_conn = {w.conn: w for w in self._workers}
        done = 0
        for conn in wait(list(by_conn), timeout=timeout):
            worker = by_conn[conn]
            try:
                message = conn.recv()
            except EOFError:
                done += self._on_worker_death(worker, results)
                continue
            if message == _READY:
                worker.ready = True
                worker.finish()
                continue
            index, result = message
            assert index == worker.index, f"worker answered item {index}, expected {worker.index}"
            self._record(results, index, result)
            self.stats.errors += result.error is not None
            worker.finish()
            done += 1
        return done

    def _expire(self, results: list[ScoreResult | None]) -> int:
        """Kill and replace workers past their deadline; returns items finished (as timeouts)."""
        now = time.monotonic()
        done = 0
        for worker in [w for w in self._workers if w.deadline <= now]:
            if not worker.ready:
                raise RuntimeError(f"reward worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
            message = f"grading took longer than {self.timeout_s:g} s"
            result = ScoreResult(0.0, self._answer_of(worker.item), timed_out=True, error=message)
            self._record(results, worker.index, result)
            self.stats.timeouts += 1
            self._replace(worker)
            done += 1
        return done

    def _on_worker_death(self, worker: _Worker, results: list[ScoreResult | None]) -> int:
        code = worker.exit_code()
        if not worker.ready:
            raise RuntimeError(
                f"reward worker exited with code {code} while starting; its stderr has the cause "
                "(grade() in-process reproduces import errors)"
            )
        self.stats.crashes += 1
        logger.warning("reward worker %d exited with code %s; replacing it", worker.process.pid, code)
        index, item = worker.index, worker.item
        self._replace(worker)
        if index is None:
            return 0
        error = f"worker exited with code {code}"
        self._record(results, index, ScoreResult(0.0, self._answer_of(item), error=error))
        return 1

    def _answer_of(self, item: RewardItem | None) -> str | None:
        """The extracted answer of an item a worker failed on (extraction is linear-time and safe)."""
        assert item is not None
        answer = extract_answer(item.response, fallback=self.config.answer_fallback)
        return answer if answer is None or len(answer) <= self.config.max_answer_chars else None

    def _record(self, results: list[ScoreResult | None], index: int | None, result: ScoreResult) -> None:
        assert index is not None and results[index] is None
        results[index] = result
        self.stats.items += 1

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        position = self._workers.index(worker)
        self._workers[position] = _Worker(self._ctx, self._worker_args)
