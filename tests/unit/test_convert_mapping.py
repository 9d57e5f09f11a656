"""Layout transforms (fused QKV, gated fc1, vocab padding) and TP split rules, against explicit loops."""

from __future__ import annotations

import pytest
import torch

from hpt_megatron.convert.mapping import (
    fuse_qkv,
    hf_shapes,
    iter_tensors,
    pad_vocab,
    split_qkv,
    stage_tensors,
)
from hpt_megatron.convert.sharded import SPLIT_RULES, merge_shards, resize_vocab, shard_tensor
from hpt_megatron.models import arch_config_from_hf
from tests.hf_tiny import config_dict


@pytest.fixture(scope="module")
def arch():
    return arch_config_from_hf(config_dict("qwen2"))  # 4 heads, 2 KV heads, head dim 16


def _rows(t: torch.Tensor, head: int, d: int) -> torch.Tensor:
    return t[head * d : (head + 1) * d]


@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_is_grouped_per_kv_head(arch, bias):
    h, d, nh, ng = arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads
    extra = () if bias else (h,)
    q, k, v = torch.randn(nh * d, *extra), torch.randn(ng * d, *extra), torch.randn(ng * d, *extra)
    expected = []
    for g in range(ng):
        for j in range(nh // ng):
            expected.append(_rows(q, g * (nh // ng) + j, d))
        expected += [_rows(k, g, d), _rows(v, g, d)]
    fused = fuse_qkv(q, k, v, arch)
    assert torch.equal(fused, torch.cat(expected))
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, arch), (q, k, v)))


def test_glu_rule_gives_each_rank_its_gate_and_up():
    gate, up = torch.arange(8.0).reshape(8, 1), 100 + torch.arange(8.0).reshape(8, 1)
    full = torch.cat([gate, up])
    shards = [shard_tensor(full, "glu", 2, r) for r in range(2)]
    assert torch.equal(shards[0], torch.cat([gate[:4], up[:4]]))
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))
    assert torch.equal(merge_shards(shards, "glu"), full)


@pytest.mark.parametrize("rule", SPLIT_RULES)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_split_rules_round_trip(rule, tp):
    full = torch.randn(16, 8)
    shards = [shard_tensor(full, rule, tp, r) for r in range(tp)]
    assert torch.equal(merge_shards(shards, rule), full)
    if rule == "row":
        assert shards[0].shape == (16, 8 // tp)
    elif rule != "replicated":
        assert shards[0].shape == (16 // tp, 8)


def test_vocab_padding_and_resize():
    t = torch.randn(300, 4)
    padded = pad_vocab(t, 384)
    assert padded.shape == (384, 4) and torch.equal(padded[:300], t) and not padded[300:].any()
    assert torch.equal(resize_vocab(padded, 512)[:384], padded) and resize_vocab(padded, 512).shape[0] == 512
    assert torch.equal(resize_vocab(padded, 300), t)


def test_tied_last_stage_holds_output_layer_copy():
    tied = arch_config_from_hf(config_dict("qwen2_tied"))
    last = {t.megatron for t in stage_tensors(tied, 2, 1)}
    assert "output_layer.weight" in last and "embedding.word_embeddings.weight" not in last
    assert "output_layer.weight" not in {t.megatron for t in stage_tensors(tied, 1, 0)}
    assert "lm_head.weight" not in hf_shapes(tied)


def test_stages_partition_the_layers(arch):
    names = [t.megatron for s in range(2) for t in stage_tensors(arch, 2, s)]
    assert sorted(names) == sorted(t.megatron for t in iter_tensors(arch))
    assert "decoder.layers.2.mlp.linear_fc1.weight" in {t.megatron for t in stage_tensors(arch, 2, 1)}
