"""Data-parallel rollout engines for stand-alone generation (``hpt-eval --data-parallel N``): N
engines, each in its own Ray actor with its own GPUs (``gpus_per_engine``, the engine's TP) or CPU
threads, behind the RolloutEngine ``generate`` call. Prompts are split into contiguous shards with
their global prompt offsets (``split_prompts``), so with per-request seeds the merged completions are
exactly what one engine returns for all the prompts.

The engines are built inside the actors by ``factory(rank)``, a picklable callable: nothing but
token ids and completions crosses process boundaries.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray

from hpt_megatron.rollout import Completion, SamplingParams
from hpt_megatron.rollout.base import split_prompts

READY_TIMEOUT_S = 900


class EngineHost:
    """Runs inside a Ray actor: one engine."""

    def __init__(self, factory: Callable[[int], Any], rank: int, threads: int):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.engine = factory(rank)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        return self.engine.generate(prompts, params)

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


class EnginePool:
    def __init__(self, factory: Callable[[int], Any], engines: int, gpus_per_engine: int = 0):
        if engines < 1:
            raise ValueError(f"--data-parallel must be >= 1 engines, got {engines}")
        self._started_ray = not ray.is_initialized()
        cpus = os.cpu_count() or 1
        if self._started_ray:
            address = os.environ.get("RAY_ADDRESS")
            local = {} if address else {"num_cpus": max(cpus, engines)}
            ray.init(
                address=address, include_dashboard=False, log_to_driver=True, namespace="hpt-eval", **local
            )
        threads = 0 if gpus_per_engine else max(1, cpus // engines)
        host = ray.remote(EngineHost)
        self.hosts = [
            host.options(num_cpus=1 if gpus_per_engine else threads, num_gpus=gpus_per_engine).remote(
                factory, rank, threads
            )
            for rank in range(engines)
        ]
        ray.get([h.__ray_ready__.remote() for h in self.hosts], timeout=READY_TIMEOUT_S)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        shards = split_prompts(prompts, params, len(self.hosts))
        refs = [h.generate.remote(*shard) for h, shard in zip(self.hosts, shards) if shard[0]]
        return [c for part in ray.get(refs) for c in part]

    def close(self) -> None:
        if self.hosts:
            ray.get([h.close.remote() for h in self.hosts])
        for h in self.hosts:
            ray.kill(h, no_restart=True)
        self.hosts = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
