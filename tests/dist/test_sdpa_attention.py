"""SDPACoreAttention equals Megatron's local DotProductAttention and a hand-written attention (GQA)."""

from __future__ import annotations

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
