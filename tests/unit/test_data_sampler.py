"""The resumable prompt sampler: per-epoch shuffles, exact resume, settings checks."""

from __future__ import annotations

import copy
import json
from itertools import islice

import pytest

from hpt_megatron.data.sampler import PromptSampler


def take(sampler, n):
    return list(islice(sampler, n))


def flat(batches):
    return [i for batch in batches for i in batch]


def test_each_epoch_is_a_fresh_permutation():
    sampler = PromptSampler(10, batch_size=5, seed=3)
    epochs = [flat(take(sampler, 2)) for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert sampler.epoch == 2 and sampler.batches_per_epoch == 2


def test_order_depends_only_on_seed():
    assert take(PromptSampler(50, batch_size=7, seed=1), 20) == take(
        PromptSampler(50, batch_size=7, seed=1), 20
    )
    assert take(PromptSampler(50, batch_size=7, seed=1), 5) != take(
        PromptSampler(50, batch_size=7, seed=2), 5
    )


def test_drop_last_and_partial_batches():
    sampler = PromptSampler(10, batch_size=4, seed=0)
    assert [len(b) for b in take(sampler, 5)] == [4, 4, 4, 4, 4]  # the 2 leftovers of each epoch are skipped
    sampler = PromptSampler(10, batch_size=4, seed=0, drop_last=False)
    batches = take(sampler, 6)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(flat(batches[:3])) == list(range(10))
    unshuffled = PromptSampler(5, batch_size=2, shuffle=False, drop_last=False)
    assert take(unshuffled, 3) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("consumed", [0, 1, 3, 4, 9])
def test_resume_sees_exactly_the_same_prompts(consumed):
    reference = PromptSampler(23, batch_size=4, seed=7)
    expected = take(reference, 15)

    first = PromptSampler(23, batch_size=4, seed=7)
    seen = take(first, consumed)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip as plain data
    resumed = PromptSampler(23, batch_size=4, seed=7)
    resumed.load_state_dict(copy.deepcopy(state))
    assert seen + take(resumed, 15 - consumed) == expected


def test_resume_refuses_different_settings():
    sampler = PromptSampler(20, batch_size=4, seed=0)
    take(sampler, 2)
    other = PromptSampler(21, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="saved with num_examples=20 but this run has num_examples=21"):
        other.load_state_dict(sampler.state_dict())


def test_bad_settings():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        PromptSampler(3, batch_size=4)
    with pytest.raises(ValueError, match="batch_size=0"):
        PromptSampler(3, batch_size=0)
