"""vLLM rollout engine, colocated with the actor on the same GPUs (optional ``gpu`` extra).

Per training step (the order every colocated RL system uses):
    generate -> sleep (offload weights, drop the KV cache) -> [actor trains]
    -> wake weights -> load the actor's exported buckets -> wake the KV cache -> generate ...
Weights stream bucket by bucket into the model's ``load_weights`` on every vLLM worker, each bucket
checked against the export manifest on arrival; an incomplete or mismatched sync leaves the engine
marked stale and it refuses to generate until a complete sync succeeds.

vLLM is imported here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpt_megatron.rollout.base import Bucket, Completion, SamplingParams
from hpt_megatron.rollout.manifest import ManifestTracker

try:
    import vllm

    HAVE_VLLM = True
except ImportError:
    vllm = None
    HAVE_VLLM = False


def require_vllm():
    if not HAVE_VLLM:
        raise ImportError(
            "rollout.engine=vllm needs vLLM, which is not installed. Install the GPU extra "
            "(pip install -e '.[gpu]') on a CUDA machine, or set rollout.engine=hf."
        )
    return vllm


def _load_bucket(worker, bucket: Bucket) -> None:
    """Runs inside each vLLM worker process (via collective_rpc)."""
    worker.model_runner.model.load_weights(weights=bucket)


class VLLMEngine:
    def __init__(
        self,
        hf_dir: str,
        tp: int = 1,
        gpu_memory_utilization: float = 0.6,
        dtype: str = "bfloat16",
        seed: int = 0,
        max_model_len: int | None = None,
        hf_overrides: dict | None = None,
    ):
        """``hf_overrides``: config.json fields the actor changed (e.g. rope_theta and the context of
        Qwen2.5-Math-7B), applied on top of ``hf_dir/config.json`` so both policies use the same RoPE."""
        v = require_vllm()
        extra = {"hf_overrides": hf_overrides} if hf_overrides else {}
        self.llm = v.LLM(
            model=hf_dir,
            tensor_parallel_size=tp,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enable_sleep_mode=True,
            # report log-probs after temperature scaling, to compare with the actor's
            logprobs_mode="processed_logprobs",
            **extra,
        )
        self.asleep = False
        self.weights_awake = True
        self.stale = False

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if self.asleep or self.stale:
            state = "asleep" if self.asleep else "stale after an incomplete weight sync"
            raise RuntimeError(f"vLLM engine is {state}; call load_weights()/wake() first")
        per_prompt = [
            vllm.SamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                max_tokens=params.max_new_tokens,
                stop=list(params.stop),
                logprobs=0,
                seed=params.prompt_seed(i),  # per prompt: independent of how prompts are sharded
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], per_prompt, use_tqdm=False)
        return [[_completion(o) for o in out.outputs] for out in outputs]

    def sleep(self) -> None:
        self.llm.sleep(level=1)
        self.asleep, self.weights_awake = True, False

    def load_weights(self, buckets: Iterable[Bucket], manifest) -> None:
        if not self.weights_awake:
            self.llm.wake_up(tags=["weights"])
            self.weights_awake = True
        tracker = ManifestTracker(manifest)
        self.stale = True
        for bucket in buckets:
            tracker.check(bucket)
            self.llm.collective_rpc(_load_bucket, args=(bucket,))
        tracker.finish()
        self.stale = False

    def wake(self) -> None:
        if not self.weights_awake:
            self.llm.wake_up(tags=["weights"])
            self.weights_awake = True
        self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False


def _completion(out) -> Completion:
    entries = out.logprobs or [None] * len(out.token_ids)
    logprobs = [d[t].logprob if d and t in d else float("nan") for t, d in zip(out.token_ids, entries)]
    reason = "stop" if out.finish_reason == "stop" else "length"
    return Completion(token_ids=list(out.token_ids), text=out.text, logprobs=logprobs, finish_reason=reason)
