"""Streaming export of a live TP/PP-sharded model as HF-named tensors in size-bounded buckets.

This is what rollout engines load after every training step. Design:

- Every rank of the model calls :func:`export_hf_weights` with its chunk and iterates it to the end
  (the generator runs collectives, so all ranks must consume it in step).
- TP: the owner stage all-gathers each tensor over its TP group and converts it to HF layout
  (split fused QKV and ``[gate; up]``, drop vocab padding).
- PP: with ``all_stages=True`` (default) each HF tensor is then broadcast over the PP group from its
  owner stage, so *every* rank yields the whole model in HF order (any rank can feed its colocated
  rollout engine). With ``all_stages=False`` a rank yields only its own stage's tensors; the receivers
  must then collect from one rank per stage, and ``hf_manifest(..., stages=[s])`` tells what each sends.
- Nothing is skipped silently: :func:`hf_manifest` (names, shapes, dtypes, total bytes) is computed from
  the config alone, and :func:`verify_weights` checks what a receiver got against it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpt_megatron.convert.mapping import OUTPUT_LAYER, BoundTensor, canonical_names, hf_shapes, stage_tensors
from hpt_megatron.convert.sharded import merge_shards
from hpt_megatron.models.arch import ArchConfig

DEFAULT_BUCKET_BYTES = 512 * 1024**2
Bucket = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class WeightManifest:
    """What a full export contains: HF name -> (shape, dtype name), in export order."""

    entries: dict[str, tuple[tuple[int, ...], str]]

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(shape) * _itemsize(dtype) for shape, dtype in self.entries.values())

    def to_json(self) -> str:
        return json.dumps({"total_bytes": self.total_bytes, "tensors": self.entries})

    @classmethod
    def from_json(cls, text: str) -> WeightManifest:
        data = json.loads(text)
        return cls({n: (tuple(s), d) for n, (s, d) in data["tensors"].items()})


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def exported_tensors(arch: ArchConfig, pp: int, stage: int) -> list[BoundTensor]:
    """The tensors stage ``stage`` exports (the tied output-layer copy has no HF tensor of its own)."""
    tensors = stage_tensors(arch, pp, stage)
    if arch.tie_embeddings:
        tensors = [t for t in tensors if t.megatron != OUTPUT_LAYER]
    return tensors


def hf_manifest(
    arch: ArchConfig, dtype: torch.dtype, pp: int = 1, stages: Iterable[int] | None = None
) -> WeightManifest:
    """The HF tensors an export yields (all stages, or only ``stages`` of a ``pp``-stage model)."""
    shapes = hf_shapes(arch)
    dtype_name = str(dtype).removeprefix("torch.")
    entries = {}
    for stage in range(pp) if stages is None else stages:
        for bound in exported_tensors(arch, pp, stage):
            entries.update({name: (shapes[name], dtype_name) for name in bound.hf})
    return WeightManifest(entries)


def verify_weights(
    manifest: WeightManifest, received: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Raise ValueError unless ``received`` has exactly the manifest's names, shapes and dtypes."""
    pairs = received.items() if isinstance(received, Mapping) else received
    seen: dict[str, tuple[tuple[int, ...], str]] = {}
    twice = []
    for name, tensor in pairs:
        if name in seen:
            twice.append(name)
        seen[name] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    missing = [n for n in manifest.entries if n not in seen]
    unexpected = [n for n in seen if n not in manifest.entries]
    wrong = [
        f"{n}: got {list(seen[n][0])} {seen[n][1]}, expected {list(want[0])} {want[1]}"
        for n, want in manifest.entries.items()
        if n in seen and seen[n] != want
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {missing[:8]}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected[:8]}")
    if wrong:
        problems.append(f"shape/dtype mismatches: {wrong[:8]}")
    if twice:
        problems.append(f"tensors sent more than once: {twice[:8]}")
    if problems:
        raise ValueError("weight export does not match its manifest: " + "; ".join(problems))


@torch.no_grad()
def export_hf_weights(
    model: torch.nn.Module,
    ctx,
    arch: ArchConfig,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
    all_stages: bool = True,
) -> Iterator[Bucket]:
    """Yield ``[(hf_name, tensor), ...]`` buckets of about ``bucket_bytes`` each, in HF order.

    Args:
        model: this rank's model chunk (wrappers with ``.module`` are fine).
        ctx: the ParallelContext (TP and PP groups are taken from it).
        dtype: dtype of the yielded tensors (default: the parameters').
        all_stages: every rank yields every tensor (PP broadcast) instead of only its stage's.
    """
    names = canonical_names(model)
    params = {names[n]: p for n, p in model.named_parameters()}
    dtype = dtype or next(iter(params.values())).dtype
    shapes = hf_shapes(arch)
    bucket: Bucket = []
    size = 0
    for stage in range(ctx.pp_size):
        if not all_stages and stage != ctx.pp_rank:
            continue
        for bound in exported_tensors(arch, ctx.pp_size, stage):
            if stage == ctx.pp_rank:
                pairs = _gather_hf(bound, params[bound.megatron], ctx, arch, dtype)
            else:
                pairs = [(n, torch.empty(shapes[n], dtype=dtype, device=ctx.device)) for n in bound.hf]
            if all_stages and ctx.pp_size > 1:
                for _, tensor in pairs:
                    dist.broadcast(tensor, src=ctx.pp_ranks[stage], group=ctx.pp_group)
            for pair in pairs:
                bucket.append(pair)
                size += pair[1].numel() * pair[1].element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
    if bucket:
        yield bucket


def _gather_hf(bound: BoundTensor, param: torch.Tensor, ctx, arch: ArchConfig, dtype) -> Bucket:
    """All-gather one parameter over TP and convert it to its HF tensor(s)."""
    local = param.detach()
    gathered = bound.split != "replicated" and ctx.tp_size > 1
    if gathered:
        shards = [torch.empty_like(local) for _ in range(ctx.tp_size)]
        dist.all_gather(shards, local.contiguous(), group=ctx.tp_group)
        full = merge_shards(shards, bound.split)
    else:
        full = local
    # Without a gather the HF tensors would be views of live parameters: copy them.
    return [(n, t.to(dtype=dtype, copy=not gathered).contiguous()) for n, t in bound.to_hf(full, arch)]
