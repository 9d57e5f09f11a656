"""Write safetensors files one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once and serialises them into one more
buffer, so peak memory is about twice the file. A safetensors file is an 8-byte header length, a JSON
header (name -> dtype, shape, byte offsets) and the raw bytes; when names, shapes and dtypes are known
in advance (they are: from the config, or from the live parameters) the header can be written first
and each tensor streamed after it, so peak memory is one tensor.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a tensor to be written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, tuple(tensor.shape), tensor.dtype)


class StreamingSafetensorsWriter:
    """Write ``path`` tensor by tensor, in the order of ``specs``; the file is complete on ``close``.

    Raises:
        ValueError: a tensor arrives out of order or with another shape / dtype than its spec, or
            ``close`` is called before every tensor was written.
    """

    def __init__(self, path: str | Path, specs: list[TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.specs = specs
        self.next = 0
        self.file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self.file.write(_header(specs, metadata))

    def write(self, tensor: torch.Tensor) -> None:
        if self.next >= len(self.specs):
            raise ValueError(f"{self.path}: more tensors written than the {len(self.specs)} declared")
        spec = self.specs[self.next]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{self.path}: {spec.name} declared {list(spec.shape)} {spec.dtype}, "
                f"got {list(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()))
        self.next += 1

    def close(self) -> None:
        """Flush and fsync; raises if tensors are missing (the file is then left incomplete)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.next != len(self.specs):
            missing = [s.name for s in self.specs[self.next :]]
            raise ValueError(f"{self.path}: {len(missing)} declared tensors never written: {missing[:5]}")

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.file.close()


def _header(specs: list[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names: {sorted({n for n in names if names.count(n) > 1})}")
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for spec in specs:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        end = offset + spec.nbytes
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw
