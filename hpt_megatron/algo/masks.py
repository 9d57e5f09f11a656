"""Stabilization masks 1_stable: which tokens pass gradient, as a detached per-token weight.

A mask returns a ``MaskOut``. Its weight multiplies the token's surrogate, so the token's gradient
becomes ``weight * A * grad(pi) / pi_ref``: 0/1 for hard masks (PPO, GSPO), the clipped importance
weight over the raw ratio for CISPO. Hard masks also give the (detached) surrogate value a dropped
token reports, so the loss VALUE equals the usual clipped objective, e.g. ``-A * clip(r)`` for PPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hpt_megatron.algo.registry import Registry

MASKS: Registry = Registry("mask")

# exp() of a log-ratio beyond this is treated as this (the token is clipped anyway in practice);
# it keeps padded or wildly off-policy tokens from producing inf * 0 = nan.
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class MaskOut:
    weight_BT: Tensor  # detached; multiplies the surrogate
    clipped_BT: Tensor  # bool, for the clip-fraction metric
    dropped_value_BT: Tensor | None = None  # surrogate value of tokens with weight 0


@dataclass(frozen=True)
class MaskContext:
    logp_BT: Tensor  # detached current log-probs
    old_logp_BT: Tensor | None
    adv_BT: Tensor
    mask_BT: Tensor


def old_ratio(ctx: MaskContext, family: str) -> Tensor:
    if ctx.old_logp_BT is None:
        raise ValueError(f"mask {family!r} needs the rollout policy's log-probs (pi_old); none were given")
    log_ratio = torch.where(ctx.mask_BT.bool(), ctx.logp_BT - ctx.old_logp_BT, 0.0)
    return torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


def seq_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Per-row mean over real tokens -> [B]; rows without tokens give 0."""
    m = mask_BT.to(x_BT.dtype)
    return (x_BT * m).sum(-1) / m.sum(-1).clamp(min=1.0)


@MASKS.register
@dataclass(frozen=True)
class NoMask:
    name: ClassVar[str] = "none"
    needs_old_logp: ClassVar[bool] = False

    def __call__(self, ctx: MaskContext) -> MaskOut:
        return MaskOut(torch.ones_like(ctx.logp_BT), torch.zeros_like(ctx.logp_BT, dtype=torch.bool))


@MASKS.register
@dataclass(frozen=True)
class PPOClip:
    """PPO's clipped objective as a mask: a token loses its gradient when the ratio left the trust
    region in the direction the advantage pushes it (``eps_low``/``eps_high`` separate, as in DAPO).

    ``dual_clip = c`` (> 1) is dual-clip PPO (Ye et al. 2020) exactly as verl's
    ``compute_policy_loss_vanilla`` with ``clip_ratio_c = c``: for a token with A < 0 the loss
    ``max(-A r, -A clip(r))`` is capped at ``-A c``, so a token with A < 0 and r > c reports ``-A c``
    and passes no gradient. ``null`` or ``0`` turns it off (the released HPT/LUFFY code has none).
    The component default is off; the verl-family presets set c = 3, verl's default."""

    name: ClassVar[str] = "ppo_clip"
    needs_old_logp: ClassVar[bool] = True
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None

    def __post_init__(self):
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(
                f"ppo_clip: eps_low and eps_high must be >= 0, got {self.eps_low}, {self.eps_high}"
            )
        if self.dual_clip == 0:
            object.__setattr__(self, "dual_clip", None)  # 0 = off, as null; one spelling compares equal
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"ppo_clip: dual_clip must be > 1 (or null), got {self.dual_clip}")

    def __call__(self, ctx: MaskContext) -> MaskOut:
        r = old_ratio(ctx, self.name)
        a = ctx.adv_BT
        clipped = ((a > 0) & (r > 1.0 + self.eps_high)) | ((a < 0) & (r < 1.0 - self.eps_low))
        value = r.clamp(1.0 - self.eps_low, 1.0 + self.eps_high)
        if self.dual_clip is not None:
            dual = (a < 0) & (r > self.dual_clip)
            clipped = clipped | dual
            value = torch.where(dual, torch.full_like(r, self.dual_clip), value)
        return MaskOut((~clipped).to(ctx.logp_BT.dtype), clipped, value)


@MASKS.register
@dataclass(frozen=True)
class CISPO:
    """CISPO: keep every token's gradient but cap its importance weight (stop-gradient).
    With pi_ref = pi_old the token gradient is ``clip(r) * A * grad(log pi)``; as a mask that is the
    weight ``clip(r) / r``. ``eps_low = None`` leaves the lower side unclipped (MiniMax-M1)."""

    name: ClassVar[str] = "cispo"
    needs_old_logp: ClassVar[bool] = True
    eps_low: float | None = None
    eps_high: float = 0.28

    def __call__(self, ctx: MaskContext) -> MaskOut:
        r = old_ratio(ctx, self.name)
        low = 0.0 if self.eps_low is None else 1.0 - self.eps_low
        capped = r.clamp(min=low, max=1.0 + self.eps_high)
        return MaskOut(capped / r, capped != r)


@MASKS.register
@dataclass(frozen=True)
class GSPOSeqClip:
    """GSPO's sequence-level clip: the whole row loses its gradient when its length-normalised
    sequence ratio ``s = exp(mean_t(log pi - log pi_old))`` left ``[1 - eps_low, 1 + eps_high]`` in
    the direction of its advantage."""

    name: ClassVar[str] = "gspo_seq_clip"
    needs_old_logp: ClassVar[bool] = True
    eps_low: float = 3e-4
    eps_high: float = 4e-4

    def __call__(self, ctx: MaskContext) -> MaskOut:
        if ctx.old_logp_BT is None:
            raise ValueError(
                f"mask {self.name!r} needs the rollout policy's log-probs (pi_old); none were given"
            )
        s_B = torch.exp(
            seq_mean(ctx.logp_BT - ctx.old_logp_BT, ctx.mask_BT).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        )
        a_B = seq_mean(ctx.adv_BT, ctx.mask_BT)
        clipped_B = ((a_B > 0) & (s_B > 1.0 + self.eps_high)) | ((a_B < 0) & (s_B < 1.0 - self.eps_low))
        clipped = clipped_B[:, None].expand_as(ctx.logp_BT)
        value = s_B.clamp(1.0 - self.eps_low, 1.0 + self.eps_high)[:, None].expand_as(ctx.logp_BT)
        return MaskOut((~clipped).to(ctx.logp_BT.dtype), clipped, value)
