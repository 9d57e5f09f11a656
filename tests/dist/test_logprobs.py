"""Vocab-parallel, chunked log-probs and entropy equal a full-vocab log_softmax reference."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from hpt_megatron.distributed import launch
from hpt_megatron.train.logprobs import vocab_parallel_logprobs

S, V, V_PADDED = 37, 50, 64


def reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(S, V_PADDED, generator=gen, dtype=dtype) * 3
    targets = torch.randint(0, V, (S,), generator=gen)
    g_logp = torch.randn(S, generator=gen, dtype=dtype)
    g_ent = torch.randn(S, generator=gen, dtype=dtype)
    return logits, targets, g_logp, g_ent


def reference_grads(temperature: float):
    logits, targets, g_logp, g_ent = inputs()
    real = logits[:, :V].clone().requires_grad_(True)
    logp, ent = reference(real, targets, temperature)
    (logp * g_logp + ent * g_ent).sum().backward()
    grad = torch.zeros_like(logits)
    grad[:, :V] = real.grad
    return logp.detach(), ent.detach(), grad


@pytest.mark.parametrize("chunk", [1, 8, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_single_rank_matches_log_softmax(chunk, temperature):
    logits, targets, g_logp, g_ent = inputs()
    x = logits.clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(
        x, targets, vocab_size=V, temperature=temperature, chunk=chunk, with_entropy=True
    )
    (logp * g_logp + ent * g_ent).sum().backward()
    ref_logp, ref_ent, ref_grad = reference_grads(temperature)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_without_entropy_and_bf16_input():
    logits, targets, g_logp, _ = inputs()
    x = logits.to(torch.bfloat16).requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(x, targets, vocab_size=V, chunk=5)
    assert ent is None and logp.dtype == torch.float32
    logp.backward(g_logp.float())
    assert x.grad.dtype == torch.bfloat16
    ref_logp, _ = reference(x.detach().double()[:, :V], targets, 1.0)
    # fp32 math on bf16 inputs: logits up to ~10, so fp32 rounding of the normaliser is ~1e-6
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"expected logits \[S, V\] and targets \[S\]"):
        vocab_parallel_logprobs(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


def _tp_worker(temperature: float):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, targets, g_logp, g_ent = inputs()
        shard = V_PADDED // world
        start = rank * shard
        x = logits[:, start : start + shard].clone().requires_grad_(True)
        logp, ent = vocab_parallel_logprobs(
            x,
            targets,
            vocab_start=start,
            vocab_size=V,
            group=dist.group.WORLD,
            temperature=temperature,
            chunk=6,
            with_entropy=True,
        )
        (logp * g_logp + ent * g_ent).sum().backward()
        ref_logp, ref_ent, ref_grad = reference_grads(temperature)
        torch.testing.assert_close(logp, ref_logp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, ref_grad[:, start : start + shard], rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_tp2_matches_full_vocab_reference(temperature):
    """TP=2: rank 1's shard holds the vocabulary padding (columns 50..63), rank 0 none of it."""
    launch(_tp_worker, 2, args=(temperature,))
