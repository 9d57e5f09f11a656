"""Hugging Face <-> Megatron weight mapping, as data.

Three layers of names and layouts:

- **HF**: the transformers state dict (``model.layers.3.self_attn.q_proj.weight``).
- **canonical Megatron**: one full (unsharded) tensor per Megatron parameter, named as in Megatron's
  Transformer Engine spec with *global* layer indices (``decoder.layers.3.self_attention.linear_qkv.weight``).
  Its layout is the TP-independent one: fused QKV grouped per KV head, fc1 = ``[gate; up]``, vocab rows
  padded to the layout's padded vocab. This is what the sharded checkpoint format stores (split by
  ``split`` rules, see ``sharded.py``).
- **local**: the names of a live model chunk (layer indices local to the PP stage; the local spec keeps
  ``input_layernorm`` / ``pre_mlp_layernorm`` where TE fuses them into the next linear).

A mapping table is a tuple of :class:`TensorMap`; an architecture names its table in
``ArchSpec.mapping``. ``when`` gates optional tensors on the ArchConfig (``CONDITIONS``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from hpt_megatron.models.arch import ArchConfig, stage_layers

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
LAYER_PREFIX = "decoder.layers.{i}."

# Local-spec module names -> TE (canonical) names, within a layer.
LOCAL_TO_CANONICAL = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class TensorMap:
    """One canonical Megatron tensor and the HF tensors it is made of.

    Attributes:
        megatron: canonical name; inside a layer table, relative to ``decoder.layers.{i}.``.
        hf: HF names, with ``{i}`` for the layer index.
        transform: key of ``TRANSFORMS`` (how the HF tensors combine into the Megatron one).
        split: tensor-parallel split rule (``sharded.SPLIT_RULES``).
        when: key of ``CONDITIONS``; the tensor exists only if it holds.
    """

    megatron: str
    hf: tuple[str, ...]
    transform: str = "copy"
    split: str = "replicated"
    when: str | None = None


@dataclass(frozen=True)
class ModelMapping:
    """Tensors outside the decoder layers (``top``) and inside each layer (``layer``)."""

    top: tuple[TensorMap, ...]
    layer: tuple[TensorMap, ...]


MAPPINGS: dict[str, ModelMapping] = {
    # Llama, Qwen2 and their relatives: pre-norm RMSNorm, RoPE, GQA, SwiGLU.
    "llama": ModelMapping(
        top=(
            TensorMap(EMBEDDING, ("model.embed_tokens.weight",), "vocab", "vocab"),
            TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",)),
            TensorMap(OUTPUT_LAYER, ("lm_head.weight",), "vocab", "vocab", when="untied"),
        ),
        layer=(
            TensorMap(
                "self_attention.linear_qkv.layer_norm_weight", ("model.layers.{i}.input_layernorm.weight",)
            ),
            TensorMap(
                "self_attention.linear_qkv.weight",
                tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"),
                "qkv",
                "column",
            ),
            TensorMap(
                "self_attention.linear_qkv.bias",
                tuple(f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"),
                "qkv_bias",
                "column",
                when="qkv_bias",
            ),
            TensorMap(
                "self_attention.linear_proj.weight",
                ("model.layers.{i}.self_attn.o_proj.weight",),
                split="row",
            ),
            TensorMap(
                "mlp.linear_fc1.layer_norm_weight", ("model.layers.{i}.post_attention_layernorm.weight",)
            ),
            TensorMap(
                "mlp.linear_fc1.weight",
                ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
                "glu",
                "glu",
            ),
            TensorMap("mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), split="row"),
        ),
    ),
}

CONDITIONS: dict[str, Callable[[ArchConfig], bool]] = {
    "qkv_bias": lambda arch: arch.qkv_bias,
    "untied": lambda arch: not arch.tie_embeddings,
}


# ----------------------------------------------------------------------------------------------
# Transforms: HF tensors <-> one canonical Megatron tensor
# ----------------------------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
    """q ``[nh*d, ...]``, k/v ``[ng*d, ...]`` -> ``[(nh + 2*ng)*d, ...]`` grouped per KV head:
    for each group g, its ``nh/ng`` query heads, then K_g, then V_g (works for weights and biases)."""
    g, d = arch.num_kv_heads, arch.head_dim
    rest = q.shape[1:]
    q = q.reshape(g, (arch.num_heads // g) * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, arch: ArchConfig) -> list[torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: ``[(nh + 2*ng)*d, ...]`` -> [q, k, v]."""
    g, d = arch.num_kv_heads, arch.head_dim
    per_group = (arch.num_heads // g) * d
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, per_group + 2 * d, *rest)
    q, k, v = torch.split(grouped, [per_group, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """Append zero rows up to ``padded`` rows (Megatron's padded vocab)."""
    if t.shape[0] > padded:
        raise ValueError(f"vocab tensor has {t.shape[0]} rows, more than the padded vocab {padded}")
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])


# to_megatron(hf_tensors, arch, padded_vocab) -> tensor; to_hf(tensor, arch) -> hf_tensors
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda ts, arch, pv: ts[0], lambda t, arch: [t]),
    "qkv": (lambda ts, arch, pv: fuse_qkv(*ts, arch), split_qkv),
    "qkv_bias": (lambda ts, arch, pv: fuse_qkv(*ts, arch), split_qkv),
    "glu": (lambda ts, arch, pv: torch.cat(ts, dim=0), lambda t, arch: list(torch.chunk(t, 2, dim=0))),
    "vocab": (lambda ts, arch, pv: pad_vocab(ts[0], pv), lambda t, arch: [t[: arch.vocab_size]]),
}


# ----------------------------------------------------------------------------------------------
# Enumerating tensors of a model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoundTensor:
    """A :class:`TensorMap` instantiated for one layer (or the top level)."""

    megatron: str
    hf: tuple[str, ...]
    transform: str
    split: str
    layer: int | None

    def to_megatron(
        self, hf_tensors: Sequence[torch.Tensor], arch: ArchConfig, padded_vocab: int
    ) -> torch.Tensor:
        return TRANSFORMS[self.transform][0](list(hf_tensors), arch, padded_vocab)

    def to_hf(self, tensor: torch.Tensor, arch: ArchConfig) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.hf, TRANSFORMS[self.transform][1](tensor, arch)))


def model_mapping(arch: ArchConfig) -> ModelMapping:
    return MAPPINGS[arch.spec.mapping]


def _bind(tmap: TensorMap, layer: int | None) -> BoundTensor:
    if layer is None:
        return BoundTensor(tmap.megatron, tmap.hf, tmap.transform, tmap.split, None)
    return BoundTensor(
        LAYER_PREFIX.format(i=layer) + tmap.megatron,
        tuple(h.format(i=layer) for h in tmap.hf),
        tmap.transform,
        tmap.split,
        layer,
    )


def iter_tensors(
    arch: ArchConfig, layers: Sequence[int] | None = None, top: bool = True
) -> Iterator[BoundTensor]:
    """All tensors of ``arch`` in HF order: embedding, layers ascending, final norm, lm head.

    ``layers`` restricts the decoder layers; ``top=False`` leaves out the non-layer tensors.
    """
    mapping = model_mapping(arch)
    active = [t for t in mapping.top if t.when is None or CONDITIONS[t.when](arch)]
    if top:
        yield from (_bind(t, None) for t in active if t.megatron == EMBEDDING)
    for i in range(arch.num_layers) if layers is None else layers:
        for t in mapping.layer:
            if t.when is None or CONDITIONS[t.when](arch):
                yield _bind(t, i)
    if top:
        yield from (_bind(t, None) for t in active if t.megatron != EMBEDDING)


def hf_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor ``arch`` implies, in HF order."""
    h, f, v = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    by_suffix = {
        "embed_tokens.weight": (v, h),
        "lm_head.weight": (v, h),
        "norm.weight": (h,),
        "layernorm.weight": (h,),
        "q_proj.weight": (arch.q_size, h),
        "k_proj.weight": (arch.kv_size, h),
        "v_proj.weight": (arch.kv_size, h),
        "q_proj.bias": (arch.q_size,),
        "k_proj.bias": (arch.kv_size,),
        "v_proj.bias": (arch.kv_size,),
        "o_proj.weight": (h, arch.q_size),
        "gate_proj.weight": (f, h),
        "up_proj.weight": (f, h),
        "down_proj.weight": (h, f),
    }
    out = {}
    for bound in iter_tensors(arch):
        for name in bound.hf:
            suffix = next(s for s in by_suffix if name.endswith(s))
            out[name] = by_suffix[suffix]
    return out


def megatron_shape(
    bound: BoundTensor, arch: ArchConfig, padded_vocab: int, shapes: dict[str, tuple[int, ...]] | None = None
) -> tuple[int, ...]:
    """Full (unsharded) canonical shape of a Megatron tensor (``shapes``: a cached :func:`hf_shapes`)."""
    shapes = shapes or hf_shapes(arch)
    parts = [shapes[n] for n in bound.hf]
    if bound.transform == "vocab":
        return (padded_vocab, *parts[0][1:])
    if len(parts) == 1:
        return parts[0]
    return (sum(p[0] for p in parts), *parts[0][1:])


# ----------------------------------------------------------------------------------------------
# Pipeline stages
# ----------------------------------------------------------------------------------------------


def stage_tensors(arch: ArchConfig, pp: int, pp_rank: int) -> list[BoundTensor]:
    """The canonical tensors pipeline stage ``pp_rank`` holds.

    The first stage holds the embedding, the last the final norm and the output layer. With tied
    embeddings and ``pp > 1`` the last stage also holds ``output_layer.weight``, a copy of the
    embedding (Megatron keeps both copies equal by all-reducing their gradients).
    """
    first, last = pp_rank == 0, pp_rank == pp - 1
    out = [t for t in iter_tensors(arch, top=False, layers=stage_layers(arch, pp, pp_rank))]
    top = list(iter_tensors(arch, layers=()))
    if first:
        out = [t for t in top if t.megatron == EMBEDDING] + out
    if last:
        out += [t for t in top if t.megatron != EMBEDDING]
        if arch.tie_embeddings and pp > 1:
            emb = next(t for t in top if t.megatron == EMBEDDING)
            out.append(BoundTensor(OUTPUT_LAYER, emb.hf, emb.transform, emb.split, None))
    return out


def tied_aliases(arch: ArchConfig) -> dict[str, str]:
    """Canonical names that may be read from another name (the tied output layer <- embedding)."""
    return {OUTPUT_LAYER: EMBEDDING} if arch.tie_embeddings else {}


def split_rules(arch: ArchConfig, pp: int = 1) -> dict[str, str]:
    """Canonical name -> tensor-parallel split rule for every tensor of every stage."""
    return {t.megatron: t.split for s in range(pp) for t in stage_tensors(arch, pp, s)}


# ----------------------------------------------------------------------------------------------
# Live model chunks: local parameter names <-> canonical names
# ----------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module style wrappers (``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name (as ``model.named_parameters()`` gives it) -> canonical name.

    Global layer indices come from each layer's ``layer_number`` (1-based), so PP stages and virtual
    pipeline chunks need no offset arithmetic.
    """
    core = unwrap_model(model)
    wrapper_prefix = _wrapper_prefix(model, core)
    out = {}
    for name, _ in core.named_parameters():
        out[wrapper_prefix + name] = _canonical(core, name)
    return out


def _wrapper_prefix(model: torch.nn.Module, core: torch.nn.Module) -> str:
    prefix = ""
    while model is not core:
        prefix += "module."
        model = model.module
    return prefix


def _canonical(core: torch.nn.Module, name: str) -> str:
    match = _LAYER_RE.match(name)
    if not match:
        return name
    local, rest = int(match.group(1)), match.group(2)
    layer = core.decoder.layers[local].layer_number - 1
    return LAYER_PREFIX.format(i=layer) + LOCAL_TO_CANONICAL.get(rest, rest)
