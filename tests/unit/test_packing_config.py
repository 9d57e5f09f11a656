"""The packing keys of the trainer config: defaults, and the combination that cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpt_megatron.config import load_config
from hpt_megatron.config.io import ConfigError
from tests.unit.test_config import QWEN_LIKE


def _recipe(tmp_path: Path) -> Path:
    (tmp_path / "model.json").write_text(json.dumps(QWEN_LIKE))
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  hf_config: model.json\n")
    return path


def test_packed_micro_batches_by_default_and_padded_on_request(tmp_path):
    path = _recipe(tmp_path)
    assert load_config(path).trainer.packed is True
    cfg = load_config(
        path, ["trainer.packed=false", "model.layer_spec=local", "trainer.micro_batch_tokens=4096"]
    )
    assert cfg.trainer.packed is False and cfg.trainer.micro_batch_tokens == 4096


def test_packed_with_the_local_attention_spec_names_both_keys(tmp_path):
    path = _recipe(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.layer_spec=local"])
    assert str(err.value) == (
        f"{path}: trainer.packed=true needs attention that follows the packed rows' boundaries, which "
        "model.layer_spec='local' lacks: set model.layer_spec to auto or sdpa (or te), or trainer.packed=false"
    )
