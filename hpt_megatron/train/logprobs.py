"""Per-token log-probabilities and entropy over a vocabulary split across tensor-parallel ranks.

Shapes: S tokens (flattened), V_local = this rank's vocabulary shard, starting at ``vocab_start``.

No rank ever holds the full vocabulary: the softmax statistics are all-reduced (max, sum of exp, the
target's logit, and for the entropy the sum of p * z). Tokens are processed in chunks and the backward
pass recomputes each chunk's softmax from the logits, so besides the logits and their gradient the
peak extra memory is a few [chunk, V_local] fp32 buffers, not [S, V] ones. The backward needs no
communication: every term it uses that sums over the vocabulary was saved per token in the forward.

    logp_t = z_t[target] - lse_t                 lse = log sum_j exp(z_j)
    H_t    = lse_t - sum_j p_j z_j               p = softmax(z)
    d logp / d z_j = [j == target] - p_j
    d H / d z_j    = -p_j (log p_j + H)

with z = logits / temperature (the sampling temperature, so ratios are against the sampling policy).
The math runs in fp32 (fp64 for fp64 logits) whatever the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _all_reduce(t: Tensor, op, group) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _scaled(x: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """``x / temperature`` in ``dtype``; without a copy when nothing changes (callers never write it)."""
    x = x.to(dtype)
    return x if temperature == 1.0 else x / temperature


def _chunk_stats(z: Tensor, targets: Tensor, vocab_start: int, group, with_entropy: bool):
    """Global (lse, target logit, sum p*z) of one chunk of scaled logits ``z`` [C, V_valid].
    One [C, V] temporary besides ``z``."""
    local_max = z.max(dim=-1).values if z.shape[-1] else z.new_full(z.shape[:1], float("-inf"))
    m = _all_reduce(local_max, dist.ReduceOp.MAX, group)
    local = targets - vocab_start
    owned = (local >= 0) & (local < z.shape[-1])
    target_z = torch.where(
        owned, z.gather(-1, local.clamp(0, max(z.shape[-1] - 1, 0))[:, None]).squeeze(-1), 0.0
    )
    e = (z - m[:, None]).exp_()
    parts = [e.sum(-1), target_z]
    if with_entropy:
        parts.append(e.mul_(z).sum(-1))
    stacked = _all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)
    lse = m + torch.log(stacked[0])
    ez = stacked[2] / stacked[0] if with_entropy else None
    return lse, stacked[1], ez


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 logits; fp64 logits (tests) stay fp64."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def default_chunk(vocab_local: int, budget_elements: int = 64 * 2**20) -> int:
    """Tokens per chunk so that one [chunk, V_local] fp32 temporary is about 256 MiB."""
    return max(1, budget_elements // max(vocab_local, 1))


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, n_valid, group, temperature, chunk, with_entropy):
        s, dtype = logits.shape[0], _compute_dtype(logits)
        logp = torch.empty(s, dtype=dtype, device=logits.device)
        entropy = torch.empty(s, dtype=dtype, device=logits.device) if with_entropy else None
        lse_all = torch.empty(s, dtype=dtype, device=logits.device)
        for a in range(0, s, chunk):
            z = _scaled(logits[a : a + chunk, :n_valid], dtype, temperature)
            lse, target_z, ez = _chunk_stats(z, targets[a : a + chunk], vocab_start, group, with_entropy)
            lse_all[a : a + chunk] = lse
            logp[a : a + chunk] = target_z - lse
            if with_entropy:
                entropy[a : a + chunk] = lse - ez
        ctx.save_for_backward(logits, targets, lse_all, entropy if with_entropy else lse_all)
        ctx.vocab_start, ctx.n_valid, ctx.temperature = vocab_start, n_valid, temperature
        ctx.chunk, ctx.with_entropy = chunk, with_entropy
        ctx.mark_non_differentiable(lse_all)
        return logp, entropy if with_entropy else logp.new_empty(0), lse_all

    @staticmethod
    def backward(ctx, g_logp, g_entropy, _g_lse):
        """grad z = -p * (g_logp + g_ent * (log p + H)) + [j == target] * g_logp, two [C, V] buffers."""
        logits, targets, lse_all, entropy = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # padded vocabulary columns get no gradient
        v = ctx.n_valid
        for a in range(0, logits.shape[0], ctx.chunk):
            sl = slice(a, a + ctx.chunk)
            log_p = _scaled(logits[sl, :v], lse_all.dtype, ctx.temperature) - lse_all[sl, None]
            p = log_p.exp()
            if ctx.with_entropy:
                log_p.add_(entropy[sl, None]).mul_(g_entropy[sl, None]).add_(g_logp[sl, None])
            else:
                log_p.copy_(g_logp[sl, None].expand_as(log_p))
            g = log_p.mul_(p).neg_()
            del p
            local = targets[sl] - ctx.vocab_start
            rows = torch.nonzero((local >= 0) & (local < v)).squeeze(-1)
            g[rows, local[rows]] += g_logp[sl][rows]
            if ctx.temperature != 1.0:
                g.div_(ctx.temperature)
            grad[sl, :v] = g
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits_SV: Tensor,
    targets_S: Tensor,
    *,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    group=None,
    temperature: float = 1.0,
    chunk: int | None = None,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each target token and (optionally) the entropy of each token's distribution.

    ``logits_SV``: this rank's vocabulary shard [S, V_local] (any float dtype; math in fp32).
    ``targets_S``: global token ids. ``group``: the tensor-parallel group (None: the full vocab is
    local). ``vocab_size``: the real vocabulary size; columns of a padded vocabulary at or beyond it
    are excluded from the softmax (Megatron pads the vocabulary to a multiple of 128 * TP).
    Returns fp32 (fp64 for fp64 logits) ``logp_S`` and ``entropy_S`` (None unless ``with_entropy``).
    """
    if logits_SV.dim() != 2 or targets_S.shape != logits_SV.shape[:1]:
        raise ValueError(
            f"expected logits [S, V] and targets [S], got {tuple(logits_SV.shape)} and {tuple(targets_S.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    v_local = logits_SV.shape[-1]
    chunk = chunk or default_chunk(v_local)
    n_valid = v_local if vocab_size is None else max(0, min(v_local, vocab_size - vocab_start))
    logp, entropy, _ = _VocabParallelLogProb.apply(
        logits_SV, targets_S, vocab_start, n_valid, group, float(temperature), int(chunk), bool(with_entropy)
    )
    return logp, entropy if with_entropy else None
