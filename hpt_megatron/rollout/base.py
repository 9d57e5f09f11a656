"""The RolloutEngine protocol and its value types.

Log-probabilities reported by every engine are ``log softmax(logits / temperature)`` of the sampled
token - the temperature-scaled policy without top-p/top-k truncation - which is exactly what the actor
recomputes, so their difference measures the train/rollout mismatch and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

from hpt_megatron.convert.export import Bucket  # one definition, re-exported here

SEED_STRIDE = 1_000_003  # seeds of different steps/calls never share a prompt's stream


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # index of the first prompt within the whole step's prompts: sample seeds depend on the global
    # prompt index, so splitting prompts across engines never changes what is sampled
    prompt_offset: int = 0

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"sampling: n and max_new_tokens must be >= 1, got {self.n}, {self.max_new_tokens}"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"sampling: need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )

    def prompt_seed(self, i: int) -> int:
        """Seed of the i-th prompt of this call (None seed: 0)."""
        return ((self.seed or 0) * SEED_STRIDE + self.prompt_offset + i) % (2**62)

    def sample_seed(self, i: int, j: int) -> int:
        return (self.prompt_seed(i) * 1009 + j) % (2**62)

    @property
    def logprob_temperature(self) -> float:
        """Temperature of the reported log-probs (greedy decoding reports the untempered policy)."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens, including the EOS token when one was produced
    text: str
    logprobs: list[float] = field(default_factory=list)  # one per token, under the sampling policy
    finish_reason: str = "length"  # "stop" (EOS or a stop string) or "length"


def split_prompts(
    prompts: list[list[int]], params: SamplingParams, parts: int
) -> list[tuple[list[list[int]], SamplingParams]]:
    """``prompts`` in ``parts`` contiguous shards of near-equal size, each with the sampling
    parameters of its place in the whole list (the prompt offset fixes every sample's seed), so the
    shards' completions, concatenated, are what one engine would return for the whole list."""
    bounds = [len(prompts) * r // parts for r in range(parts + 1)]
    return [
        (prompts[bounds[r] : bounds[r + 1]], replace(params, prompt_offset=params.prompt_offset + bounds[r]))
        for r in range(parts)
    ]


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt (token ids), in prompt order."""
        ...

    def load_weights(self, buckets: Iterable[Bucket], manifest) -> None:
        """Load HF-named tensors from the actor's streaming export; raise unless they match the
        manifest exactly (nothing missing, nothing unexpected, same shapes and dtypes)."""
        ...

    def score(self, token_ids: list[int]) -> list[float]:
        """Untempered log-probs of ``token_ids[1:]`` given their prefixes: the probe that proves, after
        each sync, that the engine serves the trainer's weights."""
        ...

    def mark_verified(self) -> None:
        """The probe passed: the engine may generate again (an engine may refuse until then)."""
        ...

    def sleep(self) -> None:
        """Release memory (KV cache, and weights where supported) while the actor trains."""
        ...

    def wake(self) -> None: ...
