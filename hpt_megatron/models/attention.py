"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` score matrix; this module
lets torch pick a fused kernel (flash / memory-efficient on GPU, math on CPU) and never repeats K/V for
GQA. It is a drop-in ``core_attention`` for the local layer spec (see ``specs.py``).

Packed (padding-free) micro-batches arrive in Megatron's ``thd`` format: rows concatenated into t
tokens, segment boundaries in ``PackedSeqParams.cu_seqlens_q``, and no attention mask at all. On CUDA
with bf16/fp16 they go to torch's varlen flash attention; elsewhere segments of similar length are
gathered into small padded batches, each one causal SDPA call, so memory is linear in the tokens
(at most ``PAD_RATIO`` x t slots) and never t x t.

Shapes (per tensor-parallel rank): s = sequence, b = batch, t = packed tokens, np = query heads,
ng = KV groups, hn = head dim, g = segments in a group, m = the group's longest segment.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

try:  # torch's varlen flash attention (CUDA); without it packed rows take the grouped SDPA path
    from torch.nn.attention.varlen import varlen_attn

    HAVE_VARLEN = True
except ImportError:
    HAVE_VARLEN = False


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
        ``[b or 1, 1, sq, sk]`` with True = masked out (or None = causal) -> ``[sq, b, np * hn]``.
        Packed: query ``[t, np, hn]``, key/value ``[t, ng, hn]``, causal within each segment of
        ``packed_seq_params.cu_seqlens_q`` -> ``[t, np * hn]``."""
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support attention_bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, attention_mask, packed_seq_params)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        keep = None if attention_mask is None else ~attention_mask
        out = self._sdpa(q, k, v, keep, causal and q.shape[2] > 1)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_rank * self.head_dim)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep, causal: bool) -> torch.Tensor:
        """[b, np, s, hn] queries, [b, ng, s, hn] keys/values -> [b, np, s, hn]."""
        dropout = self.dropout_p if self.training else 0.0
        with _rng_fork(dropout > 0 and not self.config.sequence_parallel):
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=keep,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=self.heads_per_rank != self.groups_per_rank,
            )

    def _packed(self, query, key, value, attention_mask, params) -> torch.Tensor:
        if params.qkv_format != "thd" or attention_mask is not None:
            raise ValueError(
                "SDPACoreAttention runs packed sequences in the 'thd' format without an attention mask "
                f"(got qkv_format={params.qkv_format!r}, mask {'given' if attention_mask is not None else 'None'})"
            )
        same_kv = params.cu_seqlens_kv is params.cu_seqlens_q or torch.equal(
            params.cu_seqlens_kv, params.cu_seqlens_q
        )
        if params.cu_seqlens_q_padded is not None or not same_kv:
            raise ValueError(
                "SDPACoreAttention packs self-attention without per-segment padding: cu_seqlens_kv must "
                "equal cu_seqlens_q and cu_seqlens_q_padded must be None"
            )
        if _use_varlen(query, self.training and self.dropout_p > 0):
            return self._varlen(query, key, value, params)
        plan = _segment_plan(params.cu_seqlens_q)
        q, k, v = (_ToPadded.apply(t, plan) for t in (query, key, value))
        outs = []
        for offset, g, m in plan.groups:
            q_g, k_g, v_g = (
                t[offset : offset + g * m].view(g, m, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)
            )
            out = self._sdpa(q_g, k_g, v_g, None, m > 1)  # [g, np, m, hn]; padding only after real keys
            outs.append(out.transpose(1, 2).reshape(g * m, -1))
        return _ToPacked.apply(torch.cat(outs), plan)

    def _varlen(self, query, key, value, params) -> torch.Tensor:
        cu = params.cu_seqlens_q.to(query.device, torch.int32)
        out = varlen_attn(
            query,
            key,
            value,
            cu,
            cu,
            int(params.max_seqlen_q),
            int(params.max_seqlen_q),
            scale=self.softmax_scale,
            window_size=(-1, 0),  # causal
            enable_gqa=self.heads_per_rank != self.groups_per_rank,
        )
        return out.reshape(query.shape[0], -1)


def _tp_world_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def _rng_fork(enabled: bool):
    """Dropout inside TP regions draws from the model-parallel RNG stream, as megatron's attention does."""
    if enabled:
        return tensor_parallel.get_cuda_rng_tracker().fork()
    return contextlib.nullcontext()


PAD_RATIO = 1.5  # padded slots per real token, at most, in one group of packed segments


@dataclass
class SegmentPlan:
    """How packed segments are batched for attention. Padded slots are laid out group after group,
    each group [g, m] row-major. ``slot_token`` [P]: the packed token in each slot (padding repeats
    its row's last token), ``is_pad`` [P], ``token_slot`` [t]: the slot of each token, ``groups``:
    (first slot, g, m)."""

    groups: list[tuple[int, int, int]]
    slot_token: torch.Tensor
    is_pad: torch.Tensor
    token_slot: torch.Tensor


class _ToPadded(torch.autograd.Function):
    """Packed [t, ...] -> padded slots [P, ...]. Padding slots get no gradient (their outputs are
    never read and real queries never see their keys), so the backward is a gather of each token's
    own slot, not a scatter-add (slow on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        ctx.plan = plan
        return x.index_select(0, plan.slot_token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(0, ctx.plan.token_slot), None


class _ToPacked(torch.autograd.Function):
    """Padded slots [P, ...] -> packed [t, ...]; the backward puts each token's gradient in its
    slot and zeros in the padding slots (a gather and a fill)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        ctx.plan = plan
        return y.index_select(0, plan.token_slot)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan = ctx.plan
        out = grad.index_select(0, plan.slot_token)
        return out.masked_fill_(plan.is_pad.view(-1, *[1] * (grad.dim() - 1)), 0.0), None


_plan_cache: list = [None, None]  # (cu_seqlens tensor, plan): every layer of one forward shares it


def _segment_plan(cu_seqlens: torch.Tensor) -> SegmentPlan:
    if _plan_cache[0] is not cu_seqlens:
        _plan_cache[:] = [cu_seqlens, build_segment_plan(cu_seqlens.tolist(), cu_seqlens.device)]
    return _plan_cache[1]


def group_segments(lengths: list[int], pad_ratio: float = PAD_RATIO) -> list[list[int]]:
    """Segment indices grouped by length (longest first) so that each group's padded size
    ``len(group) * longest`` stays within ``pad_ratio`` x its real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= pad_ratio * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


def build_segment_plan(cu_seqlens: list[int], device) -> SegmentPlan:
    starts, lengths = cu_seqlens[:-1], [b - a for a, b in itertools.pairwise(cu_seqlens)]
    token_slot = torch.empty(cu_seqlens[-1], dtype=torch.long)
    slot_token, groups, offset = [], [], 0
    for members in group_segments(lengths):
        m = lengths[members[0]]
        pos = torch.arange(m)
        for j, i in enumerate(members):
            n = lengths[i]
            # padding follows a row's real tokens: causal attention never shows it to a real query
            slot_token.append(starts[i] + pos.clamp(max=n - 1))
            token_slot[starts[i] : starts[i] + n] = offset + j * m + pos[:n]
        groups.append((offset, len(members), m))
        offset += len(members) * m
    slot_token = torch.cat(slot_token)
    is_pad = torch.ones(offset, dtype=torch.bool)
    is_pad[token_slot] = False
    return SegmentPlan(groups, slot_token.to(device), is_pad.to(device), token_slot.to(device))


def _use_varlen(query: torch.Tensor, dropout: bool) -> bool:
    """torch's varlen flash attention: CUDA, half precision, no dropout."""
    return HAVE_VARLEN and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not dropout
