"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` score matrix; this module
lets torch pick a fused kernel (flash / memory-efficient on GPU, math on CPU) and never repeats K/V for
GQA. It is a drop-in ``core_attention`` for the local layer spec (see ``specs.py``).

Shapes (per tensor-parallel rank): s = sequence, b = batch, np = query heads, ng = KV groups,
hn = head dim.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """Causal (or explicitly masked) attention through torch SDPA, GQA-aware.

    Constructor arguments follow megatron's core-attention interface so ``build_module`` can create it.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism; set cp=1")
        if config.window_size is not None:
            raise ValueError("SDPACoreAttention does not support sliding-window attention (window_size)")
        tp = pg_collection.tp.size() if pg_collection is not None else _tp_world_size()
        self.heads_per_rank = config.num_attention_heads // tp
        self.groups_per_rank = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
        **unused,
    ) -> torch.Tensor:
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``, attention_mask bool
        ``[b or 1, 1, sq, sk]`` with True = masked out (or None = causal) -> ``[sq, b, np * hn]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor attention_bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        keep = None if attention_mask is None else ~attention_mask
        dropout = self.dropout_p if self.training else 0.0
        with _rng_fork(dropout > 0 and not self.config.sequence_parallel):
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=keep,
                dropout_p=dropout,
                is_causal=causal and q.shape[2] > 1,
                scale=self.softmax_scale,
                enable_gqa=self.heads_per_rank != self.groups_per_rank,
            )
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_rank * self.head_dim)


def _tp_world_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def _rng_fork(enabled: bool):
    """Dropout inside TP regions draws from the model-parallel RNG stream, as megatron's attention does."""
    if enabled:
        return tensor_parallel.get_cuda_rng_tracker().fork()
    return contextlib.nullcontext()
