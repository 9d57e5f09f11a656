"""The on-disk sharded checkpoint format (safetensors + json, no pickle).

Directory layout::

    CKPT/
      layout.json                        # format, version, tp, pp, vocab sizes, architecture, extras
      <prefix>/tp00-pp00.safetensors     # one file per (tp_rank, pp_rank): that rank's local shards
      <prefix>/tp01-pp00.safetensors
      ...

``prefix`` groups tensors that share names: ``model`` for parameters, ``optim/exp_avg`` and
``optim/exp_avg_sq`` for Adam moments (same names and shapes as the parameters), and so on. Tensor names
are *canonical* (global layer indices, see ``mapping.py``), so a name means the same tensor under any
layout. Each file's safetensors header metadata records, per tensor, its split rule:

- ``replicated``: every TP rank holds the full tensor (norm weights, scalars);
- ``column`` / ``row``: TP shards are contiguous chunks of dim 0 / dim 1;
- ``glu``: dim 0 is ``[gate; up]``; TP rank r holds ``[gate_r; up_r]``;
- ``vocab``: chunks of dim 0 of the vocab padded to ``padded_vocab_size`` (padding rows are zeros
  after import; on a layout change the rows beyond the true vocab are dropped or zero-filled).

Loading at a different TP/PP rebuilds one full tensor at a time from the source shards and slices the
target rank's part (:class:`ShardedReader`). Saving is atomic: everything is written into a temporary
sibling directory, fsynced, then renamed (:func:`atomic_directory`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from hpt_megatron.convert.safetensors_stream import SAFETENSORS_DTYPES, StreamingSafetensorsWriter, TensorSpec

_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
FORMAT_NAME = "hpt_megatron.sharded"
FORMAT_VERSION = 1
LAYOUT_FILE = "layout.json"
SPLIT_RULES = ("replicated", "column", "row", "glu", "vocab")


@dataclass(frozen=True)
class ShardLayout:
    """Global description of a sharded checkpoint (``layout.json``).

    ``extra`` holds what the writer wants to keep next to it (architecture summary, HF config, ...).
    """

    tp: int
    pp: int
    vocab_size: int
    padded_vocab_size: int
    architecture: str = ""
    extra: dict | None = None

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **asdict(self)}


def shard_file(directory: str | Path, prefix: str, tp_rank: int, pp_rank: int) -> Path:
    return Path(directory) / prefix / f"tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


# ----------------------------------------------------------------------------------------------
# Split rules
# ----------------------------------------------------------------------------------------------


def shard_tensor(full: torch.Tensor, rule: str, tp: int, tp_rank: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s part of ``full`` under ``rule`` (a view where possible)."""
    if rule == "replicated" or tp == 1:
        return full
    if rule in ("column", "vocab"):
        return torch.chunk(full, tp, dim=0)[tp_rank]
    if rule == "row":
        return torch.chunk(full, tp, dim=1)[tp_rank]
    if rule == "glu":
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp, dim=0)[tp_rank], torch.chunk(up, tp, dim=0)[tp_rank]])
    raise ValueError(f"unknown split rule {rule!r}; known: {SPLIT_RULES}")


def merge_shards(shards: list[torch.Tensor], rule: str) -> torch.Tensor:
    """Inverse of :func:`shard_tensor` over all TP ranks (in rank order)."""
    if rule == "replicated" or len(shards) == 1:
        return shards[0]
    if rule in ("column", "vocab"):
        return torch.cat(shards, dim=0)
    if rule == "row":
        return torch.cat(shards, dim=1)
    if rule == "glu":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown split rule {rule!r}; known: {SPLIT_RULES}")


def resize_vocab(full: torch.Tensor, padded: int) -> torch.Tensor:
    """Truncate or zero-pad dim 0 to ``padded`` rows (changing TP changes the padded vocab)."""
    rows = full.shape[0]
    if rows == padded:
        return full
    if rows > padded:
        return full[:padded]
    return torch.cat([full, full.new_zeros(padded - rows, *full.shape[1:])])


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def save_sharded(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    rules: Mapping[str, str],
    tp_rank: int,
    pp_rank: int,
    prefix: str = "model",
) -> Path:
    """Write one rank's local shards to ``directory/prefix/tpXX-ppYY.safetensors`` and fsync it.

    Tensors are moved to CPU and written one at a time (peak extra memory: one tensor).

    Args:
        tensors: canonical name -> this rank's local shard (any device and dtype).
        rules: canonical name -> split rule; every name in ``tensors`` needs one.

    Returns:
        The file written. Call inside :func:`atomic_directory` for an atomic checkpoint.
    """
    specs = [TensorSpec.of(name, t) for name, t in tensors.items()]
    with shard_writer(directory, specs, rules, tp_rank, pp_rank, prefix) as writer:
        for t in tensors.values():
            writer.write(t)
    return writer.path


def shard_writer(
    directory: str | Path,
    specs: list[TensorSpec],
    rules: Mapping[str, str],
    tp_rank: int,
    pp_rank: int,
    prefix: str = "model",
) -> StreamingSafetensorsWriter:
    """A streaming writer for one rank's shard file; write the tensors of ``specs`` in order.

    For producers that make each tensor on the fly (the HF importer): only one is alive at a time.
    """
    missing = sorted({s.name for s in specs} - set(rules))
    if missing:
        raise ValueError(f"no split rule for tensors {missing[:5]} ({len(missing)} in all)")
    bad = sorted({rules[s.name] for s in specs} - set(SPLIT_RULES))
    if bad:
        raise ValueError(f"unknown split rules {bad}; known: {SPLIT_RULES}")
    path = shard_file(directory, prefix, tp_rank, pp_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "rules": json.dumps({s.name: rules[s.name] for s in specs}),
        "tp_rank": str(tp_rank),
        "pp_rank": str(pp_rank),
    }
    return StreamingSafetensorsWriter(path, specs, meta)


def shard_shape(full_shape: tuple[int, ...], rule: str, tp: int) -> tuple[int, ...]:
    """Shape of one TP shard of a tensor of ``full_shape`` under ``rule``."""
    if rule == "replicated" or tp == 1:
        return tuple(full_shape)
    dim = 1 if rule == "row" else 0
    out = list(full_shape)
    out[dim] //= tp
    return tuple(out)


def write_layout(directory: str | Path, layout: ShardLayout) -> None:
    path = Path(directory) / LAYOUT_FILE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(layout.to_json(), f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def read_layout(directory: str | Path) -> ShardLayout:
    path = Path(directory) / LAYOUT_FILE
    if not path.is_file():
        old = Path(directory).parent / f".{Path(directory).name}.old"
        hint = f" (an overwrite was interrupted: the previous checkpoint is in {old})" if old.is_dir() else ""
        raise ValueError(f"{path}: missing; {directory} is not a sharded checkpoint{hint}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {data.get('format')!r} v{data.get('version')} is not "
            f"{FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    fields = {k: data[k] for k in ("tp", "pp", "vocab_size", "padded_vocab_size", "architecture", "extra")}
    return ShardLayout(**fields)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory atomically: yield a temporary sibling, rename it to ``final`` on success.

    Under ``torch.distributed`` every rank must enter (all ranks write into the same temporary
    directory on a shared filesystem; rank 0 creates and commits it, with barriers around).
    If the body raises (or the process dies), ``final`` is untouched: a previous checkpoint there
    stays loadable. With ``overwrite`` an existing ``final`` is replaced; the old copy is renamed to
    ``.NAME.old`` first and deleted only after the new one is in place (a crash between those two
    renames leaves it there; :func:`read_layout` points to it). Prefer a new directory per step.

    Raises:
        ValueError: ``final`` exists and ``overwrite`` is False.
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.partial"
    writer = not dist.is_initialized() or dist.get_rank() == 0
    if final.exists() and not overwrite:
        raise ValueError(f"{final} already exists; pass overwrite (--overwrite) or choose another directory")
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        yield tmp
    except BaseException:
        if not dist.is_initialized():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if writer:
        _commit(tmp, final)
    _barrier()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _commit(tmp: Path, final: Path) -> None:
    for root, _, _ in os.walk(tmp):
        _fsync_dir(Path(root))
    old = final.parent / f".{final.name}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Reading and resharding
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    rule: str
    files: dict[tuple[int, int], Path]  # (pp_rank, tp_rank) -> file


class ShardedReader:
    """Index of one prefix of a sharded checkpoint; rebuilds full tensors or target-layout shards.

    Only file headers are read up front; tensors are read lazily, one at a time.
    """

    def __init__(self, directory: str | Path, prefix: str = "model"):
        self.directory = Path(directory)
        self.layout = read_layout(directory)
        self.prefix = prefix
        self.entries = self._index()

    def _index(self) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        for pp_rank in range(self.layout.pp):
            for tp_rank in range(self.layout.tp):
                path = shard_file(self.directory, self.prefix, tp_rank, pp_rank)
                if not path.is_file():
                    raise ValueError(
                        f"{path}: missing shard of a tp={self.layout.tp} pp={self.layout.pp} checkpoint"
                    )
                with safe_open(str(path), framework="pt") as f:
                    rules = json.loads(f.metadata()["rules"])
                for name, rule in rules.items():
                    entry = entries.setdefault(name, _Entry(rule, {}))
                    entry.files[(pp_rank, tp_rank)] = path
        return entries

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def full(self, name: str) -> torch.Tensor:
        """The full (unsharded) tensor ``name``, vocab padded as in the source layout."""
        entry = self._entry(name)
        stage = min(pp for pp, _ in entry.files)
        ranks = 1 if entry.rule == "replicated" else self.layout.tp
        shards = [self._read(entry.files[(stage, r)], name) for r in range(ranks)]
        return merge_shards(shards, entry.rule)

    def shard(self, name: str, tp: int, tp_rank: int, padded_vocab_size: int | None = None) -> torch.Tensor:
        """``name`` as TP rank ``tp_rank`` of ``tp`` holds it (``padded_vocab_size`` for vocab tensors)."""
        entry = self._entry(name)
        padded = padded_vocab_size or self.layout.padded_vocab_size
        stage = min(pp for pp, _ in entry.files)
        same_vocab = entry.rule != "vocab" or padded == self.layout.padded_vocab_size
        if tp == self.layout.tp and same_vocab:
            return self._read(entry.files[(stage, tp_rank)], name)  # same split: no rebuild needed
        full = self.full(name)
        if entry.rule == "vocab":
            full = resize_vocab(full, padded)
        return shard_tensor(full, entry.rule, tp, tp_rank).contiguous()

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of ``name`` (read from a file header)."""
        path = next(iter(self._entry(name).files.values()))
        with safe_open(str(path), framework="pt") as f:
            return _TORCH_DTYPES[f.get_slice(name).get_dtype()]

    def _entry(self, name: str) -> _Entry:
        if name not in self.entries:
            raise KeyError(f"{self.directory}/{self.prefix}: no tensor named {name!r}")
        return self.entries[name]

    @staticmethod
    def _read(path: Path, name: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)


def load_sharded(
    directory: str | Path,
    names: Iterable[str],
    tp: int,
    tp_rank: int,
    prefix: str = "model",
    padded_vocab_size: int | None = None,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Load the target rank's shards of ``names`` from a checkpoint saved at any TP/PP.

    Args:
        names: canonical names this rank holds (its PP stage's tensors).
        tp, tp_rank: the *target* tensor-parallel size and rank.
        padded_vocab_size: the target's padded vocab (default: the source's).
        aliases: name -> name to read instead when the first is absent (tied output layer).

    Raises:
        ValueError: names missing from the checkpoint (all of them listed).
    """
    reader = ShardedReader(directory, prefix)
    aliases = aliases or {}
    names = list(names)
    resolved = {n: n if n in reader else aliases.get(n, n) for n in names}
    missing = [n for n, src in resolved.items() if src not in reader]
    if missing:
        raise ValueError(f"{directory}/{prefix}: missing tensors {missing}")
    return {n: reader.shard(src, tp, tp_rank, padded_vocab_size) for n, src in resolved.items()}
