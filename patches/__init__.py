"""Patches to third-party libraries, each applied from one entry point.

- :func:`apply_megatron_cpu_patch`: run Megatron-Core on CPU with the gloo backend (no CUDA).
- ``patches.dcp_safe_metadata.restricted_dcp_metadata``: torch_dist ``.metadata`` without arbitrary
  pickle (scoped to one load).
- ``patches.dcp_sync_save.use_in_process_results_queue``: synchronous dist_checkpointing saves
  without a multiprocessing Manager process.
- ``patches.dist_optimizer_state``: the distributed optimizer's per-parameter state for checkpoints
  (models mixing fp32 and bf16 parameters; loads into torch's Adam without TE/apex).
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
