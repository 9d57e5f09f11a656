"""HF <-> Megatron weight mapping, the sharded checkpoint format, offline conversion and live export."""

from hpt_megatron.convert.checkpoint import (
    checkpoint_layout,
    load_hf_model,
    load_model,
    load_state,
    save_model,
    save_state,
)
from hpt_megatron.convert.export import WeightManifest, export_hf_weights, hf_manifest, verify_weights
from hpt_megatron.convert.mapping import (
    canonical_names,
    iter_tensors,
    split_rules,
    stage_tensors,
    tied_aliases,
)
from hpt_megatron.convert.offline import hf_to_megatron, megatron_to_hf
from hpt_megatron.convert.sharded import (
    ShardedReader,
    ShardLayout,
    atomic_directory,
    load_sharded,
    read_layout,
    save_sharded,
    write_layout,
)

__all__ = [
    "ShardLayout",
    "ShardedReader",
    "WeightManifest",
    "atomic_directory",
    "canonical_names",
    "checkpoint_layout",
    "export_hf_weights",
    "hf_manifest",
    "hf_to_megatron",
    "iter_tensors",
    "load_hf_model",
    "load_model",
    "load_sharded",
    "load_state",
    "megatron_to_hf",
    "read_layout",
    "save_model",
    "save_sharded",
    "save_state",
    "split_rules",
    "stage_tensors",
    "tied_aliases",
    "verify_weights",
    "write_layout",
]
