"""SDPACoreAttention equals Megatron's local DotProductAttention and a hand-written attention (GQA)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hpt_megatron.distributed import launch
from tests import hf_tiny
from tests.dist import megatron_workers as workers

pytestmark = pytest.mark.dist

SEQ, BATCH, HEADS, GROUPS, DIM = 6, 2, 4, 2, 16


def _reference(q, k, v, masked):
    """Plain attention: q [s, b, h, d], k/v [s, b, g, d], masked [b, 1, s, s] (True = hidden)."""
    k = k.repeat_interleave(HEADS // GROUPS, dim=2)
    v = v.repeat_interleave(HEADS // GROUPS, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(DIM)
    probs = scores.masked_fill(masked, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(SEQ, BATCH, HEADS * DIM)


def test_sdpa_matches_local_attention_causal_and_padded():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(SEQ, BATCH, HEADS, DIM, generator=g)
    k, v = (torch.randn(SEQ, BATCH, GROUPS, DIM, generator=g) for _ in range(2))
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    # Right padding: sample 1 has 4 real tokens; its padding keys are hidden from every query.
    padded = causal.expand(BATCH, 1, SEQ, SEQ).clone()
    padded[1, :, :, 4:] = True  # padded queries still see the real tokens: no empty rows
    for mask, masked in ((None, causal.expand(BATCH, 1, SEQ, SEQ)), (padded, padded)):
        out = launch(workers.attention_worker, 1, args=(hf_tiny.config_dict("qwen2"), q, k, v, mask))[0]
        want = _reference(q, k, v, masked)
        torch.testing.assert_close(out["sdpa"], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["local"], want, atol=1e-5, rtol=1e-5)


SEGMENTS = [5, 1, 9, 3, 9, 2]  # lengths of packed rows: mixed, repeated, and a single token


def _segment_reference(q, k, v):
    """Plain causal attention of one segment: q [n, h, d], k/v [n, g, d] -> [n, h * d]."""
    n = q.shape[0]
    k = k.repeat_interleave(HEADS // GROUPS, dim=1)
    v = v.repeat_interleave(HEADS // GROUPS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(DIM)
    hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(n, HEADS * DIM)


def _packed_worker(hf_config: dict, q, k, v, g_out) -> dict:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from hpt_megatron.distributed import init_parallel
    from hpt_megatron.models import arch_config_from_hf
    from hpt_megatron.models.attention import SDPACoreAttention
    from hpt_megatron.models.gpt import transformer_config

    init_parallel(1, 1)
    config = transformer_config(arch_config_from_hf(hf_config), 1, 1, torch.float32, "sdpa")
    attn = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    cu = torch.tensor([0, *torch.tensor(SEGMENTS).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max(SEGMENTS),
        max_seqlen_kv=max(SEGMENTS),
    )
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attn(*leaves, None, packed_seq_params=params)
    out.backward(g_out)
    return {"out": out.detach(), "grads": [t.grad for t in leaves]}


def test_packed_rows_attend_only_within_themselves():
    """thd input: each segment's output and the q/k/v gradients equal plain causal attention run on
    that segment alone (no mask is built; a leak across rows would change both)."""
    g = torch.Generator().manual_seed(1)
    t = sum(SEGMENTS)
    q = torch.randn(t, HEADS, DIM, generator=g)
    k, v = (torch.randn(t, GROUPS, DIM, generator=g) for _ in range(2))
    g_out = torch.randn(t, HEADS * DIM, generator=g)
    got = launch(_packed_worker, 1, args=(hf_tiny.config_dict("qwen2"), q, k, v, g_out))[0]
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    bounds = torch.tensor([0, *SEGMENTS]).cumsum(0).tolist()
    want = torch.cat([_segment_reference(*(x[a:b] for x in leaves)) for a, b in itertools.pairwise(bounds)])
    want.backward(g_out)
    torch.testing.assert_close(got["out"], want.detach(), atol=1e-5, rtol=1e-5)
    for name, mine, ref in zip("qkv", got["grads"], leaves):
        torch.testing.assert_close(mine, ref.grad, atol=1e-5, rtol=1e-5, msg=name)
