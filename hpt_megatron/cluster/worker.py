"""One rank of the job: a Megatron actor and its colocated rollout engine.

The driver talks to workers only through these methods (in-process for one rank, as Ray actors
otherwise); every method that runs collectives must be called on all ranks together.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from hpt_megatron.algo import AlgoConfig, Counts
from hpt_megatron.config import Config
from hpt_megatron.rollout import Completion, SamplingParams
from hpt_megatron.train.batching import TrainBatch

logger = logging.getLogger("hpt_megatron")


def model_dtype(cfg: Config) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.model.dtype]


def load_tokenizer(cfg: Config):
    from hpt_megatron.data.tokenizer import load_hf_tokenizer

    source = cfg.model.tokenizer or cfg.model.path
    if not source:
        raise ValueError(
            "model.tokenizer (or model.path) must name a directory with a Hugging Face tokenizer"
        )
    return load_hf_tokenizer(source)


def vllm_config_overrides(cfg: Config, hf_config: dict) -> dict:
    """The config.json fields that model.rope_theta / model.max_position_embeddings changed for the
    actor (``hf_config`` is the actor's, overrides applied), for vLLM, which reads the file itself."""
    keys = []
    if cfg.model.rope_theta is not None:
        keys += ["rope_theta", "rope_parameters"]
    if cfg.model.max_position_embeddings is not None:
        keys.append("max_position_embeddings")
    return {k: hf_config[k] for k in keys if k in hf_config}


PROBE_TOKENS = 32


def probe_tokens(vocab_size: int, n: int = PROBE_TOKENS) -> list[int]:
    """The fixed sequence every engine scores after each weight sync (seeded: the same on every rank)."""
    g = torch.Generator().manual_seed(20250904)
    return torch.randint(0, vocab_size, (n,), generator=g).tolist()


class PolicyWorker:
    def __init__(
        self, cfg: Config, rank: int, world_size: int, master_addr: str, master_port: int, threads: int = 0
    ):
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port)
        )
        os.environ.setdefault("LOCAL_RANK", str(rank % max(cfg.cluster.devices_per_node, 1)))
        if threads:
            torch.set_num_threads(threads)
        from hpt_megatron.distributed import init_parallel
        from hpt_megatron.models import FP8Options
        from hpt_megatron.train.actor import ActorOptions, MegatronActor

        self.cfg = cfg
        torch.manual_seed(cfg.trainer.seed)  # random initialisation is reproducible run to run
        self.ctx = init_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.trainer.seed)
        self.arch = cfg.model.arch()  # config.json with model.rope_theta / max_position_embeddings
        fp8 = FP8Options(
            cfg.model.fp8, cfg.model.fp8_recipe, cfg.model.fp8_param, cfg.model.first_last_layers_bf16
        )
        options = ActorOptions(
            spec=cfg.model.layer_spec,
            dtype=model_dtype(cfg),
            fp8=fp8 if cfg.model.fp8 else None,
            micro_batch_tokens=cfg.trainer.micro_batch_tokens,
            packed=cfg.trainer.packed,
            temperature=cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0,
            recompute=cfg.model.recompute_activations,
            sequence_parallel=cfg.parallel.sequence_parallel,
        )
        total = cfg.trainer.run_steps
        self.actor = MegatronActor(
            self.arch, self.ctx, cfg.optim, total * cfg.trainer.updates_per_step, options
        )
        self._load_initial_weights()
        self.critic = None  # the value model of PPO (train/critic.py), when an algorithm uses GAE
        if cfg.critic_enabled:
            from hpt_megatron.train.critic import build_critic

            self.critic = build_critic(cfg, self.ctx, self.arch, model_dtype(cfg))
        self.tokenizer = load_tokenizer(cfg)
        from hpt_megatron.convert import hf_manifest

        # the rollout engine's weights: fp32 on CPU, the model dtype on GPU; the same every step
        self.sync_dtype = torch.float32 if self.ctx.device.type == "cpu" else model_dtype(cfg)
        self.manifest = hf_manifest(self.arch, self.sync_dtype)
        self.engine = self._make_engine()
        self.probe_ids = probe_tokens(self.arch.vocab_size)
        # asynchronous rollouts: one thread owns the engine and runs its work in submission order
        # (generations, weight loads, probes), so each generation sees the weights queued before it
        self._engine_thread = self._start_engine_thread() if cfg.rollout.async_staleness else None
        self._queued: dict[int, Future] = {}  # ticket -> generation
        self._load_reports: dict[int, dict] = {}  # weights version -> its load's probe check
        self._reports_lock = threading.Lock()
        self._engine_error: BaseException | None = None
        from hpt_megatron.observability.timing import ProfileWindow

        p = cfg.profile
        trace_dir = Path(cfg.trainer.output_dir) / "profile" / f"rank_{rank}"
        self.profile_window = ProfileWindow(p.steps, rank, p.ranks, p.torch_profiler, str(trace_dir))

    # ---- setup ---------------------------------------------------------------------------------------

    def _load_initial_weights(self) -> None:
        from hpt_megatron.convert import load_hf_model
        from hpt_megatron.convert.megatron_lm import load_megatron_weights

        m = self.cfg.model
        if m.megatron_checkpoint:  # hpt sharded, torch_dist or legacy Megatron-LM (detected)
            load_megatron_weights(m.megatron_checkpoint, self.actor.model, self.ctx, self.arch)
        elif m.path:
            load_hf_model(m.path, self.actor.model, self.ctx, self.arch)
        # otherwise: Megatron's random initialisation, seeded by trainer.seed

    def _make_engine(self):
        from transformers import AutoConfig

        if self.cfg.rollout.engine == "vllm":
            return self._make_vllm_engine()
        from hpt_megatron.rollout.hf_engine import HFEngine

        hf = {
            k: v for k, v in self.arch.hf_config.items() if k not in ("architectures", "transformers_version")
        }
        config = AutoConfig.for_model(**hf)
        device = self.ctx.device if self.ctx.device.type == "cuda" else "cpu"
        return HFEngine.from_config(config, self.tokenizer, device=device, dtype=self.sync_dtype)

    def _make_vllm_engine(self):
        """vLLM starts from a Hugging Face directory: model.path, or (random initialisation, a
        Megatron checkpoint) an export of the actor's initial weights into the run directory. Either
        way the first sync overwrites the weights with the actor's."""
        from hpt_megatron.rollout.vllm_engine import VLLMEngine, require_vllm

        require_vllm()
        r, m = self.cfg.rollout, self.cfg.model
        if m.path and not m.megatron_checkpoint:
            hf_dir = m.path
            overrides = vllm_config_overrides(self.cfg, self.arch.hf_config)
        else:
            hf_dir = str(Path(self.cfg.trainer.output_dir) / "rollout_init")
            self.export_hf(hf_dir)  # collective; rank 0 writes
            torch.distributed.barrier()
            overrides = None  # the export's config.json is the actor's
        dtype = str(self.sync_dtype).removeprefix("torch.")
        return VLLMEngine(
            hf_dir,
            self.tokenizer,
            tp=r.tp,
            gpu_memory_utilization=r.gpu_memory_utilization,
            dtype=dtype,
            seed=self.cfg.trainer.seed + 7919 * self.ctx.rank,  # engine-level: distinct per rank
            max_model_len=self.cfg.data.max_prompt_len + self.cfg.data.max_response_len,
            hf_overrides=overrides,
            max_num_seqs=r.max_num_seqs,
            cpu_kv_cache_gib=r.cpu_kv_cache_gib,
        )

    # ---- the step -------------------------------------------------------------------------------------

    def device_name(self) -> str:
        """The accelerator this rank trains on ("cpu" without one), for the MFU's peak FLOP/s."""
        return torch.cuda.get_device_name(self.ctx.device) if self.ctx.device.type == "cuda" else "cpu"

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if self._engine_thread is not None:  # behind the queued work, with the weights queued last
            return self._on_engine(self._generate, prompts, params).result()
        return self._generate(prompts, params)

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        return self.engine.generate(prompts, params) if prompts else []

    def compute_logprobs(
        self, batch: TrainBatch, with_entropy: bool = False, temperature: float | None = None
    ) -> dict | None:
        return self.actor.compute_logprobs(batch, with_entropy, temperature)

    def train_step(self, batch: TrainBatch, algo: AlgoConfig, counts: Counts) -> dict:
        return self.actor.train_step(batch, algo, counts)

    def compute_values(self, batch: TrainBatch) -> dict | None:
        return self.critic.compute_values(batch)

    def train_critic(self, critic_batch, num_tokens: float) -> dict:
        return self.critic.train_step(critic_batch, num_tokens)

    def init_critic_from_actor(self) -> None:
        self.critic.copy_trunk_from(self.actor.model)

    def sync_weights(self) -> dict:
        """Stream the actor's weights (Megatron -> HF names, bucketed) into the rollout engine, then
        score the probe sequence with it. The engine stays unverified (a vLLM engine refuses to
        generate) until the driver has compared that score with the actor's (Cluster.sync_weights)."""
        start = time.perf_counter()
        buckets = self._export()
        if self._engine_thread is not None:
            probe = self._on_engine(self._load_and_score, self._snapshot(buckets)).result()
        else:
            probe = self._load_and_score(buckets)
        seconds = time.perf_counter() - start
        return {
            "metrics": {
                "perf/weight_sync_s": seconds,
                "perf/weight_sync_bytes": float(self.manifest.total_bytes),
            },
            "probe_logp": probe,
        }

    def _export(self):
        """The actor's weights as HF-named buckets in the engine's dtype (collective)."""
        return self.actor.export_weights(self.cfg.rollout.bucket_mb * 2**20, dtype=self.sync_dtype)

    def _load_and_score(self, buckets) -> list[float]:
        self.engine.load_weights(buckets, self.manifest)
        self.engine.wake()
        return self.engine.score(self.probe_ids)

    # ---- asynchronous rollouts: the engine thread ---------------------------------------------------

    def _start_engine_thread(self) -> ThreadPoolExecutor:
        """On CPU the engine thread and the actor split this rank's cores (torch's thread count is
        per thread): both at full width would contend for every core, slowing both."""
        threads, cpu = torch.get_num_threads(), self.ctx.device.type == "cpu"
        engine = (self.cfg.rollout.async_engine_threads or max(1, threads // 2)) if cpu else threads
        if cpu:
            torch.set_num_threads(max(1, threads - engine))
        return ThreadPoolExecutor(
            1, thread_name_prefix="rollout", initializer=torch.set_num_threads, initargs=(engine,)
        )

    def _on_engine(self, fn, *args) -> Future:
        """Queue ``fn(*args)`` on the engine thread. After one job fails every later one fails with
        the same error, so a stale engine never serves another generation."""

        def job():
            if self._engine_error is not None:
                raise self._engine_error
            try:
                return fn(*args)
            except BaseException as e:
                self._engine_error = e
                raise

        return self._engine_thread.submit(job)

    def _require_async(self, method: str) -> None:
        if self._engine_thread is None:
            raise RuntimeError(f"PolicyWorker.{method} needs rollout.async_staleness > 0")

    @staticmethod
    def _snapshot(buckets) -> list:
        """Copies of the exported tensors (an export in the parameters' own dtype may return the
        parameters themselves, which the actor keeps training while the engine loads)."""
        return [[(name, t.detach().clone()) for name, t in bucket] for bucket in buckets]

    def submit_generate(self, ticket: int, prompts: list[list[int]], params: SamplingParams) -> None:
        self._require_async("submit_generate")
        self._queued[ticket] = self._on_engine(self._generate, prompts, params)

    def collect_generate(self, ticket: int) -> dict:
        self._require_async("collect_generate")
        completions = self._queued.pop(ticket).result()
        with self._reports_lock:
            reports, self._load_reports = self._load_reports, {}
        return {"completions": completions, "loads": reports}

    def submit_sync(self, actor_probe: list[float], tol: float, version: int) -> dict:
        """Snapshot the weights now (collective), load them on the engine thread after the queued
        generations, then check the probe there against ``actor_probe`` (the actor's log-probs of
        these weights); the check is reported, under ``version``, by a later collect_generate."""
        from hpt_megatron.cluster.probe import check_probe

        self._require_async("submit_sync")
        start = time.perf_counter()
        buckets = self._snapshot(self._export())
        export_s = time.perf_counter() - start
        expected = torch.tensor(actor_probe, dtype=torch.float64)

        def load_and_check():
            begin = time.perf_counter()
            report = check_probe(self.ctx.rank, self._load_and_score(buckets), expected, tol)
            self.engine.mark_verified()
            with self._reports_lock:
                self._load_reports[version] = {**report, "perf/weight_load_s": time.perf_counter() - begin}

        self._on_engine(load_and_check)
        return {"perf/weight_sync_s": export_s, "perf/weight_sync_bytes": float(self.manifest.total_bytes)}

    def cancel_generations(self) -> None:
        for future in self._queued.values():
            future.cancel()
        self._queued.clear()

    def probe_setup(self) -> tuple[list[int], float]:
        """The probe sequence and the tolerance of its mean |log-prob difference|: rollout.probe_tolerance,
        or 1e-3 nats/token when the engines hold fp32 weights and 0.05 in bf16/fp16."""
        tol = self.cfg.rollout.probe_tolerance
        if tol is None:
            tol = 1e-3 if self.sync_dtype == torch.float32 else 0.05
        return self.probe_ids, tol

    def mark_engine_verified(self) -> None:
        self.engine.mark_verified()

    def profile_begin(self, step: int) -> None:
        self.profile_window.step_begin(step)

    def profile_end(self, step: int) -> str | None:
        path = self.profile_window.step_end(step)
        return None if path is None else str(path)

    def sleep_engine(self) -> None:
        self.engine.sleep()

    def save(self, directory: str, meta: dict) -> None:
        from hpt_megatron.train.checkpoint import save_training_checkpoint

        save_training_checkpoint(self.actor, directory, meta, self.cfg.trainer.checkpoint_format)
        if self.critic is not None:
            from hpt_megatron.train.critic import save_critic

            save_critic(self.critic, directory)

    def load(self, directory: str) -> dict:
        from hpt_megatron.train.checkpoint import load_training_checkpoint

        meta = load_training_checkpoint(self.actor, directory)  # the caller syncs the engines
        if self.critic is not None:
            from hpt_megatron.train.critic import load_critic

            load_critic(self.critic, directory)
        return meta

    def export_hf(self, directory: str) -> None:
        """Write the current weights as a Hugging Face checkpoint (rank 0 writes; collective)."""
        from hpt_megatron.train.hf_export import save_hf_checkpoint

        save_hf_checkpoint(self.actor, Path(directory), self.tokenizer)
