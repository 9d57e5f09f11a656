"""The weight-sync wire format (flat buffer + manifest of plain lists), without vLLM."""

from __future__ import annotations

import os

import pytest
import torch

from hpt_megatron.rollout.vllm_sync import SharedBucket, map_bucket, pack_bucket, unpack_bucket


def bucket():
    g = torch.Generator().manual_seed(0)
    return [
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 6, generator=g)),
        ("model.norm.weight", torch.randn(5, generator=g).to(torch.bfloat16)),
        ("odd.int", torch.arange(7, dtype=torch.int64)),
        ("scalar", torch.tensor(3.5, dtype=torch.float16)),
        ("noncontiguous", torch.randn(4, 6, generator=g).t()),
    ]


def test_round_trip_keeps_names_shapes_dtypes_and_bits():
    b = bucket()
    flat, entries = pack_bucket(b)
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    assert all(isinstance(x, (str, list, int)) for e in entries for x in e)  # plain values only
    assert all(e[3] % 64 == 0 for e in entries)  # aligned offsets
    out = unpack_bucket(flat, entries)
    assert [n for n, _ in out] == [n for n, _ in b]
    for (_, want), (_, got) in zip(b, out):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def test_shared_bucket_is_mapped_by_path_and_removed_after_use():
    b = bucket()
    with SharedBucket(b) as shared:
        assert os.path.getsize(shared.path) >= shared.nbytes
        got = unpack_bucket(map_bucket(shared.path, shared.nbytes), shared.entries)
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(got, b))
        path = shared.path
    assert not os.path.exists(path)
    with pytest.raises(ValueError, match="missing or shorter"):
        map_bucket(path, 10)


def test_a_manifest_that_does_not_fit_the_buffer_is_refused():
    flat, entries = pack_bucket(bucket())
    with pytest.raises(ValueError, match=r"'odd.int' \(56 bytes at offset \d+\) overruns its bucket"):
        unpack_bucket(flat[: entries[2][3] + 8], entries[:3])
    with pytest.raises(ValueError, match="unknown dtype 'float33'"):
        unpack_bucket(flat, [["x", [2], "float33", 0]])
    with pytest.raises(ValueError, match="1-D uint8 tensor"):
        unpack_bucket(flat.view(torch.int32), entries)
