"""Micro-batching by token budget, data-parallel splits, packing."""

from __future__ import annotations

import torch

from hpt_megatron.models.attention import build_segment_plan, group_segments
from hpt_megatron.train.batching import (
    build_train_batch,
    micro_batches,
    pack,
    padded_causal_mask,
    split_for_data_parallel,
    unpack_targets,
)

LENGTHS = [5, 17, 3, 9, 9, 30, 2, 11]


def test_micro_batches_respect_the_budget_and_cover_every_row_once():
    for packed in (True, False):
        for budget in (1, 10, 31, 64, 1000):
            groups = micro_batches(LENGTHS, budget, packed)
            flat = sorted(i for g in groups for i in g)
            assert flat == list(range(len(LENGTHS)))
            for g in groups:
                cost = sum(LENGTHS[i] for i in g) if packed else len(g) * max(LENGTHS[i] for i in g)
                assert cost <= budget or len(g) == 1


def test_data_parallel_split_balances_tokens():
    parts = split_for_data_parallel(LENGTHS, 2)
    assert sorted(i for p in parts for i in p) == list(range(len(LENGTHS)))
    loads = [sum(LENGTHS[i] for i in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= max(LENGTHS)
    assert split_for_data_parallel(LENGTHS, 1) == [list(range(len(LENGTHS)))]


def test_loss_mask_marks_response_targets():
    b = build_train_batch([([1, 2, 3, 4, 5], 2), ([7, 8, 9], 1)], source=[0, 2], coef=[1.0, 0.5])
    # row 0: prompt [1, 2], response [3, 4, 5] -> targets at positions 1, 2, 3
    assert b.loss_mask_BT.tolist() == [[0, 1, 1, 1], [1, 1, 0, 0]]
    sub = b.select([1])
    assert sub.tokens_BL.tolist() == [[7, 8, 9]] and sub.loss_mask_BT.tolist() == [[1, 1]]


def test_packed_micro_batches_are_first_fit_decreasing():
    # next-fit would need 3 micro-batches ([6], [5, 4], [3, 2]); first-fit puts the 4 next to the 6
    groups = micro_batches([6, 5, 4, 3, 2], 10, packed=True)
    assert sorted(sorted(g) for g in groups) == [[0, 2], [1, 3, 4]]


def test_pack_concatenates_rows_with_boundaries_and_unpacks_targets():
    b = build_train_batch([([1, 2, 3], 1), ([4, 5], 1)], source=[0, 0], coef=[1.0, 1.0])
    p = pack(b)
    assert p.tokens_1N.tolist() == [[1, 2, 3, 4, 5]] and p.position_ids_1N.tolist() == [[0, 1, 2, 0, 1]]
    assert p.cu_seqlens.tolist() == [0, 3, 5] and p.cu_seqlens.dtype == torch.int32
    assert p.max_length == 3 and p.starts == [0, 3]
    vals = torch.arange(5.0)[None]
    assert unpack_targets(vals, p, 2).tolist() == [[0.0, 1.0], [3.0, 0.0]]


def test_segment_groups_bound_the_padding():
    for ratio in (1.0, 1.5, 4.0):
        groups = group_segments(LENGTHS, ratio)
        assert sorted(i for g in groups for i in g) == list(range(len(LENGTHS)))
        for g in groups:
            real = sum(LENGTHS[i] for i in g)
            assert len(g) * max(LENGTHS[i] for i in g) <= ratio * real or len(g) == 1
    assert group_segments([4, 4, 4], 1.0) == [[0, 1, 2]]  # equal lengths: one batch, no padding


def test_segment_plan_slots_invert_and_pad_after_each_row():
    """Every packed token comes back from its own slot, and each padded row holds one segment's
    tokens in order followed by padding (repeats of its last token, flagged), i.e. after every
    real key."""
    cu = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    plan = build_segment_plan(cu, "cpu")
    assert torch.equal(plan.slot_token[plan.token_slot], torch.arange(cu[-1]))
    assert sum(g * m for _, g, m in plan.groups) == len(plan.slot_token) == len(plan.is_pad)
    assert int((~plan.is_pad).sum()) == cu[-1] and not plan.is_pad[plan.token_slot].any()
    for offset, g, m in plan.groups:
        rows = plan.slot_token[offset : offset + g * m].view(g, m).tolist()
        pads = plan.is_pad[offset : offset + g * m].view(g, m).tolist()
        for row, pad in zip(rows, pads):
            start, n = row[0], LENGTHS[cu.index(row[0])]
            assert row == list(range(start, start + n)) + [start + n - 1] * (m - n)
            assert pad == [False] * n + [True] * (m - n)


def test_padded_mask_hides_padding_keys():
    b = build_train_batch([([1, 2, 3], 1), ([4, 5], 1)], source=[0, 0], coef=[1.0, 1.0])
    m = padded_causal_mask(b)
    assert m.shape == (2, 1, 3, 3)
    assert (~m[1, 0, 2]).tolist() == [True, True, False]
