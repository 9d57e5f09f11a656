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


class HFEngine:
    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", max_batch: int = 64):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def from_config(cls, hf_config, tokenizer, device="cpu", dtype=torch.float32, max_batch: int = 64):
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
        flat = [p for p in prompts for _ in range(params.n)]
        out: list[Completion] = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for a in range(0, len(flat), self.max_batch):
                out += self._generate_batch(flat[a : a + self.max_batch], params)
        return [out[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = torch.as_tensor(p)
            attn[i, width - len(p) :] = 1
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=params.temperature > 0,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        if params.temperature > 0:
            kwargs.update(
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else 0,
            )
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        res = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device), **kwargs
        )
        new = res.sequences[:, width:].cpu()
        logits = torch.stack(res.logits, dim=1).float().cpu()  # raw logits [B, steps, V]
        logp = torch.log_softmax(logits / params.logprob_temperature, dim=-1)
        token_logp = logp.gather(-1, new[..., None]).squeeze(-1)
        return [self._completion(new[i], token_logp[i], params) for i in range(len(prompts))]

    def _completion(self, tokens: Tensor, logp: Tensor, params: SamplingParams) -> Completion:
        ids = tokens.tolist()
        end, reason = len(ids), "length"
        for j, t in enumerate(ids):
            if t in self.eos_ids:
                end, reason = j + 1, "stop"
                break
        text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        for s in params.stop:
            k = text.find(s)
            if k >= 0:
                reason = "stop"
                text = text[: k + len(s)]
        return Completion(token_ids=ids[:end], text=text, logprobs=logp[:end].tolist(), finish_reason=reason)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return list(ids) if isinstance(ids, (list, tuple)) else [int(ids)]
