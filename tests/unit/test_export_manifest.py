"""The export manifest is complete (against HF's own state dict) and the verifier catches gaps."""

from __future__ import annotations

import pytest
import torch

from hpt_megatron.convert import WeightManifest, hf_manifest, verify_weights
from hpt_megatron.models import arch_config_from_hf
from tests import hf_tiny


@pytest.mark.parametrize("kind", hf_tiny.KINDS)
def test_manifest_equals_hf_state_dict(kind):
    model = hf_tiny.tiny_model(kind)
    arch = arch_config_from_hf(hf_tiny.config_dict(kind))
    state = {
        n: t for n, t in model.state_dict().items() if not (arch.tie_embeddings and n == "lm_head.weight")
    }
    manifest = hf_manifest(arch, torch.float32)
    verify_weights(manifest, state)
    assert manifest.total_bytes == sum(t.numel() * 4 for t in state.values())
    assert WeightManifest.from_json(manifest.to_json()) == manifest


def test_stage_manifests_partition_the_model():
    arch = arch_config_from_hf(hf_tiny.config_dict("qwen2_tied"))
    whole = hf_manifest(arch, torch.bfloat16)
    parts = [hf_manifest(arch, torch.bfloat16, pp=2, stages=[s]) for s in range(2)]
    assert {**parts[0].entries, **parts[1].entries} == whole.entries
    assert not set(parts[0].entries) & set(parts[1].entries)


def test_verifier_catches_missing_unexpected_and_wrong_shape():
    arch = arch_config_from_hf(hf_tiny.config_dict("qwen2"))
    manifest = hf_manifest(arch, torch.float32)
    full = {n: torch.zeros(shape) for n, (shape, _) in manifest.entries.items()}
    verify_weights(manifest, full)
    dropped = dict(full)
    dropped.pop("model.layers.3.mlp.down_proj.weight")
    with pytest.raises(ValueError, match=r"missing 1 tensors: \['model.layers.3.mlp.down_proj.weight'\]"):
        verify_weights(manifest, dropped)
    with pytest.raises(ValueError, match=r"unexpected tensors: \['extra'\]"):
        verify_weights(manifest, {**full, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"model.norm.weight: got \[3\] float32, expected \[64\] float32"):
        verify_weights(manifest, {**full, "model.norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="got \\[64\\] bfloat16"):
        verify_weights(manifest, {**full, "model.norm.weight": torch.zeros(64, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match=r"tensors sent more than once: \['model.norm.weight'\]"):
        verify_weights(manifest, [*full.items(), ("model.norm.weight", full["model.norm.weight"])])
