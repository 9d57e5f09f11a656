"""Megatron-Core model providers: HF config -> ArchConfig -> GPTModel stage (TE / local / SDPA specs).

``arch`` imports no megatron, so configs are validated without it; the model builders are imported
on first use.
"""

import importlib

from hpt_megatron.models.arch import (
    ARCHITECTURES,
    ArchConfig,
    ArchSpec,
    arch_config_from_hf,
    check_parallel_layout,
    rope_inv_freq,
    stage_layers,
)

_LAZY = {
    "FP8Options": "gpt",
    "build_gpt_model": "gpt",
    "default_dtype": "gpt",
    "transformer_config": "gpt",
    "HAVE_TE": "specs",
    "SPEC_NAMES": "specs",
    "layer_spec": "specs",
    "resolve_spec_name": "specs",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"hpt_megatron.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hpt_megatron.models' has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES",
    "HAVE_TE",
    "SPEC_NAMES",
    "ArchConfig",
    "ArchSpec",
    "FP8Options",
    "arch_config_from_hf",
    "build_gpt_model",
    "check_parallel_layout",
    "default_dtype",
    "layer_spec",
    "resolve_spec_name",
    "rope_inv_freq",
    "stage_layers",
    "transformer_config",
]
