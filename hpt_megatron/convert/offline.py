"""Offline conversion between HF checkpoints and the sharded Megatron format, in one process.

Both directions stream one tensor at a time: output files are planned from the config (names, shapes,
dtypes), their headers written first and each tensor appended as it is made, so peak memory is about
one full tensor (the embedding) plus its pieces, whatever the model size. No process group is needed.
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
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
from hpt_megatron.convert.safetensors_stream import TensorSpec
from hpt_megatron.convert.sharded import (
    ShardedReader,
    ShardLayout,
    atomic_directory,
    read_layout,
    shard_shape,
    shard_tensor,
    shard_writer,
    write_layout,
)
from hpt_megatron.models.arch import ArchConfig, arch_config_from_hf, check_parallel_layout

HF_SUBDIR = "hf"  # config.json, generation config and tokenizer files kept inside a Megatron checkpoint
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
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
            specs = _rank_specs(stage, reader, arch, tp, dtype)  # the same shapes on every TP rank
            with ExitStack() as files:
                writers = [
                    files.enter_context(shard_writer(tmp, specs, rules, r, pp_rank)) for r in range(tp)
                ]
                for bound, spec in zip(stage, specs):
                    # read and convert each HF tensor once, then write every TP rank's slice of it
                    full = bound.to_megatron(
                        [reader.get(h) for h in bound.hf], arch, arch.padded_vocab_size(tp)
                    )
                    for tp_rank, writer in enumerate(writers):
                        writer.write(shard_tensor(full, bound.split, tp, tp_rank).to(spec.dtype))
                        bar.update()
    return output_dir


def _rank_specs(
    stage: list[BoundTensor], reader: HFReader, arch: ArchConfig, tp: int, dtype
) -> list[TensorSpec]:
    """Name, shape and dtype of every tensor of one rank's shard file."""
    shapes, padded = hf_shapes(arch), arch.padded_vocab_size(tp)
    return [
        TensorSpec(
            bound.megatron,
            shard_shape(megatron_shape(bound, arch, padded, shapes), bound.split, tp),
            dtype or reader.dtype(bound.hf[0]),
        )
        for bound in stage
    ]


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
    shapes = hf_shapes(arch)
    specs = [TensorSpec(n, shapes[n], dtype or reader.dtype(b.megatron)) for b in tensors for n in b.hf]
    with atomic_directory(output_dir, overwrite) as tmp:
        writer = HFShardWriter(tmp, specs, max_shard_bytes)
        by_name = {s.name: s for s in specs}
        for bound in tqdm(tensors, desc="megatron->hf", disable=not progress):
            for name, tensor in _export_one(reader, bound, arch, layout, shapes):
                writer.write(tensor.to(by_name[name].dtype))
        writer.close()
        write_config(arch.hf_config, tmp, specs[0].dtype)
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


def _export_one(
    reader: ShardedReader, bound: BoundTensor, arch: ArchConfig, layout: ShardLayout, shapes: dict
):
    full = reader.full(bound.megatron)
    want = megatron_shape(bound, arch, layout.padded_vocab_size, shapes)
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
