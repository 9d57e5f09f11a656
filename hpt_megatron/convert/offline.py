"""Offline conversion between HF checkpoints and the sharded Megatron format, in one process.

Both directions stream: HF -> Megatron builds one rank file at a time (peak memory ~ one rank's shard
plus one layer), Megatron -> HF rebuilds one full tensor at a time and writes HF shards of bounded
size. No process group is needed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from hpt_megatron.convert.checkpoint import checkpoint_layout
from hpt_megatron.convert.hf_io import HFReader, HFShardWriter, copy_side_files, write_config
from hpt_megatron.convert.mapping import (
    BoundTensor,
    hf_shapes,
    iter_tensors,
    megatron_shape,
    split_rules,
    stage_tensors,
)
from hpt_megatron.convert.sharded import (
    ShardedReader,
    ShardLayout,
    atomic_directory,
    read_layout,
    save_sharded,
    shard_tensor,
    write_layout,
)
from hpt_megatron.models.arch import ArchConfig, arch_config_from_hf, check_parallel_layout

HF_SUBDIR = "hf"  # config.json, generation config and tokenizer files kept inside a Megatron checkpoint
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# HF tensors that may be present but carry nothing to convert.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_to_megatron(
    hf_dir: str | Path,
    output_dir: str | Path,
    tp: int,
    pp: int,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a HF checkpoint into a sharded Megatron checkpoint split ``tp`` x ``pp`` ways.

    Args:
        dtype: output dtype (default: keep the checkpoint's).

    Raises:
        ValueError: unsupported architecture, a layout that does not divide the model, a missing /
            unexpected tensor or a shape mismatch, or ``output_dir`` exists without ``overwrite``.
    """
    hf_dir, output_dir = Path(hf_dir), Path(output_dir)
    arch = arch_config_from_hf(hf_dir)
    check_parallel_layout(arch, tp, pp)
    _check_output(output_dir, overwrite)
    reader = HFReader(hf_dir)
    check_hf_tensors(reader, arch)
    padded = arch.padded_vocab_size(tp)
    rules = split_rules(arch, pp)
    total = sum(len(stage_tensors(arch, pp, s)) for s in range(pp)) * tp
    with (
        atomic_directory(output_dir, overwrite) as tmp,
        tqdm(total=total, desc="hf->megatron", disable=not progress) as bar,
    ):
        write_layout(tmp, checkpoint_layout(arch, tp, pp))
        _copy_hf_side_files(hf_dir, tmp / HF_SUBDIR)
        for pp_rank in range(pp):
            stage = stage_tensors(arch, pp, pp_rank)
            for tp_rank in range(tp):
                shards = {}
                for bound in stage:
                    full = bound.to_megatron([reader.get(h) for h in bound.hf], arch, padded)
                    shards[bound.megatron] = shard_tensor(full, bound.split, tp, tp_rank).to(
                        dtype or full.dtype
                    )
                    bar.update()
                save_sharded(tmp, shards, rules, tp_rank, pp_rank)
    return output_dir


def megatron_to_hf(
    megatron_dir: str | Path,
    output_dir: str | Path,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Convert a sharded Megatron checkpoint (any TP/PP) into a HF directory.

    Writes sharded safetensors (+ index json), ``config.json``, and the generation config and
    tokenizer files kept in the checkpoint's ``hf/`` folder. Vocab padding rows are dropped.
    """
    megatron_dir, output_dir = Path(megatron_dir), Path(output_dir)
    layout = read_layout(megatron_dir)
    arch = arch_from_layout(layout, megatron_dir)
    _check_output(output_dir, overwrite)
    reader = ShardedReader(megatron_dir, "model")
    check_megatron_tensors(reader, arch, layout)
    tensors = list(iter_tensors(arch))
    out_dtype = dtype
    with atomic_directory(output_dir, overwrite) as tmp:
        writer = HFShardWriter(tmp, max_shard_bytes)
        for bound in tqdm(tensors, desc="megatron->hf", disable=not progress):
            for name, tensor in _export_one(reader, bound, arch, layout):
                out_dtype = out_dtype or tensor.dtype
                writer.add(name, tensor.to(out_dtype).clone(memory_format=torch.contiguous_format))
        writer.close()
        write_config(arch.hf_config, tmp, out_dtype)
        copy_side_files(megatron_dir / HF_SUBDIR, tmp)
    return output_dir


def arch_from_layout(layout: ShardLayout, directory: str | Path) -> ArchConfig:
    """The ArchConfig stored in a checkpoint's ``layout.json``."""
    extra = layout.extra or {}
    if "hf_config" not in extra:
        raise ValueError(
            f"{directory}/layout.json: no 'hf_config' in 'extra'; cannot rebuild the model config"
        )
    divisor = extra.get("arch", {}).get("make_vocab_size_divisible_by", 128)
    return arch_config_from_hf(extra["hf_config"], divisor, label=f"{directory}/layout.json")


def check_hf_tensors(reader: HFReader, arch: ArchConfig) -> None:
    """Raise ValueError on missing / unexpected HF tensors or shapes that disagree with the config."""
    expected = hf_shapes(arch)
    present = {n for n in reader.names() if not n.endswith(_IGNORED_SUFFIXES)}
    if arch.tie_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store the copy anyway
    where = f"{reader.directory} ({arch.architecture})"
    _check_names(where, expected, present)
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise ValueError(
                f"{where}: shape mismatch for {name}: checkpoint has {list(reader.shape(name))}, "
                f"config.json implies {list(shape)}"
            )


def check_megatron_tensors(reader: ShardedReader, arch: ArchConfig, layout: ShardLayout) -> None:
    """Raise ValueError on missing / unexpected tensors of a sharded checkpoint."""
    _check_names(f"{reader.directory}/{reader.prefix}", split_rules(arch, layout.pp), set(reader.names()))


def _check_names(where: str, expected, present: set[str]) -> None:
    missing = [n for n in expected if n not in present]
    unexpected = sorted(present - set(expected))
    if missing:
        raise ValueError(f"{where}: missing tensors {_short(missing)}")
    if unexpected:
        raise ValueError(f"{where}: unexpected tensors {_short(unexpected)}")


def _short(names: list[str], n: int = 8) -> str:
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return f"{names[:n]}{more}"


def _export_one(reader: ShardedReader, bound: BoundTensor, arch: ArchConfig, layout: ShardLayout):
    full = reader.full(bound.megatron)
    want = megatron_shape(bound, arch, layout.padded_vocab_size)
    if tuple(full.shape) != want:
        raise ValueError(
            f"{reader.directory}: shape mismatch for {bound.megatron}: checkpoint has {list(full.shape)}, "
            f"config implies {list(want)}"
        )
    return bound.to_hf(full, arch)


def _check_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not overwrite:
        raise ValueError(f"{output_dir} already exists; pass --overwrite or choose another output directory")


def _copy_hf_side_files(hf_dir: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(hf_dir / "config.json", dst / "config.json")
    copy_side_files(hf_dir, dst)
