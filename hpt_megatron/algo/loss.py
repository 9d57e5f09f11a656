"""The UPGE loss: compose each term's four parts into a per-token surrogate, reduce with global
counts, add the entropy bonus and the KL penalty.

Per token of a term (sg = stop-gradient):
    r       = exp(log f(pi) - sg(log pi_ref))              gradient f'(pi) grad(pi) / pi_ref
    loss_t  = -coef_row * weight_row * A_t * 1_stable_t * r
so d loss / d theta = -coef_row * weight_row * A_t * 1_stable_t * f'(pi) grad(pi) / pi_ref: Table 1.
For pi_ref = pi_theta the reported value is log f(pi) (the NLL for SFT) instead of the constant 1.

A term's ``correction`` (train-inference mismatch, ``mismatch.py``) multiplies loss_t by a
detached weight w_t on rollout tokens, so their gradient is w_t times the one above.

Every reduction divides by global counts except the ``released_*`` ones (``reductions.py``), which
reproduce the released code's per-micro-batch normalisers and gradient averaging over
data-parallel ranks (``LossInputs.dp_size``); ``algo.regularizer_reduction`` chooses the same for the
entropy bonus and the KL penalty.

All metrics are divided by the same global counts, so summing them over micro-batches and
data-parallel ranks gives the mini-batch value (keys ending in ``_max`` / ``_min`` reduce by max /
min instead: ``combine_rule``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hpt_megatron.algo.masks import MAX_LOG_RATIO, MaskContext
from hpt_megatron.algo.mismatch import correction_weight, k3, log_rollout_ratio
from hpt_megatron.algo.reductions import TokenMean
from hpt_megatron.algo.spec import AlgoConfig, KLPenalty, Term
from hpt_megatron.algo.types import Counts, LossInputs, Source

ALL = "all"
ROLLOUT = "rollout"  # on-policy rollout rows, for the rollout/actor log-prob mismatch
GLOBAL_TOKEN_MEAN = TokenMean()


def count_rows(algo: AlgoConfig, source_B: Tensor, mask_BT: Tensor) -> Counts:
    """This micro-batch's token/row counts per term (and for all rows); sum them over the
    mini-batch and all-reduce over data-parallel ranks to get the global ``Counts``."""
    m = mask_BT.double()
    tokens, seqs = {ALL: float(m.sum())}, {ALL: float((m.sum(-1) > 0).sum())}
    rl = m * (source_B == int(Source.RL))[:, None]
    tokens[ROLLOUT], seqs[ROLLOUT] = float(rl.sum()), float((rl.sum(-1) > 0).sum())
    for name, term in algo.terms.items():
        rows = torch.isin(source_B, torch.tensor(term.source_ids(), device=source_B.device))
        tm = m * rows[:, None]
        tokens[name] = float(tm.sum())
        seqs[name] = float((tm.sum(-1) > 0).sum())
    return Counts(tokens=tokens, seqs=seqs)


def _term_mask(term: Term, x: LossInputs) -> Tensor:
    ids = torch.tensor(term.source_ids(), device=x.source_B.device)
    rows = torch.isin(x.source_B, ids)
    return x.mask_BT.to(x.logp_BT.dtype) * rows[:, None]


def term_loss(name: str, term: Term, x: LossInputs, counts: Counts) -> tuple[Tensor, dict[str, Tensor]]:
    m_BT = _term_mask(term, x)
    real = m_BT.bool()
    adv_BT = x.advantages[name].to(x.logp_BT.dtype) * term.weight(x.advantages[name], x.entropy_BT, m_BT)
    ctx = MaskContext(logp_BT=x.logp_BT.detach(), old_logp_BT=x.old_logp_BT, adv_BT=adv_BT, mask_BT=m_BT)
    mask_out = term.mask(ctx)
    keep_BT, clipped_BT = mask_out.weight_BT, mask_out.clipped_BT

    log_f = term.transform.log_f(x.logp_BT)
    log_ref = term.ref.log_ref(x.logp_BT, x.old_logp_BT, m_BT)
    diff = torch.where(real, log_f - log_ref, 0.0).clamp(max=MAX_LOG_RATIO)
    r = torch.exp(diff)
    surrogate = r - r.detach() + torch.where(real, log_f, 0.0).detach() if term.ref.log_likelihood_form else r

    weighted = keep_BT * surrogate
    if mask_out.dropped_value_BT is not None:
        weighted = weighted + (1.0 - keep_BT) * mask_out.dropped_value_BT.detach()
    per_tok = -(x.row_coef()[:, None] * adv_BT) * weighted
    w_BT, correction_metrics = correction_weight(
        name, term.correction, x, m_BT, counts.tokens.get(ROLLOUT, 0.0)
    )
    if w_BT is not None:
        per_tok = w_BT * per_tok
    per_tok = torch.where(real, per_tok, 0.0)
    n_tok, n_seq = counts.tokens.get(name, 0.0), counts.seqs.get(name, 0.0)
    loss = term.coef * term.reduction(per_tok, m_BT, n_tok, n_seq, dp_size=x.dp_size)

    denom = max(n_tok, 1.0)
    metrics = {
        f"loss/{name}": loss.detach(),
        f"{name}/clip_frac": (clipped_BT.to(m_BT.dtype) * m_BT).sum() / denom,
        f"{name}/nll": (-x.logp_BT.detach() * m_BT).sum() / denom,
    }
    if x.old_logp_BT is not None:
        log_ratio = torch.where(real, x.logp_BT.detach() - x.old_logp_BT, 0.0)
        metrics[f"{name}/ratio_mean"] = (torch.exp(log_ratio) * m_BT).sum() / denom
        metrics[f"{name}/ratio_max"] = torch.where(real, torch.exp(log_ratio), 0.0).max()
    metrics.update(correction_metrics)
    return loss, metrics


def kl_estimate(logp_BT: Tensor, ref_logp_BT: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi."""
    x = ref_logp_BT - logp_BT
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x.pow(2)
    return torch.exp(x.clamp(max=MAX_LOG_RATIO)) - x - 1.0


def _all_mean(v_BT: Tensor, x: LossInputs, counts: Counts) -> Tensor:
    m = x.mask_BT.to(v_BT.dtype)
    return (torch.where(m.bool(), v_BT, 0.0) * m).sum() / max(counts.tokens.get(ALL, 0.0), 1.0)


def _all_reduce(v_BT: Tensor, x: LossInputs, counts: Counts, reduction) -> Tensor:
    """``v_BT`` over all rows, reduced by ``reduction`` (``token_mean``: the same as ``_all_mean``)."""
    m = x.mask_BT.to(v_BT.dtype)
    v = torch.where(m.bool(), v_BT, 0.0)
    return reduction(v, m, counts.tokens.get(ALL, 0.0), counts.seqs.get(ALL, 0.0), dp_size=x.dp_size)


def regularizers(
    entropy_coef: float, kl: KLPenalty, x: LossInputs, counts: Counts, reduction: Any = GLOBAL_TOKEN_MEAN
):
    """Entropy bonus and KL penalty over all rows, reduced by ``reduction`` (``algo.regularizer_reduction``;
    default the global token mean). The ``actor/entropy`` and ``actor/kl`` metrics are always global
    token means; ``loss/entropy_bonus`` and ``loss/kl`` are what enters the loss."""
    global_mean = isinstance(reduction, TokenMean)
    loss = x.logp_BT.new_zeros(())
    metrics: dict[str, Tensor] = {}
    if x.entropy_BT is not None:
        entropy = _all_mean(x.entropy_BT, x, counts)
        metrics["actor/entropy"] = entropy.detach()
        if entropy_coef:
            bonus = entropy if global_mean else _all_reduce(x.entropy_BT, x, counts, reduction)
            loss = loss - entropy_coef * bonus
            metrics["loss/entropy_bonus"] = (-entropy_coef * bonus).detach()
    if kl.coef:
        if x.ref_logp_BT is None:
            raise ValueError(
                "algo.kl.coef > 0 needs reference-model log-probs (ref_logp_BT); none were given"
            )
        kl_BT = kl_estimate(x.logp_BT, x.ref_logp_BT, kl.estimator)
        kl_mean = _all_mean(kl_BT, x, counts)
        kl_loss = kl_mean if global_mean else _all_reduce(kl_BT, x, counts, reduction)
        loss = loss + kl.coef * kl_loss
        metrics["actor/kl"] = kl_mean.detach()
        metrics["loss/kl"] = (kl.coef * kl_loss).detach()
    return loss, metrics


def rollout_mismatch(
    logp_BT: Tensor, rollout_logp_BT: Tensor, x: LossInputs, counts: Counts
) -> dict[str, Tensor]:
    """How far the actor's log-probs of sampled tokens are from the rollout engine's (additive)."""
    m = x.mask_BT.to(logp_BT.dtype) * (x.source_B == int(Source.RL))[:, None]
    n = max(counts.tokens.get(ROLLOUT, 0.0), 1.0)
    diff = log_rollout_ratio(logp_BT, rollout_logp_BT, m)
    return {
        "rollout/logp_mismatch_abs": (diff.abs() * m).sum() / n,
        "rollout/logp_mismatch_k3": (k3(diff) * m).sum() / n,
        "rollout/logp_mismatch_max": (diff.abs() * m).max() if m.numel() else diff.new_zeros(()),
    }


def upge_loss(algo: AlgoConfig, x: LossInputs, counts: Counts) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch, already divided by the global counts: sum it (and its gradient)
    over micro-batches and data-parallel ranks to get the mini-batch loss."""
    if algo.entropy_coef and x.entropy_BT is None:
        raise ValueError("algo.entropy_coef != 0 needs the current policy's token entropy (entropy_BT)")
    total = x.logp_BT.new_zeros(())
    metrics: dict[str, Tensor] = {}
    for name, term in algo.terms.items():
        loss, m = term_loss(name, term, x, counts)
        total = total + loss
        metrics.update(m)
    reg, m = regularizers(algo.entropy_coef, algo.kl, x, counts, algo.regularizer_reduction)
    metrics.update(m)
    total = total + reg
    metrics["loss/total"] = total.detach()
    return total, metrics


def combine_rule(key: str):
    """How values of one metric from several micro-batches, ranks or updates combine: ``max`` for
    keys ending in ``_max``, ``min`` for ``_min``, None for the default (sum, or mean over updates)."""
    if key.endswith("_max"):
        return max
    if key.endswith("_min"):
        return min
    return None


def mean_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Combine per-update metrics (each already merged over micro-batches): the mean over the
    updates that report a key, or its ``combine_rule``."""
    out: dict[str, float] = {}
    for k in {k for p in parts for k in p}:
        values = [float(p[k]) for p in parts if k in p]
        rule = combine_rule(k)
        out[k] = rule(values) if rule else sum(values) / len(values)
    return out


def merge_metrics(parts: list[dict[str, Tensor]]) -> dict[str, float]:
    """Combine micro-batch metrics: sum, or the key's ``combine_rule``."""
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            v = float(v)
            rule = combine_rule(k)
            out[k] = rule(out.get(k, v), v) if rule else out.get(k, 0.0) + v
    return out
