"""Patches to third-party libraries, each applied from one entry point.

- :func:`apply_megatron_cpu_patch`: run Megatron-Core on CPU with the gloo backend (no CUDA).
"""

from patches.megatron_cpu import (
    SUPPORTED_MEGATRON_SERIES,
    UnsupportedMegatronVersionError,
    apply_megatron_cpu_patch,
    check_megatron_version,
    is_megatron_cpu_patch_applied,
)

__all__ = [
    "SUPPORTED_MEGATRON_SERIES",
    "UnsupportedMegatronVersionError",
    "apply_megatron_cpu_patch",
    "check_megatron_version",
    "is_megatron_cpu_patch_applied",
]
