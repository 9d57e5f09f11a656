"""Read checkpoints written by Megatron-LM's conventions: megatron-core torch_dist and the legacy
per-rank ``model_optim_rng.pt`` files. For ``hpt-convert megatron-to-hf`` and for
``model.megatron_checkpoint`` (start training from one).

Directory layouts (``SAVE`` is Megatron-LM's ``--save`` directory; either it or one ``iter_*``
directory in it may be given, a ``latest_checkpointed_iteration.txt`` picks the iteration)::

    SAVE/iter_0000100/metadata.json, .metadata, *.distcp, common.pt       torch_dist
    SAVE/iter_0000100/mp_rank_00/model_optim_rng.pt                        legacy, TP only
    SAVE/iter_0000100/mp_rank_01_002/model_optim_rng.pt                    legacy, TP rank 1, PP stage 2

Tensor names are megatron-core's (``decoder.layers.3.self_attention.linear_qkv.weight``; local-spec
norms ``input_layernorm`` / ``pre_mlp_layernorm`` are read as their TE names). A torch_dist checkpoint
stores each per-layer weight once, with the global layer index as a leading axis
(``decoder.layers.self_attention.linear_qkv.weight`` of shape ``[L, ...]``); legacy files number layers
locally per pipeline stage, renumbered here by the stages' layer counts.

No arbitrary pickle: torch_dist metadata loads through ``patches.dcp_safe_metadata`` and tensors with
``torch.load(weights_only=True)``. Legacy files (and Megatron-LM's ``common.pt``) also carry ``args``,
an ``argparse.Namespace`` (allowed: it only holds attributes), plus numpy RNG states, enums and
``io.BytesIO`` extra states: :func:`safe_torch_load` loads them with ``weights_only=True``, giving
every global outside torch's allow-list and ``argparse.Namespace`` an inert stand-in class that
records nothing and runs nothing. Only the ``model`` tensors are used.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hpt_megatron.convert.mapping import LAYER_PREFIX, LOCAL_TO_CANONICAL, OUTPUT_LAYER, iter_tensors
from hpt_megatron.convert.sharded import merge_shards
from hpt_megatron.convert.torch_dist import TRACKER, check_complete, safe_torch_load, tracked_checkpoint
from hpt_megatron.models.arch import ArchConfig

LEGACY_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED = "decoder.layers."
_NON_MODEL_PREFIXES = ("optimizer.", "hpt_rng_state.", "rng_state", "rerun_state_machine")
KINDS = ("sharded", "torch_dist", "legacy")


# ---- finding the checkpoint ---------------------------------------------------------------------


@dataclass(frozen=True)
class FoundCheckpoint:
    kind: str  # one of KINDS
    directory: Path


def find_checkpoint(path: str | Path) -> FoundCheckpoint:
    """Detect the format of ``path`` (a save directory with a tracker, or a checkpoint directory)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such checkpoint directory")
    if (path / "layout.json").is_file():
        return FoundCheckpoint("sharded", path)
    if (path / "metadata.json").is_file():
        check_complete(path)
        return FoundCheckpoint("torch_dist", path)
    if any(_RANK_DIR.match(p.name) for p in path.iterdir() if p.is_dir()):
        return FoundCheckpoint("legacy", path)
    if (path / TRACKER).is_file():
        return find_checkpoint(tracked_checkpoint(path))
    raise ValueError(
        f"{path}: not a Megatron checkpoint: expected layout.json (hpt sharded), metadata.json "
        f"(torch_dist), mp_rank_XX[_YYY]/{LEGACY_FILE} (legacy) or {TRACKER} (a save directory)"
    )


# ---- torch_dist ---------------------------------------------------------------------------------


class DistCheckpointSource:
    """Full canonical tensors of a torch_dist checkpoint, read with torch.distributed.checkpoint
    (no process group needed). Holds at most one stored tensor (a layer stack) at a time."""

    def __init__(self, directory: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from patches.dcp_safe_metadata import restricted_dcp_metadata

        self.directory = Path(directory)
        with restricted_dcp_metadata():
            metadata = FileSystemReader(str(self.directory)).read_metadata()
        self.stored = {
            k: m
            for k, m in metadata.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata) and not k.startswith(_NON_MODEL_PREFIXES)
        }
        self.index = self._canonical_index()
        self._cached: tuple[str, torch.Tensor] | None = None

    def _canonical_index(self) -> dict[str, tuple[str, int | None]]:
        """canonical name -> (stored key, layer index into its leading axis or None)."""
        out: dict[str, tuple[str, int | None]] = {}
        for key, meta in self.stored.items():
            rest = key.removeprefix(_STACKED)
            if key.startswith(_STACKED) and not rest.split(".")[0].isdigit():
                for i in range(meta.size[0]):
                    out[LAYER_PREFIX.format(i=i) + rest] = (key, i)
            else:
                out[key] = (key, None)
        return out

    def names(self) -> list[str]:
        return list(self.index)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def dtype(self, name: str) -> torch.dtype:
        return self.stored[self.index[name][0]].properties.dtype

    def read_order(self, name: str) -> tuple[int, int]:
        """Sort key that reads every stored tensor once (all layers of a stack in a row)."""
        key, layer = self.index[name]
        return list(self.stored).index(key), layer or 0

    def full(self, name: str) -> torch.Tensor:
        if name not in self.index:
            raise KeyError(f"{self.directory}: no tensor {name!r} (stored: {sorted(self.stored)[:8]} ...)")
        key, layer = self.index[name]
        stored = self._load(key)
        return stored if layer is None else stored[layer]

    def _load(self, key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        from patches.dcp_safe_metadata import restricted_dcp_metadata

        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self._cached = None  # drop the previous stack before reading the next
        meta = self.stored[key]
        target = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
        with restricted_dcp_metadata(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process: intended
            dcp.load(target, storage_reader=FileSystemReader(str(self.directory)))
        self._cached = (key, target[key])
        return target[key]


# ---- legacy per-rank files ----------------------------------------------------------------------


def legacy_rank_files(directory: str | Path) -> dict[tuple[int, int], Path]:
    """(tp_rank, pp_rank) -> file, checked for a full TP x PP grid."""
    directory = Path(directory)
    files: dict[tuple[int, int], Path] = {}
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        m = _RANK_DIR.match(sub.name)
        if not m:
            continue
        if m.group(3) is not None:
            raise ValueError(f"{sub}: expert-parallel legacy checkpoints are not supported")
        if not (sub / LEGACY_FILE).is_file():
            raise ValueError(f"{sub}: missing {LEGACY_FILE}")
        files[(int(m.group(1)), int(m.group(2) or 0))] = sub / LEGACY_FILE
    tp = 1 + max(t for t, _ in files)
    pp = 1 + max(p for _, p in files)
    missing = [f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") for t in range(tp) for p in range(pp)]
    missing = [m for m in missing if not (directory / m).is_dir()]
    if missing:
        raise ValueError(f"{directory}: a tp={tp} pp={pp} legacy checkpoint lacks {missing}")
    return files


class LegacySource:
    """Full canonical tensors of a legacy checkpoint: TP shards merged by the mapping's split rules,
    PP stages' local layer numbers made global. Files are memory-mapped, read lazily."""

    def __init__(self, directory: str | Path, arch: ArchConfig):
        self.directory = Path(directory)
        self.files = legacy_rank_files(directory)
        self.tp = 1 + max(t for t, _ in self.files)
        self.pp = 1 + max(p for _, p in self.files)
        self.rules = {t.megatron: t.split for t in iter_tensors(arch)} | {OUTPUT_LAYER: "vocab"}
        self.models = {rank: _model_state(path) for rank, path in self.files.items()}
        self.index = self._canonical_index()

    def _canonical_index(self) -> dict[str, tuple[int, str]]:
        """canonical name -> (pp stage, local name)."""
        out: dict[str, tuple[int, str]] = {}
        offset = 0
        for stage in range(self.pp):
            local = self.models[(0, stage)]
            layers = sorted({int(m.group(1)) for k in local if (m := _LAYER.match(k))})
            for key in local:
                if not key.endswith("_extra_state"):
                    out.setdefault(_global_name(key, offset), (stage, key))
            offset += len(layers)
        return out

    def names(self) -> list[str]:
        return list(self.index)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def dtype(self, name: str) -> torch.dtype:
        stage, local = self.index[name]
        return self.models[(0, stage)][local].dtype

    def read_order(self, name: str) -> tuple[int, int]:
        return (0, 0)

    def full(self, name: str) -> torch.Tensor:
        if name not in self.index:
            raise KeyError(f"{self.directory}: no tensor {name!r} in any {LEGACY_FILE}")
        stage, local = self.index[name]
        rule = self.rules.get(name)
        if rule is None:
            raise ValueError(f"{self.directory}: {name} is not a tensor of the architecture")
        ranks = 1 if rule == "replicated" else self.tp
        return merge_shards([self.models[(r, stage)][local] for r in range(ranks)], rule)


def _global_name(local: str, offset: int) -> str:
    m = _LAYER.match(local)
    if not m:
        return local
    rest = m.group(2)
    return LAYER_PREFIX.format(i=int(m.group(1)) + offset) + LOCAL_TO_CANONICAL.get(rest, rest)


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    state = safe_torch_load(path)
    if "model" not in state:
        virtual = sorted(k for k in state if re.fullmatch(r"model\d+", str(k)))
        what = f"virtual-pipeline chunks {virtual} are not supported" if virtual else "no 'model' entry"
        raise ValueError(f"{path}: {what}")
    return {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}


def open_source(found: FoundCheckpoint, arch: ArchConfig):
    """A canonical-tensor source for a torch_dist or legacy checkpoint."""
    if found.kind == "torch_dist":
        return DistCheckpointSource(found.directory)
    if found.kind == "legacy":
        return LegacySource(found.directory, arch)
    raise ValueError(f"{found.directory}: {found.kind} checkpoints are read by hpt_megatron.convert.sharded")


def iter_source(source, arch: ArchConfig) -> Iterator:
    """The architecture's tensors in the source's cheapest read order."""
    return iter(sorted(iter_tensors(arch), key=lambda b: source.read_order(b.megatron)))


# ---- to Hugging Face ------------------------------------------------------------------------------


def resolve_arch(found: FoundCheckpoint, hf_config: str | Path | None) -> tuple[ArchConfig, Path | None]:
    """The architecture (and the directory to copy tokenizer files from): ``hf_config`` (a HF
    config.json or model directory), else the HF config a torch_dist checkpoint of this project keeps."""
    from hpt_megatron.models.arch import arch_config_from_hf

    if hf_config:
        hf_config = Path(hf_config)
        return arch_config_from_hf(hf_config), hf_config if hf_config.is_dir() else None
    if found.kind == "torch_dist":
        hpt = safe_torch_load(found.directory / "common.pt", mmap=False).get("hpt")
        if isinstance(hpt, dict) and "hf_config" in hpt:
            return arch_config_from_hf(hpt["hf_config"], label=f"{found.directory}/common.pt"), None
    raise ValueError(
        f"{found.directory}: a {found.kind} checkpoint without a Hugging Face config (Megatron-LM keeps "
        "none): pass --hf-config with the config.json (or HF model directory) of the same architecture"
    )


def megatron_lm_to_hf(
    checkpoint: str | Path,
    output_dir: str | Path,
    hf_config: str | Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
) -> Path:
    """Convert a torch_dist or legacy Megatron-LM checkpoint to a Hugging Face directory."""
    from tqdm import tqdm

    from hpt_megatron.convert.hf_io import HFShardWriter, copy_side_files, write_config
    from hpt_megatron.convert.mapping import hf_shapes
    from hpt_megatron.convert.safetensors_stream import TensorSpec
    from hpt_megatron.convert.sharded import atomic_directory

    found = find_checkpoint(checkpoint)
    arch, side_files = resolve_arch(found, hf_config)
    source = open_source(found, arch)
    order = list(iter_source(source, arch))
    _check_names(source, order, found.directory)
    shapes = hf_shapes(arch)
    specs = [TensorSpec(n, shapes[n], dtype or source.dtype(b.megatron)) for b in order for n in b.hf]
    with atomic_directory(output_dir, overwrite) as tmp:
        writer = HFShardWriter(tmp, specs, max_shard_bytes)
        dtypes = {s.name: s.dtype for s in specs}
        for bound in tqdm(order, desc="megatron->hf", disable=not progress):
            for name, tensor in bound.to_hf(_checked_full(source, bound, arch, shapes), arch):
                writer.write(tensor.to(dtypes[name]))
        writer.close()
        write_config(arch.hf_config, tmp, specs[0].dtype)
        if side_files is not None:
            copy_side_files(side_files, tmp)
    return Path(output_dir)


def _check_names(source, order, directory: Path) -> None:
    missing = [b.megatron for b in order if b.megatron not in source]
    if missing:
        raise ValueError(
            f"{directory}: missing tensors {missing[:8]} ({len(missing)} in all); is --hf-config the "
            "architecture this checkpoint was trained with?"
        )


def _checked_full(source, bound, arch: ArchConfig, shapes: dict) -> torch.Tensor:
    from hpt_megatron.convert.mapping import megatron_shape

    full = source.full(bound.megatron)
    padded = full.shape[0] if bound.transform == "vocab" else arch.vocab_size
    want = megatron_shape(bound, arch, padded, shapes)
    if tuple(full.shape) != want or padded < arch.vocab_size:
        raise ValueError(
            f"{source.directory}: {bound.megatron} has shape {list(full.shape)}, the architecture "
            f"implies {list(want)}"
            + (f" with at least {arch.vocab_size} vocab rows" if bound.transform == "vocab" else "")
        )
    return full


# ---- into a live model (model.megatron_checkpoint) --------------------------------------------------


def load_megatron_weights(path: str | Path, model, ctx, arch: ArchConfig) -> FoundCheckpoint:
    """Copy the weights of any supported Megatron checkpoint into this rank's model (any TP/PP)."""
    from hpt_megatron.convert.checkpoint import load_model

    found = find_checkpoint(path)
    if found.kind == "sharded":
        load_model(found.directory, model, ctx, arch)
    elif found.kind == "torch_dist":
        _load_dist_weights(found.directory, model)
    else:
        load_canonical(LegacySource(found.directory, arch), model, ctx, arch)
    return found


def _load_dist_weights(directory: Path, model) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    from hpt_megatron.convert.torch_dist import apply_model_state, model_sharded_state
    from patches.dcp_safe_metadata import restricted_dcp_metadata

    class SafeCommonLoad(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return safe_torch_load(Path(checkpoint_dir) / "common.pt", mmap=False)

    request = {"model": model_sharded_state(model, keep_extra_state=False)}
    with restricted_dcp_metadata():
        loaded = dist_checkpointing.load(request, str(directory), common_strategy=SafeCommonLoad())
    apply_model_state(model, loaded["model"], directory)


@torch.no_grad()
def load_canonical(source, model, ctx, arch: ArchConfig) -> None:
    """Copy full canonical tensors from ``source`` into this rank's shards."""
    from hpt_megatron.convert.mapping import canonical_names, split_rules, tied_aliases
    from hpt_megatron.convert.sharded import resize_vocab, shard_tensor

    params = dict(model.named_parameters())
    rules, aliases = split_rules(arch, ctx.pp_size), tied_aliases(arch)
    padded = arch.padded_vocab_size(ctx.tp_size)
    for local, canonical in canonical_names(model).items():
        full = source.full(canonical if canonical in source else aliases.get(canonical, canonical))
        if rules[canonical] == "vocab":
            full = resize_vocab(full, padded)
        shard = shard_tensor(full, rules[canonical], ctx.tp_size, ctx.tp_rank)
        if shard.shape != params[local].shape:
            raise ValueError(
                f"{source.directory}: {canonical} gives shape {list(shard.shape)} on this rank, the model's "
                f"{local} has {list(params[local].shape)}"
            )
        params[local].copy_(shard)
