"""GPU check (skipped without CUDA): packed bf16 attention through torch's varlen flash kernel
equals plain causal attention run on each packed row alone."""

from __future__ import annotations

import itertools

import pytest
import torch

from hpt_megatron.distributed import launch
from hpt_megatron.models.attention import HAVE_VARLEN
from tests import hf_tiny
from tests.dist import test_sdpa_attention as cpu_test

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not HAVE_VARLEN, reason="this torch has no torch.nn.attention.varlen"),
]


def _varlen_worker(hf_config: dict, q, k, v) -> torch.Tensor:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from hpt_megatron.distributed import init_parallel
    from hpt_megatron.models import arch_config_from_hf
    from hpt_megatron.models.attention import SDPACoreAttention, _use_varlen
    from hpt_megatron.models.gpt import transformer_config

    init_parallel(1, 1)
    config = transformer_config(arch_config_from_hf(hf_config), 1, 1, torch.bfloat16, "sdpa")
    attn = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    cu = torch.tensor([0, *torch.tensor(cpu_test.SEGMENTS).cumsum(0).tolist()], dtype=torch.int32).cuda()
    longest = max(cpu_test.SEGMENTS)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )
    q, k, v = (t.cuda().bfloat16() for t in (q, k, v))
    assert _use_varlen(q, dropout=False)
    with torch.no_grad():
        return attn(q, k, v, None, packed_seq_params=params).float().cpu()


def test_varlen_packed_attention_matches_each_row_alone():
    g = torch.Generator().manual_seed(2)
    t = sum(cpu_test.SEGMENTS)
    q = torch.randn(t, cpu_test.HEADS, cpu_test.DIM, generator=g)
    k, v = (torch.randn(t, cpu_test.GROUPS, cpu_test.DIM, generator=g) for _ in range(2))
    got = launch(_varlen_worker, 1, args=(hf_tiny.config_dict("qwen2"), q, k, v))[0]
    bounds = [0, *torch.tensor(cpu_test.SEGMENTS).cumsum(0).tolist()]
    want = torch.cat(
        [cpu_test._segment_reference(q[a:b], k[a:b], v[a:b]) for a, b in itertools.pairwise(bounds)]
    )
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)  # bf16 inputs and kernel
