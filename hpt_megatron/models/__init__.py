"""Megatron-Core model providers: HF config -> ArchConfig -> GPTModel stage (TE / local / SDPA specs)."""

from hpt_megatron.models.arch import (
    ARCHITECTURES,
    ArchConfig,
    ArchSpec,
    arch_config_from_hf,
    check_parallel_layout,
    rope_inv_freq,
    stage_layers,
)
from hpt_megatron.models.gpt import FP8Options, build_gpt_model, default_dtype, transformer_config
from hpt_megatron.models.specs import HAVE_TE, SPEC_NAMES, layer_spec, resolve_spec_name

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
