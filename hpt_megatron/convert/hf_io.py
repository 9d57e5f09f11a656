"""Lazy reading and size-bounded writing of Hugging Face safetensors checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from hpt_megatron.convert.safetensors_stream import SAFETENSORS_DTYPES, StreamingSafetensorsWriter, TensorSpec

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied verbatim between HF directories and the hf/ folder of a Megatron checkpoint.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


class HFReader:
    """name -> tensor access over the safetensors files of a HF model directory, read lazily."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = self._index()

    def _index(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            return {name: self.directory / file for name, file in weight_map.items()}
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ValueError(
                f"{self.directory}: no *.safetensors files (only safetensors checkpoints are read)"
            )
        out = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                out.update({name: path for name in f.keys()})  # noqa: SIM118 (not a dict)
        return out

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return _TORCH_DTYPES[f.get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        # Open per read: a handle kept open keeps every page it touched mapped (and counted in RSS).
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into files of at most ``max_bytes`` (a larger tensor gets its own)."""
    files: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if files[-1] and size + spec.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(spec)
        size += spec.nbytes
    return files


class HFShardWriter:
    """Stream tensors into ``model-XXXXX-of-YYYYY.safetensors`` files of at most ``max_bytes``.

    The files are planned from ``specs`` up front, so each tensor is written as it arrives (in spec
    order) and nothing is buffered. :meth:`close` writes the index json (when there are several files).
    """

    def __init__(self, directory: str | Path, specs: list[TensorSpec], max_bytes: int):
        self.directory = Path(directory)
        self.files = plan_shards(specs, max_bytes)
        self.total_bytes = sum(s.nbytes for s in specs)
        self.file_index = -1
        self.left_in_file = 0
        self.writer: StreamingSafetensorsWriter | None = None

    def file_name(self, k: int) -> str:
        n = len(self.files)
        return SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"

    def write(self, tensor: torch.Tensor) -> None:
        if self.left_in_file == 0:
            self._next_file()
        self.writer.write(tensor)
        self.left_in_file -= 1

    def _next_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.file_index += 1
        if self.file_index >= len(self.files):
            raise ValueError(f"{self.directory}: more tensors written than planned")
        specs = self.files[self.file_index]
        path = self.directory / self.file_name(self.file_index)
        self.writer = StreamingSafetensorsWriter(path, specs, {"format": "pt"})
        self.left_in_file = len(specs)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.file_index != len(self.files) - 1 or self.left_in_file:
            raise ValueError(f"{self.directory}: fewer tensors written than planned")
        if len(self.files) > 1:
            weight_map = {s.name: self.file_name(k) for k, specs in enumerate(self.files) for s in specs}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            with open(self.directory / INDEX_FILE, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy generation config and tokenizer files present in ``src``; return their names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_config(config: dict, directory: str | Path, dtype: torch.dtype | None) -> None:
    """Write ``config.json``, recording ``dtype`` under the key(s) transformers reads."""
    config = dict(config)
    if dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = DTYPE_NAMES[dtype]
    with open(Path(directory) / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
