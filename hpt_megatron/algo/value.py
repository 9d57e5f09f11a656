"""The critic's side of PPO, in pure torch: value targets from GAE, the clipped value loss and the
critic's diagnostics.

Legend: B rows, T response positions (the actor's target positions: position t holds the value
of the state before the token at t + 1 is emitted, so ``values_BT`` lines up with ``logp_BT``).

The value loss is a token mean over the GLOBAL number of critic tokens of the mini-batch
(``num_tokens``), like every actor loss: summing it over micro-batches and data-parallel ranks
equals the loss of the whole mini-batch in one piece.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from hpt_megatron.algo.advantages import GAE
from hpt_megatron.algo.types import ScoredRows, Source

EPS = 1e-8


@dataclass(frozen=True)
class ValueLoss:
    """``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)`` per token, summed over
    critic tokens and divided by ``num_tokens`` (reduction: global token mean). ``clip=None`` is the
    plain squared error ``0.5 * (V - R)^2``."""

    clip: float | None = 0.5

    def __call__(
        self, values_BT: Tensor, old_values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor, num_tokens: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        mask = mask_BT.to(values_BT.dtype)
        returns = returns_BT.to(values_BT.dtype)
        plain_BT = (values_BT - returns) ** 2
        if self.clip is None:
            per_token_BT, clipped_BT = plain_BT, torch.zeros_like(plain_BT)
        else:
            old = old_values_BT.to(values_BT.dtype)
            # clamp V itself (not V - V_old): inside the band it is V exactly, so that branch never counts
            v_clip_BT = torch.clamp(values_BT, old - self.clip, old + self.clip)
            far_BT = (v_clip_BT - returns) ** 2
            per_token_BT = torch.maximum(plain_BT, far_BT)
            clipped_BT = (far_BT > plain_BT).to(values_BT.dtype)  # the clipped branch is the active one
        denom = max(float(num_tokens), 1.0)
        loss = 0.5 * (per_token_BT * mask).sum() / denom
        metrics = {
            "critic/value_loss": loss.detach(),
            "critic/value_clip_frac": (clipped_BT * mask).sum().detach() / denom,
            "critic/values_mean": (values_BT.detach() * mask).sum() / denom,
        }
        return loss, metrics


def critic_mask(mask_BT: Tensor, source_B: Tensor) -> Tensor:
    """The tokens the critic is trained on: the response tokens of rollout (RL) rows."""
    return mask_BT * (source_B == int(Source.RL)).to(mask_BT.dtype)[:, None]


def gae_estimator(terms: dict) -> GAE | None:
    """The GAE estimator of an algorithm's terms (the first one; None when no term uses GAE)."""
    return next((t.advantage for t in terms.values() if isinstance(t.advantage, GAE)), None)


def needs_critic(algo) -> bool:
    """Whether an algorithm's advantages need critic values."""
    return gae_estimator(algo.terms) is not None


def gae_returns(estimator: GAE, rows: ScoredRows) -> Tensor:
    """Value targets ``R_t = A_t + V_t`` from the un-whitened GAE advantages (float64, 0 off-mask).
    ``rows.values_BT`` are the critic's values at rollout time (the ones the advantages used)."""
    assert rows.values_BT is not None, "gae_returns needs the rollout-time values"
    adv_BT = dataclasses.replace(estimator, whiten=False)(rows)
    mask = rows.mask_BT.double()
    return (adv_BT + rows.values_BT.double() * mask) * mask


def explained_variance(values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens: 1 for a perfect critic, 0 for one that
    predicts the mean return, negative for one worse than that (nan with fewer than two tokens or
    constant returns)."""
    sel = mask_BT > 0
    if int(sel.sum()) < 2:
        return float("nan")
    r, v = returns_BT[sel].double(), values_BT[sel].double()
    var_r = r.var(unbiased=False)
    if float(var_r) < EPS:
        return float("nan")
    return float(1.0 - (r - v).var(unbiased=False) / var_r)
