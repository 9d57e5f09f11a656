"""What the driver sees of the workers: one object whose methods fan out to every rank and merge
the results. ``LocalCluster`` runs a single worker in-process; ``RayCluster`` (ray_cluster.py)
runs one worker per device as Ray actors. Both implement ``_call_all`` / ``_call_each``.
"""

from __future__ import annotations

import socket
from typing import Any

import torch

from hpt_megatron.algo import AlgoConfig, Counts, Source, merge_metrics
from hpt_megatron.cluster.probe import StaleEngineError, check_probe  # noqa: F401 (StaleEngineError: re-exported)
from hpt_megatron.rollout import Completion, SamplingParams
from hpt_megatron.rollout.base import split_prompts
from hpt_megatron.train.batching import TrainBatch, build_train_batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    world_size: int = 1
    probe_ids: list[int]  # the sequence every engine scores after a sync (from the workers)
    probe_tolerance: float  # rollout.probe_tolerance, or the workers' default for their sync dtype

    # implemented by subclasses: run a worker method on every rank (same or per-rank arguments)
    def _call_all(self, method: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    def _call_each(self, method: str, args_per_rank: list[tuple]) -> list[Any]:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass

    # ---- the step --------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Prompts split evenly over the ranks' rollout engines; results back in prompt order."""
        shards = split_prompts(prompts, params, self.world_size)
        return [c for part in self._call_each("generate", shards) for c in part]

    def compute_logprobs(
        self, batch: TrainBatch, with_entropy: bool = False, temperature: float | None = None
    ) -> dict[str, torch.Tensor | None]:
        """Log-probs (and entropy) of every row of ``batch`` under the current weights."""
        calls = self._call_all("compute_logprobs", batch, with_entropy, temperature)
        reports = [r for r in calls if r is not None]
        logp = torch.zeros_like(batch.loss_mask_BT, dtype=torch.float32)
        entropy = torch.zeros_like(logp) if with_entropy else None
        for r in reports:
            if r["rows"]:
                logp[r["rows"]] = r["logp_BT"].float()
                if entropy is not None:
                    entropy[r["rows"]] = r["entropy_BT"].float()
        return {"logp_BT": logp, "entropy_BT": entropy}

    def train_step(self, batch: TrainBatch, algo: AlgoConfig, counts: Counts) -> dict:
        """One optimizer step; metrics summed over data-parallel groups (they are additive)."""
        outs = self._call_all("train_step", batch, algo, counts)
        metrics = merge_metrics([o["metrics"] for o in outs if o["metrics"]])
        first = outs[0]
        metrics.update({"actor/grad_norm": first["grad_norm"], "actor/lr": first["lr"]})
        metrics["perf/peak_memory_gib_max"] = max(o["peak_memory_gib"] for o in outs)  # worst rank
        return {"metrics": metrics, "skipped": first["skipped"], "reason": first["reason"]}

    def compute_values(self, batch: TrainBatch) -> torch.Tensor:
        """The critic's values [B, T] of every row of ``batch`` (0 where the rows end)."""
        values = torch.zeros_like(batch.loss_mask_BT, dtype=torch.float32)
        for r in self._call_all("compute_values", batch):
            if r is not None and r["rows"]:
                values[r["rows"]] = r["values_BT"].float()
        return values

    def train_critic(self, critic_batch, num_tokens: float) -> dict:
        """One critic optimizer step; metrics summed over data-parallel groups (additive)."""
        outs = self._call_all("train_critic", critic_batch, num_tokens)
        metrics = merge_metrics([o["metrics"] for o in outs if o["metrics"]])
        metrics.update({"critic/grad_norm": outs[0]["grad_norm"], "critic/lr": outs[0]["lr"]})
        return {"metrics": metrics, "skipped": outs[0]["skipped"]}

    def init_critic_from_actor(self) -> None:
        self._call_all("init_critic_from_actor")

    def device_name(self) -> str:
        """Rank 0's accelerator name ("cpu" without one)."""
        return self._call_all("device_name")[0]

    def sync_weights(self) -> dict[str, float]:
        """Every rank's engine loads the actor's weights; then each engine's log-probs of the probe
        sequence are compared with the actor's. An engine off by more than ``rollout.probe_tolerance``
        (mean absolute log-prob difference) still serves other weights - a sync that silently did
        nothing - and stops the run (StaleEngineError); the others are marked verified."""
        outs = self._call_all("sync_weights")
        actor = self.actor_probe_logp()
        diffs = [
            check_probe(rank, o["probe_logp"], actor, self.probe_tolerance) for rank, o in enumerate(outs)
        ]
        self._call_all("mark_engine_verified")
        metrics = dict(outs[0]["metrics"])
        for key in diffs[0]:
            metrics[key] = max(d[key] for d in diffs)
        return metrics

    def actor_probe_logp(self) -> torch.Tensor:
        """The actor's (untempered) log-probs of the probe sequence's tokens after the first."""
        ids = self.probe_ids
        probe = build_train_batch([(ids, 1)], [int(Source.RL)], [1.0])
        return self.compute_logprobs(probe, temperature=1.0)["logp_BT"][0, : len(ids) - 1].double()

    # ---- asynchronous rollouts (rollout.async_staleness > 0) -------------------------------------------

    def submit_generate(self, ticket: int, prompts: list[list[int]], params: SamplingParams) -> None:
        """Queue a generation on every rank's engine thread, behind the work queued before it
        (earlier generations, weight loads); ``collect_generate(ticket)`` returns it."""
        self._call_each(
            "submit_generate", [(ticket, *s) for s in split_prompts(prompts, params, self.world_size)]
        )

    def collect_generate(self, ticket: int) -> tuple[list[list[Completion]], dict[int, dict[str, float]]]:
        """A queued generation's completions (waiting for it), in prompt order, and the probe checks
        of the weight loads that finished meanwhile, by weights version (worst rank)."""
        outs = self._call_all("collect_generate", ticket)
        completions = [c for o in outs for c in o["completions"]]
        loads: dict[int, dict[str, float]] = {}
        for o in outs:
            for version, report in o["loads"].items():
                merged = loads.setdefault(version, {})
                for k, v in report.items():
                    merged[k] = max(v, merged.get(k, v))
        return completions, loads

    def submit_sync(self, version: int) -> dict[str, float]:
        """Snapshot the actor's weights (the actor after ``version`` steps) for every engine and queue
        their load behind the queued generations; each engine then checks the probe against the
        actor's log-probs of now (a failure surfaces at the next collect). Returns the time the actor
        waited."""
        actor = self.actor_probe_logp().tolist()
        return self._call_all("submit_sync", actor, self.probe_tolerance, version)[0]

    def cancel_generations(self) -> None:
        """Drop queued generations that have not started (the run ends)."""
        self._call_all("cancel_generations")

    def start_engines(self) -> None:
        """Once the workers are up: learn the probe, and load and verify every engine's first weights."""
        self.probe_ids, self.probe_tolerance = self._call_all("probe_setup")[0]
        self.sync_weights()

    def profile_begin(self, step: int) -> None:
        """Open the profiling window (profile.steps) on the profiled ranks; no-op elsewhere."""
        self._call_all("profile_begin", step)

    def profile_end(self, step: int) -> list[str]:
        """Close it; returns the torch.profiler traces written."""
        return [p for p in self._call_all("profile_end", step) if p]

    def sleep_engines(self) -> None:
        self._call_all("sleep_engine")

    def save(self, directory: str, meta: dict) -> None:
        self._call_all("save", directory, meta)

    def load(self, directory: str) -> dict:
        meta = self._call_all("load", directory)[0]
        self.sync_weights()
        return meta

    def export_hf(self, directory: str) -> None:
        self._call_all("export_hf", directory)


class LocalCluster(Cluster):
    """One worker in this process (TP = PP = DP = 1): the simplest way to run on a laptop."""

    def __init__(self, cfg):
        from hpt_megatron.cluster.worker import PolicyWorker

        if cfg.cluster.world_size != 1:
            raise ValueError(
                "LocalCluster runs one rank; use the Ray cluster for cluster.devices_per_node > 1"
            )
        self.world_size = 1
        self.worker = PolicyWorker(cfg, 0, 1, "127.0.0.1", free_port())
        self.start_engines()

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def _call_each(self, method: str, args_per_rank: list[tuple]) -> list[Any]:
        return [getattr(self.worker, method)(*args_per_rank[0])]

    def shutdown(self) -> None:
        from hpt_megatron.distributed import destroy_parallel

        destroy_parallel()
