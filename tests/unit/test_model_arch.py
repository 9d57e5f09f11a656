"""HF config -> ArchConfig parsing, validation before any process group, RoPE, layer specs, FP8 gating."""

from __future__ import annotations

import json

import pytest
import torch

from hpt_megatron.models import (
    HAVE_TE,
    FP8Options,
    arch_config_from_hf,
    check_parallel_layout,
    resolve_spec_name,
    rope_inv_freq,
    transformer_config,
)
from tests import hf_tiny

_config = hf_tiny.config_dict


def test_parses_qwen2_and_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_config("qwen2_tied")))
    qwen = arch_config_from_hf(tmp_path)  # a directory
    assert (qwen.num_heads, qwen.num_kv_heads, qwen.head_dim, qwen.num_layers) == (4, 2, 16, 4)
    assert qwen.qkv_bias and qwen.tie_embeddings and qwen.rope_theta == 1e6 and qwen.rope_scaling is None
    llama = arch_config_from_hf(_config("llama3"))  # a dict
    assert not llama.qkv_bias and not llama.tie_embeddings
    assert llama.rope_scaling["rope_type"] == "llama3"


def test_old_style_rope_keys():
    cfg = _config("llama3")
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    arch = arch_config_from_hf(cfg)
    assert arch.rope_theta == 10000.0 and arch.rope_scaling["factor"] == 4.0


def test_padded_vocab():
    arch = arch_config_from_hf(_config("qwen2"))
    assert arch.vocab_size == 300
    assert arch.padded_vocab_size(1) == 384 and arch.padded_vocab_size(2) == 512


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_rope_frequencies_match_transformers(kind):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = hf_tiny.tiny_config(kind)
    arch = arch_config_from_hf(_config(kind))
    rope_type = hf_cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        theta = hf_cfg.rope_parameters["rope_theta"]
        expected = 1.0 / theta ** (torch.arange(0, 16, 2).float() / 16)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(arch), expected.float())


def test_unsupported_architecture_names_file_value_and_supported(tmp_path):
    cfg = _config("qwen2") | {"architectures": ["MistralForCausalLM"]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{path}.*MistralForCausalLM.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        arch_config_from_hf(path)


def test_unsupported_setting_names_key():
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        arch_config_from_hf(_config("qwen2") | {"use_sliding_window": True})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        arch_config_from_hf(_config("qwen2") | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})


@pytest.mark.parametrize(
    "tp,pp,key",
    [(3, 1, "num_attention_heads"), (4, 1, "num_key_value_heads"), (1, 3, "num_hidden_layers")],
)
def test_layout_not_dividing_the_model(tp, pp, key):
    arch = arch_config_from_hf(_config("qwen2"))
    with pytest.raises(ValueError, match=rf"{key}=\d+ is not divisible by (tp|pp)={max(tp, pp)}; choose"):
        check_parallel_layout(arch, tp, pp)


def test_transformer_config_matches_arch():
    arch = arch_config_from_hf(_config("qwen2"))
    cfg = transformer_config(arch, tp=2, pp=2, dtype=torch.float32, spec="local")
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size) == (2, 16, 128)
    assert cfg.add_qkv_bias and not cfg.add_bias_linear and cfg.gated_linear_unit
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-6


@pytest.mark.skipif(HAVE_TE, reason="checks the error raised without Transformer Engine")
@pytest.mark.parametrize(
    "fp8,option",
    [
        (FP8Options(format="e4m3"), "fp8.format"),
        (FP8Options(recipe="blockwise"), "fp8.recipe"),
        (FP8Options(param=True), "fp8.param"),
        (FP8Options(first_last_layers_bf16=True), "fp8.first_last_layers_bf16"),
    ],
)
def test_fp8_without_transformer_engine_names_the_option(fp8, option):
    arch = arch_config_from_hf(_config("qwen2"))
    with pytest.raises(ValueError, match=rf"{option}=.*needs Transformer Engine"):
        transformer_config(arch, 1, 1, torch.float32, "local", fp8)


def test_sequence_parallel_without_transformer_engine_layers():
    arch = arch_config_from_hf(_config("qwen2"))
    with pytest.raises(ValueError, match=r"parallel.sequence_parallel needs Transformer Engine layers"):
        transformer_config(arch, 2, 1, torch.float32, "local", overrides={"sequence_parallel": True})


@pytest.mark.skipif(HAVE_TE, reason="checks the error raised without Transformer Engine")
def test_te_spec_without_transformer_engine():
    with pytest.raises(ValueError, match="needs Transformer Engine"):
        resolve_spec_name("te")
    assert resolve_spec_name("auto") == "sdpa"
