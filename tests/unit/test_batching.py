"""Micro-batching by token budget, data-parallel splits, packing."""

from __future__ import annotations

import torch

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


def test_pack_masks_across_rows_and_unpacks_targets():
    b = build_train_batch([([1, 2, 3], 1), ([4, 5], 1)], source=[0, 0], coef=[1.0, 1.0])
    p = pack(b)
    assert p.tokens_1N.tolist() == [[1, 2, 3, 4, 5]] and p.position_ids_1N.tolist() == [[0, 1, 2, 0, 1]]
    allowed = ~p.mask_11NN[0, 0]
    assert allowed[3].tolist() == [False, False, False, True, False]  # row 1 sees only itself
    assert allowed[2].tolist() == [True, True, True, False, False]
    vals = torch.arange(5.0)[None]
    assert unpack_targets(vals, p, 2).tolist() == [[0.0, 1.0], [3.0, 0.0]]


def test_padded_mask_hides_padding_keys():
    b = build_train_batch([([1, 2, 3], 1), ([4, 5], 1)], source=[0, 0], coef=[1.0, 1.0])
    m = padded_causal_mask(b)
    assert m.shape == (2, 1, 3, 3)
    assert (~m[1, 0, 2]).tolist() == [True, True, False]
