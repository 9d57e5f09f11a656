"""Workers as Ray actors: one per GPU (or CPU slot), packed into one placement group, each holding a
Megatron rank and its colocated rollout engine. The only module that imports ray.

Connects to an existing cluster when ``cluster.ray_address`` or ``RAY_ADDRESS`` is set (the SLURM
launcher sets it), otherwise starts a local Ray instance with the dashboard off. Each worker writes
its output to ``<run dir>/logs/worker_<rank>.log``; when a worker dies the driver stops at once
with a ``WorkerDied`` error naming the worker, its rank and its last log lines, instead of waiting
for the other ranks' collectives to time out.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hpt_megatron.cluster.base import Cluster, free_port

LOG_TAIL_LINES = 30
READY_TIMEOUT_S = 600
DEATH_REPORT_S = 10  # how long a failed collective waits for Ray to report a dead peer


class WorkerDied(RuntimeError):
    pass


class RemoteWorker:
    """Runs inside the Ray actor: redirects output to a log file, then builds the PolicyWorker."""

    def __init__(
        self, cfg, rank: int, world_size: int, master_addr: str, master_port: int, log_path: str, threads: int
    ):
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout, sys.stderr = log, log
        from hpt_megatron.cluster.worker import PolicyWorker

        self.worker = PolicyWorker(cfg, rank, world_size, master_addr, master_port, threads)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class _Probe:
    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()


def _use_gpus(cfg) -> bool:
    if cfg.cluster.device == "auto":
        import torch

        return torch.cuda.is_available()
    return cfg.cluster.device == "cuda"


def nsight_runtime_env(cfg, rank: int, run_dir: Path) -> dict | None:
    """Run a profiled rank's worker under ``nsys profile`` (Ray's nsight runtime env) with capture
    limited to the cudaProfilerStart/Stop window the worker opens at ``profile.steps``. Reports go to
    ``<run dir>/nsys/worker_<rank>.nsys-rep``; NSYS_ARGS-style extra flags are not needed here, the
    trace set covers CUDA, NVTX (our stage ranges), cuBLAS/cuDNN and OS runtime calls."""
    p = cfg.profile
    if p.steps is None or p.torch_profiler or rank not in p.ranks:
        return None
    out = run_dir / "nsys"
    out.mkdir(parents=True, exist_ok=True)
    return {
        "nsight": {
            "t": "cuda,nvtx,osrt,cublas,cudnn",
            "capture-range": "cudaProfilerApi",
            "capture-range-end": "stop",
            "o": str(out / f"worker_{rank}"),
            "force-overwrite": "true",
        }
    }


class RayCluster(Cluster):
    def __init__(self, cfg, run_dir: str | Path | None = None):
        self.world_size = cfg.cluster.world_size
        self.log_dir = Path(run_dir or cfg.trainer.output_dir) / "logs"
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            address = cfg.cluster.ray_address or os.environ.get("RAY_ADDRESS")
            local = {} if address else {"num_cpus": max(os.cpu_count() or 1, self.world_size)}
            ray.init(address=address, include_dashboard=False, log_to_driver=False, namespace="hpt", **local)
        gpus = _use_gpus(cfg)
        bundle = {"GPU": 1, "CPU": 1} if gpus else {"CPU": 1}
        self.pg = placement_group([bundle] * self.world_size, strategy="PACK")
        ray.get(self.pg.ready(), timeout=READY_TIMEOUT_S)
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0)
        probe = _Probe.options(num_cpus=0, scheduling_strategy=strategy).remote()
        master_addr, master_port = ray.get(probe.address.remote())
        ray.kill(probe)
        threads = 1 if not gpus else 0
        actor_cls = ray.remote(RemoteWorker)
        self.actors = [
            actor_cls.options(
                num_cpus=1,
                num_gpus=1 if gpus else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
                max_concurrency=1,
                runtime_env=nsight_runtime_env(cfg, r, self.log_dir.parent) if gpus else None,
            ).remote(cfg, r, self.world_size, master_addr, master_port, str(self.log_path(r)), threads)
            for r in range(self.world_size)
        ]
        self._get([a.pid.remote() for a in self.actors])  # raises with the log of a rank that failed to start
        self.start_engines()

    def log_path(self, rank: int) -> Path:
        return self.log_dir / f"worker_{rank}.log"

    def _tail(self, rank: int) -> str:
        path = self.log_path(rank)
        if not path.exists():
            return "(no log)"
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=LOG_TAIL_LINES))

    def _get(self, refs: list) -> list:
        """Results in rank order; the first failing rank stops everything with its log."""
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except (RayActorError, ActorDiedError) as e:
                    self.shutdown()
                    raise WorkerDied(
                        f"worker rank {rank} (log {self.log_path(rank)}) died: {type(e).__name__}\n"
                        f"--- last lines of its log ---\n{self._tail(rank)}"
                    ) from None
                except ray.exceptions.RayTaskError as e:
                    # a rank whose peer died fails its collective at once, often before Ray reports
                    # the death: name the dead worker, the cause, when there is one
                    dead = self._dead_rank(pending)
                    self.shutdown()
                    if dead is not None:
                        raise WorkerDied(
                            f"worker rank {dead} (log {self.log_path(dead)}) died (rank {rank} then failed "
                            f"in a collective)\n--- last lines of its log ---\n{self._tail(dead)}"
                        ) from None
                    raise WorkerDied(
                        f"worker rank {rank} failed:\n{e}\n--- last lines of its log ---\n{self._tail(rank)}"
                    ) from None
        return [results[r] for r in range(len(refs))]

    def _dead_rank(self, pending: dict, wait_s: float = DEATH_REPORT_S) -> int | None:
        """The first of the ``pending`` calls' ranks whose actor has died, waiting up to ``wait_s``
        for Ray to report it."""
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=wait_s)
        for ref in ready:
            try:
                ray.get(ref)
            except (RayActorError, ActorDiedError):
                return pending[ref]
            except ray.exceptions.RayTaskError:
                continue
        return None

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        shared = [ray.put(a) for a in args]  # one copy in the object store for all ranks
        return self._get([a.call.remote(method, *shared) for a in self.actors])

    def _call_each(self, method: str, args_per_rank: list[tuple]) -> list[Any]:
        return self._get([a.call.remote(method, *args) for a, args in zip(self.actors, args_per_rank)])

    def worker_pids(self) -> list[int]:
        return self._get([a.pid.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in getattr(self, "actors", []):
            ray.kill(a, no_restart=True)
        self.actors = []
        if getattr(self, "pg", None) is not None:
            remove_placement_group(self.pg)
            self.pg = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
