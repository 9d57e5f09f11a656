"""Save / load a live sharded Megatron model (and same-shaped optimizer state) in the sharded format.

Every process saves its own local shards; with data parallelism only DP rank 0 writes (the replicas
hold identical tensors). A checkpoint directory is written atomically by wrapping the saves in
:func:`~hpt_megatron.convert.sharded.atomic_directory`::

    with atomic_directory(step_dir) as tmp:
        save_model(tmp, model, ctx, arch)                                  # params + layout.json
        save_state(tmp, exp_avg_by_param_name, model, ctx, arch, "optim/exp_avg")

and restored, at the same or any other TP/PP, with :func:`load_model` / :func:`load_state`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from hpt_megatron.convert.mapping import canonical_names, split_rules, tied_aliases
from hpt_megatron.convert.sharded import ShardLayout, load_sharded, save_sharded, write_layout
from hpt_megatron.models.arch import ArchConfig


def checkpoint_layout(arch: ArchConfig, tp: int, pp: int) -> ShardLayout:
    """The ``layout.json`` content for ``arch`` sharded ``tp`` x ``pp`` ways (keeps the HF config)."""
    return ShardLayout(
        tp=tp,
        pp=pp,
        vocab_size=arch.vocab_size,
        padded_vocab_size=arch.padded_vocab_size(tp),
        architecture=arch.architecture,
        extra={"arch": arch.to_dict(), "hf_config": arch.hf_config},
    )


def save_model(
    directory: str | Path, model: torch.nn.Module, ctx, arch: ArchConfig, prefix: str = "model"
) -> None:
    """Write this rank's parameters (and, on global rank 0, ``layout.json``).

    Args:
        model: this rank's model chunk (wrappers with ``.module`` are fine).
        ctx: the ParallelContext.
    """
    if ctx.rank == 0:
        write_layout(directory, checkpoint_layout(arch, ctx.tp_size, ctx.pp_size))
    params = dict(model.named_parameters())
    save_state(directory, params, model, ctx, arch, prefix)


def save_state(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
    ctx,
    arch: ArchConfig,
    prefix: str,
) -> None:
    """Write per-parameter tensors (e.g. Adam moments) keyed by the model's local parameter names.

    Tensors must have their parameter's local shape; names not in ``model`` raise ValueError.
    """
    if ctx.dp_rank != 0:
        return
    names = canonical_names(model)
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise ValueError(f"save_state({prefix!r}): {unknown[:5]} are not parameters of the model")
    canonical = {names[n]: t for n, t in tensors.items()}
    save_sharded(directory, canonical, split_rules(arch, ctx.pp_size), ctx.tp_rank, ctx.pp_rank, prefix)


def load_state(
    directory: str | Path, model: torch.nn.Module, ctx, arch: ArchConfig, prefix: str
) -> dict[str, torch.Tensor]:
    """Read per-parameter tensors saved under ``prefix`` at any TP/PP; keyed by local parameter name.

    Each tensor has the shape of the local parameter of this rank (checked).
    """
    names = canonical_names(model)
    loaded = load_sharded(
        directory,
        names.values(),
        ctx.tp_size,
        ctx.tp_rank,
        prefix=prefix,
        padded_vocab_size=arch.padded_vocab_size(ctx.tp_size),
        aliases=tied_aliases(arch),
    )
    params = dict(model.named_parameters())
    out = {}
    for local, canonical in names.items():
        tensor = loaded[canonical]
        if tensor.shape != params[local].shape:
            raise ValueError(
                f"{directory}/{prefix}: {canonical} has shape {list(tensor.shape)} for this rank, "
                f"the model's {local} has {list(params[local].shape)}"
            )
        out[local] = tensor
    return out


@torch.no_grad()
def load_model(
    directory: str | Path, model: torch.nn.Module, ctx, arch: ArchConfig, prefix: str = "model"
) -> None:
    """Copy the parameters saved in ``directory`` (any TP/PP) into this rank's ``model`` in place."""
    params = dict(model.named_parameters())
    for local, tensor in load_state(directory, model, ctx, arch, prefix).items():
        params[local].copy_(tensor)


@torch.no_grad()
def load_hf_model(hf_dir: str | Path, model: torch.nn.Module, ctx, arch: ArchConfig) -> None:
    """Copy a Hugging Face checkpoint's weights into this rank's Megatron shard in place (reads
    only this stage's tensors, lazily, one at a time)."""
    from hpt_megatron.convert.hf_io import HFReader
    from hpt_megatron.convert.mapping import stage_tensors
    from hpt_megatron.convert.sharded import shard_tensor

    reader = HFReader(hf_dir)
    local_of = {c: n for n, c in canonical_names(model).items()}
    params = dict(model.named_parameters())
    padded = arch.padded_vocab_size(ctx.tp_size)
    for bound in stage_tensors(arch, ctx.pp_size, ctx.pp_rank):
        if bound.megatron not in local_of:
            continue
        full = bound.to_megatron([reader.get(h) for h in bound.hf], arch, padded)
        param = params[local_of[bound.megatron]]
        shard = shard_tensor(full, bound.split, ctx.tp_size, ctx.tp_rank)
        if shard.shape != param.shape:
            raise ValueError(
                f"{hf_dir}: {bound.megatron} has shape {list(shard.shape)}, the model expects {list(param.shape)}"
            )
        param.copy_(shard)
