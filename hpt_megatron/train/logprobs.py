"""Per-token log-probabilities and entropy over a vocabulary split across tensor-parallel ranks.

Shapes: S tokens (flattened), V_local = this rank's vocabulary shard, starting at ``vocab_start``.

No rank ever holds the full vocabulary: each rank reduces its shard (log-sum-exp, the target's
log-prob, for the entropy the sum of p * z) and per-token scalars are all-reduced. Tokens are
processed in chunks through one reused [chunk, V_local] buffer (fused log_softmax into it), and the
backward recomputes each chunk's softmax straight into the gradient, so besides the logits and their
gradient the peak extra memory is one or two [chunk, V_local] fp32 buffers, not [S, V] ones. The
backward needs no communication: every term it uses that sums over the vocabulary was saved per
token in the forward, and it skips the entropy terms when the entropy is only logged.

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


def _local_stats(z: Tensor, work: Tensor, local_targets: Tensor, with_entropy: bool):
    """This shard's (lse_r, target log-prob under the shard's own softmax, sum_j p_j z_j) of the
    chunk ``z`` [C, V]; ``work`` [C, V] is overwritten (reused across chunks: on CPU a fresh
    buffer of this size costs as much as the math, in page faults)."""
    torch.ops.aten._log_softmax.out(z, -1, False, out=work)  # fused; log_softmax has no out=
    # at the row's largest logit log p = -log sum_j exp(z_j - max) as the kernel computed it, so
    # this lse is exact (two value-only max passes are cheaper than one max with indices on CPU)
    lse_r = z.amax(dim=-1) - work.amax(dim=-1)
    owned = (local_targets >= 0) & (local_targets < z.shape[-1])
    index = local_targets.clamp(0, z.shape[-1] - 1)[:, None]
    target_logp_r = torch.where(owned, work.gather(-1, index).squeeze(-1), float("-inf"))
    ez_r = work.exp_().mul_(z).sum(-1) if with_entropy else None
    return lse_r, target_logp_r, ez_r


def _chunk_stats(z: Tensor, work: Tensor, targets: Tensor, vocab_start: int, group, with_entropy: bool):
    """Global (lse, target log-prob, sum_j p_j z_j) of one chunk of scaled logits ``z`` [C, V_valid].

    Each rank reduces its own shard with fused kernels, then the shards combine through per-token
    scalars: with m = max_r lse_r and w_r = exp(lse_r - m), lse = m + log sum_r w_r, the target's
    log-prob is its shard's plus lse_r - lse, and sum_j p_j z_j = sum_r w_r ez_r / sum_r w_r."""
    if z.shape[-1]:
        lse_r, logp_r, ez_r = _local_stats(z, work, targets - vocab_start, with_entropy)
    else:  # a shard of vocabulary padding only
        lse_r = logp_r = z.new_full(z.shape[:1], float("-inf"))
        ez_r = z.new_zeros(z.shape[:1]) if with_entropy else None
    if group is None or dist.get_world_size(group) == 1:
        return lse_r, logp_r, ez_r
    m = _all_reduce(lse_r.clone(), dist.ReduceOp.MAX, group)
    w = (lse_r - m).exp()
    target_z = torch.where(torch.isfinite(logp_r), logp_r + lse_r, 0.0)  # the owner's logit, else 0
    parts = [w, target_z] + ([w * ez_r] if with_entropy else [])
    stacked = _all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)
    lse = m + torch.log(stacked[0])
    return lse, stacked[1] - lse, stacked[2] / stacked[0] if with_entropy else None


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 logits; fp64 logits (tests) stay fp64."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def default_chunk(vocab_local: int, budget_elements: int = 64 * 2**20) -> int:
    """Tokens per chunk so that one [chunk, V_local] fp32 temporary is about 256 MiB."""
    return max(1, budget_elements // max(vocab_local, 1))


def _chunk_grad(buf: Tensor, g_logp: Tensor, g_ent: Tensor | None, entropy: Tensor | None):
    """In place: ``buf`` [C, V] holds the scaled logits' log-probs on entry, d loss / d z on exit
    (without the target term): -p * g_logp, or -p * (g_logp + g_ent * (log p + H))."""
    if g_ent is None:
        return buf.exp_().mul_(-g_logp[:, None])
    p = buf.exp()
    buf.mul_(g_ent[:, None]).add_((g_logp + g_ent * entropy)[:, None])
    return buf.mul_(p).neg_()


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, n_valid, group, temperature, chunk, with_entropy):
        s, dtype = logits.shape[0], _compute_dtype(logits)
        logp = torch.empty(s, dtype=dtype, device=logits.device)
        entropy = torch.empty(s, dtype=dtype, device=logits.device) if with_entropy else None
        lse_all = torch.empty(s, dtype=dtype, device=logits.device)
        work = torch.empty(min(chunk, s), n_valid, dtype=dtype, device=logits.device)
        for a in range(0, s, chunk):
            z = _scaled(logits[a : a + chunk, :n_valid], dtype, temperature)
            w = work[: z.shape[0]]
            lse, target_logp, ez = _chunk_stats(
                z, w, targets[a : a + chunk], vocab_start, group, with_entropy
            )
            lse_all[a : a + chunk] = lse
            logp[a : a + chunk] = target_logp
            if with_entropy:
                entropy[a : a + chunk] = lse - ez
        ctx.save_for_backward(logits, targets, lse_all, entropy if with_entropy else lse_all)
        ctx.vocab_start, ctx.n_valid, ctx.temperature = vocab_start, n_valid, temperature
        ctx.chunk, ctx.with_entropy = chunk, with_entropy
        ctx.mark_non_differentiable(lse_all)
        ctx.set_materialize_grads(False)  # an entropy that only gets logged has no gradient to compute
        return logp, entropy if with_entropy else logp.new_empty(0), lse_all

    @staticmethod
    def backward(ctx, g_logp, g_entropy, _g_lse):
        """Chunk by chunk, written straight into the gradient: one [C, V] buffer besides it (two with
        an entropy gradient)."""
        logits, targets, lse_all, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        v = ctx.n_valid
        grad[:, v:] = 0  # padded vocabulary columns get no gradient
        if g_logp is None:
            g_logp = torch.zeros_like(lse_all)
        g_ent = g_entropy if ctx.with_entropy else None
        for a in range(0, logits.shape[0], ctx.chunk):
            sl = slice(a, a + ctx.chunk)
            out = grad[sl, :v]
            z = _scaled(logits[sl, :v], lse_all.dtype, ctx.temperature)
            buf = out if out.dtype == lse_all.dtype else torch.empty_like(z)
            torch.sub(z, lse_all[sl, None], out=buf)
            _chunk_grad(buf, g_logp[sl], None if g_ent is None else g_ent[sl], entropy[sl])
            local = targets[sl] - ctx.vocab_start
            rows = torch.nonzero((local >= 0) & (local < v)).squeeze(-1)
            buf[rows, local[rows]] += g_logp[sl][rows]
            if ctx.temperature != 1.0:
                buf.div_(ctx.temperature)
            if buf is not out:
                out.copy_(buf)
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
