"""Batched autoregressive sampling on a Hugging Face causal LM with its KV cache.

Every sample draws its noise from its own generator, seeded by ``(seed, sample index)``, so a
sample does not depend on which other samples share its batch or which worker generates it: a run
on two workers samples exactly what a run on one samples, and a resumed run what the uninterrupted
one did. Tokens are drawn by the Gumbel-max trick on the temperature-scaled, top-k/top-p filtered
logits (an exact categorical sample); the reported log-prob is ``log softmax(logits / T)`` of the
drawn token, without the truncation, as the actor computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Sampled:
    tokens_BN: Tensor  # generated ids, padded after the end
    logprobs_BN: Tensor
    lengths_B: Tensor  # tokens generated per row, EOS included
    stopped_B: Tensor  # bool: ended with EOS


def filter_logits(scaled: Tensor, top_k: int, top_p: float) -> Tensor:
    """-inf outside the top-k tokens and outside the smallest set of mass >= top_p."""
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(-1) - probs > top_p  # keep a token if the mass before it is <= top_p
        scaled = scaled.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return scaled


def gumbel_noise(generators: list[torch.Generator], vocab: int) -> Tensor:
    """One row of Gumbel noise per generator, drawn on the generators' device (float64 so that the
    smallest uniform draws stay finite)."""
    u = torch.stack(
        [torch.rand(vocab, generator=g, dtype=torch.float64, device=g.device) for g in generators]
    )
    return -torch.log(-torch.log(u.clamp_min(1e-300)))


COMPACT_AT = 8  # shrink the batch once 1 / COMPACT_AT of its sequences have ended


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    seeds: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_ids: list[int],
    pad_id: int,
) -> Sampled:
    device = next(model.parameters()).device
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p) :] = torch.as_tensor(p)
        attn[i, width - len(p) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    eos = torch.tensor(eos_ids, device=device)
    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    rows = torch.arange(b, device=device)  # each running sequence's row of the batch
    ended = torch.zeros(b, dtype=torch.bool, device=device)  # per running sequence
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        scaled = logits / (temperature if temperature > 0 else 1.0)
        if temperature > 0:
            choice = (
                filter_logits(scaled, top_k, top_p) + gumbel_noise(generators, scaled.shape[-1])
            ).argmax(-1)
        else:
            choice = scaled.argmax(-1)
        logp = torch.log_softmax(scaled, -1).gather(-1, choice[:, None]).squeeze(-1)
        live = ~ended
        tokens[rows[live], t] = choice[live]
        logprobs[rows[live], t] = logp[live]
        lengths[rows[live]] += 1
        ended |= live & torch.isin(choice, eos)
        if bool(ended.all()):
            break
        if int(ended.sum()) * COMPACT_AT >= len(rows):
            # drop the ended sequences from the batch and the KV cache, so decoding costs what the
            # running ones need (each draws from its own generator: nothing else changes)
            keep = (~ended).nonzero().squeeze(1)
            done[rows[ended]] = True
            rows, choice, ended, attn, positions = (
                rows[keep],
                choice[keep],
                ended[keep],
                attn[keep],
                positions[keep],
            )
            generators = [generators[i] for i in keep.tolist()]
            cache.batch_select_indices(keep)
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=choice[:, None],
            attention_mask=attn,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
    done[rows[ended]] = True
    return Sampled(tokens.cpu(), logprobs.cpu(), lengths.cpu(), done.cpu())
