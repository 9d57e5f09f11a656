"""Lazy reading and size-bounded writing of Hugging Face safetensors checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


class HFReader:
    """name -> tensor access over the safetensors files of a HF model directory, read lazily."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = self._index()
        self._handles: dict[Path, object] = {}

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
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]


class HFShardWriter:
    """Collect tensors and write ``model-XXXXX-of-YYYYY.safetensors`` files of at most ``max_bytes``.

    Call :meth:`add` per tensor and :meth:`close` at the end (writes the index json).
    """

    def __init__(self, directory: str | Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_bytes:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f"part-{len(self.written):05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> None:
        if self.buffer or not self.written:
            self._flush()
        n = len(self.written)
        weight_map = {}
        for k, (path, names) in enumerate(self.written):
            final = self.directory / (SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors")
            os.rename(path, final)
            weight_map.update({name: final.name for name in names})
        if n > 1:
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
