"""The streaming safetensors writer produces files the safetensors library reads back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hpt_megatron.convert.hf_io import HFReader, HFShardWriter
from hpt_megatron.convert.safetensors_stream import StreamingSafetensorsWriter, TensorSpec


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "w": torch.randn(3, 5),
        "b16": torch.randn(7).bfloat16(),
        "h": torch.randn(2, 2).half(),
        "step": torch.tensor(3.0),
        "ids": torch.arange(4),
        "mask": torch.tensor([True, False]),
        "view": torch.randn(6, 4)[:, 1],  # non-contiguous
    }


def test_round_trip_through_safetensors(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    with StreamingSafetensorsWriter(path, [TensorSpec.of(n, t) for n, t in tensors.items()], {"k": "v"}) as w:
        for t in tensors.values():
            w.write(t)
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}


def test_wrong_tensor_or_missing_tensor(tmp_path):
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (3,), torch.float32)]
    writer = StreamingSafetensorsWriter(tmp_path / "x", specs)
    with pytest.raises(ValueError, match=r"a declared \[2\] torch.float32, got \[3\]"):
        writer.write(torch.zeros(3))
    writer.file.close()
    w = StreamingSafetensorsWriter(tmp_path / "y", specs)
    w.write(torch.zeros(2))
    with pytest.raises(ValueError, match=r"1 declared tensors never written: \['b'\]"):
        w.close()


def test_hf_shard_writer_splits_and_indexes(tmp_path):
    tensors = {f"t{i}": torch.randn(256) for i in range(5)}  # 1 KiB each
    writer = HFShardWriter(tmp_path, [TensorSpec.of(n, t) for n, t in tensors.items()], max_bytes=2048)
    for t in tensors.values():
        writer.write(t)
    writer.close()
    assert len(list(tmp_path.glob("model-*-of-00003.safetensors"))) == 3
    reader = HFReader(tmp_path)
    assert all(torch.equal(reader.get(n), t) for n, t in tensors.items())
