"""Tiny random Hugging Face models (the numerical oracle for the Megatron tests).

Vocab 300 is not a multiple of 128, so vocab padding matters; biases and norm weights are randomised so
that a swapped or dropped tensor changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
KINDS = ("qwen2_tied", "qwen2", "llama3")

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
# Llama-3 scaling with a short original context so that most frequencies are scaled at test lengths.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny_config(kind: str):
    from transformers import LlamaConfig, Qwen2Config

    if kind == "qwen2_tied":
        return Qwen2Config(**_COMMON, tie_word_embeddings=True, rope_theta=1e6)
    if kind == "qwen2":
        return Qwen2Config(**_COMMON, tie_word_embeddings=False, rope_theta=1e6)
    if kind == "llama3":
        return LlamaConfig(**_COMMON, tie_word_embeddings=False, rope_parameters=dict(_LLAMA3_ROPE))
    raise ValueError(kind)


def config_dict(kind: str) -> dict:
    """The ``config.json`` content of a tiny model of ``kind`` (with ``architectures``)."""
    cfg = tiny_config(kind).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM" if kind == "llama3" else "Qwen2ForCausalLM"]
    return cfg


def tiny_model(kind: str, seed: int = 0):
    """A randomly initialised tiny HF causal LM in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return model.float().eval()


def save_tiny(kind: str, directory: str | Path, seed: int = 0):
    """Save a tiny model (safetensors + config.json) to ``directory``; return the model."""
    model = tiny_model(kind, seed)
    model.save_pretrained(directory)
    return model


def tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)
