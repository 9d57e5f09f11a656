"""Rollout with Hugging Face transformers on an HF-format copy of the actor's weights.

The default engine on CPU, and a GPU fallback. Its weights arrive every step through the same
Megatron -> HF mapping as the checkpoint converter, so every CPU training step exercises it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from hpt_megatron.convert.export import WeightManifest, verify_weights
from hpt_megatron.rollout.base import Bucket, Completion, SamplingParams
from hpt_megatron.rollout.sampling import Sampled, sample


class HFEngine:
    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", max_batch: int = 512):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.eos_ids = eos_ids(model.generation_config, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def from_config(cls, hf_config, tokenizer, device="cpu", dtype=torch.float32, max_batch: int = 512):
        """A model of the given transformers config; its weights come from ``load_weights``."""
        from transformers import AutoModelForCausalLM

        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        return cls(model, tokenizer, device, max_batch)

    # ---- weights ---------------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, buckets: Iterable[Bucket], manifest: WeightManifest) -> None:
        received: dict[str, Tensor] = {}
        for bucket in buckets:
            for name, tensor in bucket:
                received[name] = tensor
        verify_weights(manifest, received)
        params = dict(self.model.named_parameters())
        missing = sorted(set(params) - set(received) - self._tied_names())
        if missing:
            raise ValueError(f"the export has no tensor for HF parameters {missing[:8]}")
        for name, tensor in received.items():
            if name not in params:
                raise ValueError(f"exported tensor {name!r} is not a parameter of the HF model")
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))

    def _tied_names(self) -> set[str]:
        cfg = self.model.config
        tied = getattr(cfg, "tie_word_embeddings", False)
        return {"lm_head.weight"} if tied else set()

    def sleep(self) -> None:
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)

    # ---- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        out: list[Completion] = []
        for a in range(0, len(rows), self.max_batch):
            chunk = rows[a : a + self.max_batch]
            res = sample(
                self.model,
                [prompts[i] for i, _ in chunk],
                [params.sample_seed(i, j) for i, j in chunk],
                max_new_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                eos_ids=self.eos_ids,
                pad_id=self.pad_id,
            )
            out += [self._completion(res, k, params) for k in range(len(chunk))]
        return [out[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _completion(self, res: Sampled, k: int, params: SamplingParams) -> Completion:
        n = int(res.lengths_B[k])
        reason = "stop" if bool(res.stopped_B[k]) else "length"
        ids, logprobs, text, reason = truncate_at_stop(
            res.tokens_BN[k, :n].tolist(), res.logprobs_BN[k, :n].tolist(), reason, params.stop, self.tokenizer
        )
        return Completion(token_ids=ids, text=text, logprobs=logprobs, finish_reason=reason)

    @torch.no_grad()
    def score(self, token_ids: list[int]) -> list[float]:
        """Untempered log-probs of ``token_ids[1:]``, each given the tokens before it (the probe)."""
        ids = torch.tensor([token_ids], device=self.device)
        logp = torch.log_softmax(self.model(ids).logits[0, :-1].float(), dim=-1)
        return logp.gather(-1, ids[0, 1:, None])[:, 0].tolist()

    def mark_verified(self) -> None:
        """Nothing to do: weights are copied into the very tensors generation reads."""


def truncate_at_stop(ids: list[int], logprobs: list[float], reason: str, stops, tokenizer):
    """End a completion at the token that completes its first stop string, so the trained tokens and
    log-probs are exactly those of the rewarded text; returns (ids, logprobs, text, finish reason)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if any(s in text for s in stops):
        n = _first_prefix_with(ids, stops, tokenizer)
        ids, logprobs, reason = ids[:n], logprobs[:n], "stop"
        text = tokenizer.decode(ids, skip_special_tokens=True)
    return ids, logprobs, text, reason


def _first_prefix_with(ids: list[int], stops, tokenizer) -> int:
    """The fewest leading tokens whose text contains a stop string (binary search: once a prefix
    contains one, every longer prefix does)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        text = tokenizer.decode(ids[:mid], skip_special_tokens=True)
        if any(s in text for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


def eos_ids(generation_config, tokenizer, model_dir=None) -> list[int]:
    """EOS ids: the generation config's (or ``model_dir``'s generation_config.json), else the tokenizer's."""
    if generation_config is None and model_dir is not None:
        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:  # no generation_config.json
            generation_config = None
    ids = generation_config.eos_token_id if generation_config is not None else None
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return list(ids) if isinstance(ids, (list, tuple)) else [int(ids)]
