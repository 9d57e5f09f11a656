"""Transformer-layer specs: Transformer Engine, local, or local with torch SDPA core attention.

Transformer Engine is imported here and nowhere else in ``models/`` (``HAVE_TE``). ``"auto"`` picks TE
when importable, else the SDPA spec (GPU and CPU).

Parameter names differ between specs only in where the pre-attention / pre-MLP RMSNorm weights live:
TE fuses them into the following linear (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``)
while the local specs keep separate ``input_layernorm`` / ``pre_mlp_layernorm`` modules. The weight
mapping (``hpt_megatron.convert``) handles both.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

try:  # the one import boundary for Transformer Engine in models/
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False

SPEC_NAMES = ("auto", "te", "local", "sdpa")


def resolve_spec_name(name: str) -> str:
    """``auto`` -> ``te`` if Transformer Engine is importable, else ``sdpa`` (on CPU too: torch's
    fused CPU attention never materialises the [b, heads, s, s] scores and masks, the local spec's
    attention does, and only ``sdpa`` and ``te`` run padding-free packed micro-batches)."""
    if name not in SPEC_NAMES:
        raise ValueError(f"layer spec {name!r} is not one of {SPEC_NAMES}")
    if name == "auto":
        return "te" if HAVE_TE else "sdpa"
    if name == "te" and not HAVE_TE:
        raise ValueError(
            "layer spec 'te' needs Transformer Engine, which is not importable here; "
            "install transformer-engine[pytorch] or use spec 'local' / 'sdpa'"
        )
    return name


def _te_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


def _local_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


def _sdpa_spec():
    from hpt_megatron.models.attention import SDPACoreAttention

    spec = copy.deepcopy(_local_spec())
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


LAYER_SPECS: dict[str, Callable] = {"te": _te_spec, "local": _local_spec, "sdpa": _sdpa_spec}


def layer_spec(name: str):
    """The megatron ``ModuleSpec`` of one transformer layer for spec ``name`` (see ``SPEC_NAMES``)."""
    return LAYER_SPECS[resolve_spec_name(name)]()
