"""Write the live actor as a Hugging Face checkpoint (the run's final model, loadable by
transformers and vLLM), streaming through the same export as the rollout weight sync."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hpt_megatron.convert import atomic_directory, hf_manifest
from hpt_megatron.convert.export import DEFAULT_BUCKET_BYTES
from hpt_megatron.convert.hf_io import HFShardWriter, write_config
from hpt_megatron.convert.offline import DEFAULT_MAX_SHARD_BYTES
from hpt_megatron.convert.safetensors_stream import TensorSpec


def save_hf_checkpoint(actor, directory: Path, tokenizer, dtype: torch.dtype | None = None) -> None:
    """Collective: every rank streams its export; global rank 0 writes. Atomic like checkpoints."""
    dtype = dtype or actor.dtype
    manifest = hf_manifest(actor.arch, dtype)
    writes = actor.ctx.rank == 0
    with atomic_directory(directory, overwrite=True) as tmp:
        writer = None
        if writes:
            specs = [TensorSpec(n, shape, getattr(torch, dt)) for n, (shape, dt) in manifest.entries.items()]
            writer = HFShardWriter(tmp, specs, DEFAULT_MAX_SHARD_BYTES)
        for bucket in actor.export_weights(DEFAULT_BUCKET_BYTES, dtype=dtype):
            for _, tensor in bucket:
                if writer is not None:
                    writer.write(tensor)
        if writer is not None:
            writer.close()
            write_config(actor.arch.hf_config, tmp, dtype)
            tokenizer.save_pretrained(tmp)
            gen = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
