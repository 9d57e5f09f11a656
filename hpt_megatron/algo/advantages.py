"""Advantage estimators A_hat, and loss-time row weights.

Estimators run once per step over every scored row of the GLOBAL batch (before micro-batching), so
group and batch statistics are exact; each returns a float64 ``adv_BT`` (row-level estimators
broadcast over tokens; the actor casts to its compute dtype). A term reads its estimator's values on its own rows; rows of one prompt form one group
whatever their source, which is how LUFFY/SRFT normalise over on- and off-policy rows together.

Groups of two or more whose rewards are all equal get zero advantage from the group estimators; a
group of one (a prompt with a single scored row) gets its raw reward from GRPO, as in verl.

Which reference each estimator matches is in its docstring ("verl" = verl's
``trainer/ppo/core_algos.py``; the released HPT code is a verl fork with the same GRPO).

Row weights (``ROW_WEIGHTS``) are the part of an advantage that depends on the current policy and
so is computed in the loss: SRFT scales rows by exp(+-entropy).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hpt_megatron.algo.masks import seq_mean
from hpt_megatron.algo.registry import Registry
from hpt_megatron.algo.types import ScoredRows, Source

ADVANTAGES: Registry = Registry("advantage estimator")
ROW_WEIGHTS: Registry = Registry("row weight")


def broadcast(adv_B: Tensor, rows: ScoredRows) -> Tensor:
    return adv_B.double()[:, None].expand(rows.mask_BT.shape).clone()


def group_stats(x_B: Tensor, group_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (mean, unbiased std, size) of the row's group."""
    _, inv = torch.unique(group_B, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    size = torch.zeros(n_groups, dtype=x_B.dtype).index_add_(0, inv, torch.ones_like(x_B))
    total = torch.zeros(n_groups, dtype=x_B.dtype).index_add_(0, inv, x_B)
    mean = total / size
    sq = torch.zeros(n_groups, dtype=x_B.dtype).index_add_(0, inv, (x_B - mean[inv]) ** 2)
    std = torch.sqrt(sq / (size - 1).clamp(min=1.0))
    return mean[inv], std[inv], size[inv]


@ADVANTAGES.register
@dataclass(frozen=True)
class Constant:
    """A = value for every token (SFT: 1; Table 1 of the HPT paper)."""

    name: ClassVar[str] = "constant"
    needs_reward: ClassVar[bool] = False
    value: float = 1.0

    def __call__(self, rows: ScoredRows) -> Tensor:
        return torch.full(rows.mask_BT.shape, self.value, dtype=torch.float64)


@ADVANTAGES.register
@dataclass(frozen=True)
class Reinforce:
    """Plain REINFORCE: ``pm1`` maps a binary reward to +1 / -1 (reward > threshold; Table 1 of the HPT
    paper, and SRFT's "-1 if wrong" rollouts); ``raw`` uses the reward itself."""

    name: ClassVar[str] = "reinforce"
    needs_reward: ClassVar[bool] = True
    mode: str = "pm1"
    threshold: float = 0.5

    def __post_init__(self):
        if self.mode not in ("pm1", "raw"):
            raise ValueError(f"reinforce: mode must be 'pm1' or 'raw', got {self.mode!r}")

    def __call__(self, rows: ScoredRows) -> Tensor:
        r = rows.rewards_B.double()
        adv = torch.where(r > self.threshold, 1.0, -1.0) if self.mode == "pm1" else r
        return broadcast(adv, rows)


GRPO_SINGLETON = ("raw", "zero")


@ADVANTAGES.register
@dataclass(frozen=True)
class GRPO:
    """Group-relative: ``(R - mean_group) / (std_group + eps)`` with the unbiased std;
    ``std_normalize=False`` is Dr.GRPO (and the released HPT/LUFFY ``grpo_use_std=False``).

    Matches verl's ``compute_grpo_outcome_advantage`` (and the released HPT fork's), including a
    group of one: ``singleton="raw"`` gives it mean 0 and std 1, so its advantage is its reward
    (``R / (1 + eps)`` with std normalisation). ``singleton="zero"`` is this project's earlier rule
    (no baseline, no signal). A group of one arises with ``rollout.n = 1`` or for the demonstration
    of an HPT band prompt whose rollouts were dropped (``gate.band = replace``)."""

    name: ClassVar[str] = "grpo"
    needs_reward: ClassVar[bool] = True
    std_normalize: bool = True
    eps: float = 1e-6
    singleton: str = "raw"

    def __post_init__(self):
        if self.singleton not in GRPO_SINGLETON:
            raise ValueError(f"grpo: singleton must be 'raw' or 'zero', got {self.singleton!r}")

    def __call__(self, rows: ScoredRows) -> Tensor:
        r = rows.rewards_B.double()
        mean, std, size = group_stats(r, rows.group_B)
        alone = size < 2
        mean = torch.where(alone, 0.0, mean)
        std = torch.where(alone, 1.0, std)
        adv = r - mean
        if self.std_normalize:
            adv = adv / (std + self.eps)
        if self.singleton == "zero":
            adv = torch.where(alone, 0.0, adv)
        return broadcast(adv, rows)


@ADVANTAGES.register
@dataclass(frozen=True)
class RLOO:
    """Leave-one-out baseline: ``R_i - mean_{j != i} R_j`` within the group; equals verl's
    ``compute_rloo_outcome_advantage`` for groups of two or more. A group of one gets 0 here, its raw
    reward in verl."""

    name: ClassVar[str] = "rloo"
    needs_reward: ClassVar[bool] = True

    def __call__(self, rows: ScoredRows) -> Tensor:
        r = rows.rewards_B.double()
        mean, _, size = group_stats(r, rows.group_B)
        others = (mean * size - r) / (size - 1).clamp(min=1.0)
        adv = torch.where(size > 1, r - others, 0.0)
        return broadcast(adv, rows)


WHITEN_MODES = ("tokens", "rows")


@ADVANTAGES.register
@dataclass(frozen=True)
class ReinforcePP:
    """REINFORCE++ (arXiv 2501.03262): discounted returns whitened over the whole global batch.

    ``whiten="tokens"`` matches verl's ``compute_reinforce_plus_plus_outcome_advantage``: per-token
    returns ``G_t = sum_{k >= t} gamma^(k-t) r_k`` (the outcome reward sits on the row's last real
    token unless ``token_rewards_BT`` is given), then ``masked_whiten`` over EVERY real token of every
    scored row: ``(G_t - mu) / sqrt(var + eps)``, mu and the unbiased var taken over tokens, eps
    default 1e-8 (verl's; verl also adds 1e-8 to the token count in its means, a 1e-10-relative
    difference ignored here). Longer rows therefore weigh more in the statistics.

    ``whiten="rows"`` is this project's earlier form: one reward per row,
    ``(R - mean_rows) / (std_rows + eps)``, eps default 1e-6; ``gamma`` has no effect there."""

    name: ClassVar[str] = "reinforce_pp"
    needs_reward: ClassVar[bool] = True
    whiten: str = "tokens"
    gamma: float = 1.0
    eps: float | None = None  # None: 1e-8 on the variance ("tokens"), 1e-6 on the std ("rows")

    def __post_init__(self):
        if self.whiten not in WHITEN_MODES:
            raise ValueError(f"reinforce_pp: whiten must be 'tokens' or 'rows', got {self.whiten!r}")
        if self.whiten == "rows" and self.gamma != 1.0:
            warnings.warn(
                f"reinforce_pp: gamma={self.gamma} has no effect with whiten='rows' (one reward per row)",
                stacklevel=2,
            )

    def __call__(self, rows: ScoredRows) -> Tensor:
        if self.whiten == "rows":
            return self._rows(rows)
        mask = rows.mask_BT.double()
        returns = discounted_returns(outcome_token_rewards(rows).double() * mask, mask, self.gamma)
        n = mask.sum()
        if n < 2:
            return torch.zeros_like(returns)
        mu = (returns * mask).sum() / n
        var = (((returns - mu) * mask) ** 2).sum() / (n - 1)
        eps = 1e-8 if self.eps is None else self.eps
        return (returns - mu) * torch.rsqrt(var + eps) * mask

    def _rows(self, rows: ScoredRows) -> Tensor:
        r = rows.rewards_B.double()
        if r.numel() < 2:
            return broadcast(torch.zeros_like(r), rows)
        eps = 1e-6 if self.eps is None else self.eps
        return broadcast((r - r.mean()) / (r.std() + eps), rows)


def discounted_returns(rewards_BT: Tensor, mask_BT: Tensor, gamma: float) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}``, reset at every masked position (verl's "reset after EOS")."""
    out = torch.zeros_like(rewards_BT)
    running = torch.zeros(rewards_BT.shape[0], dtype=rewards_BT.dtype)
    for t in reversed(range(rewards_BT.shape[1])):
        running = rewards_BT[:, t] + gamma * running
        out[:, t] = running
        running = running * mask_BT[:, t]
    return out * mask_BT


def outcome_token_rewards(rows: ScoredRows) -> Tensor:
    """Per-token rewards: ``token_rewards_BT`` if given, else the outcome reward on each row's last
    real token."""
    if rows.token_rewards_BT is not None:
        return rows.token_rewards_BT
    mask = rows.mask_BT.long()
    last = (mask * torch.arange(mask.shape[1])).argmax(-1)
    out = torch.zeros(mask.shape, dtype=torch.float64)
    out[torch.arange(mask.shape[0]), last] = rows.rewards_B.double()
    return out


@ADVANTAGES.register
@dataclass(frozen=True)
class GAE:
    """Generalised advantage estimation from critic values and per-token rewards.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (V after the last real token is 0),
    ``A_t = delta_t + gamma * lam * A_{t+1}``. Without ``token_rewards_BT`` the outcome reward sits
    on each row's last real token. ``whiten`` normalises over all real tokens of the batch.
    Follows verl's ``compute_gae_advantage_return``, except that the whitening divides by
    ``std + 1e-8`` where verl multiplies by ``rsqrt(var + 1e-8)``.
    """

    name: ClassVar[str] = "gae"
    needs_reward: ClassVar[bool] = True
    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = False

    def __call__(self, rows: ScoredRows) -> Tensor:
        if rows.values_BT is None:
            raise ValueError(
                "advantage 'gae' needs critic values (values_BT); this preset needs a value model"
            )
        mask = rows.mask_BT.double()
        values = rows.values_BT.double() * mask
        rewards = outcome_token_rewards(rows).double() * mask
        adv = torch.zeros_like(values)
        next_adv = torch.zeros(values.shape[0], dtype=values.dtype)
        next_value = torch.zeros_like(next_adv)
        for t in reversed(range(values.shape[1])):
            m = mask[:, t]
            delta = rewards[:, t] + self.gamma * next_value - values[:, t]
            a = delta + self.gamma * self.lam * next_adv
            adv[:, t] = a * m
            # padding after a row's end must not carry values backwards into it
            next_adv = torch.where(m > 0, a, next_adv)
            next_value = torch.where(m > 0, values[:, t], next_value)
        if self.whiten:
            real = adv[mask > 0]
            adv = (adv - real.mean()) / (real.std() + 1e-8) * mask
        return adv


def compute_advantages(estimators: dict[str, object], rows: ScoredRows) -> dict[str, Tensor]:
    """term name -> adv_BT for every row of the batch. Each distinct estimator runs once; those that
    need rewards see only the scored rows (rollouts and in-group demonstrations, not SFT rows,
    which get 0 there and are never read by a reward-based term)."""
    scored = rows.source_B != int(Source.SFT)
    cache: dict[object, Tensor] = {}
    out = {}
    for term, est in estimators.items():
        if est not in cache:
            if est.needs_reward:  # type: ignore[attr-defined]
                adv = torch.zeros(rows.mask_BT.shape, dtype=torch.float64)
                if scored.any():
                    adv[scored] = est(rows.subset(scored))  # type: ignore[operator]
            else:
                adv = est(rows)  # type: ignore[operator]
            cache[est] = adv
        out[term] = cache[est]
    return out


# ---- loss-time row weights -------------------------------------------------------------------


@ROW_WEIGHTS.register
@dataclass(frozen=True)
class NoWeight:
    name: ClassVar[str] = "none"
    needs_entropy: ClassVar[bool] = False

    def __call__(self, adv_BT: Tensor, entropy_BT: Tensor | None, mask_BT: Tensor) -> Tensor:
        return torch.ones_like(adv_BT)


@ROW_WEIGHTS.register
@dataclass(frozen=True)
class EntropyScale:
    """SRFT's entropy-aware weight ``coef * exp(sign * H)``, H the row's mean token entropy under the
    current policy (detached). ``positive_only`` applies it to rows with A > 0 and leaves the rest at 1
    (SRFT's on-policy term: 0.1 * exp(H) for correct rollouts, weight 1 for wrong ones)."""

    name: ClassVar[str] = "entropy_scale"
    needs_entropy: ClassVar[bool] = True
    coef: float = 1.0
    sign: float = 1.0
    positive_only: bool = False

    def __call__(self, adv_BT: Tensor, entropy_BT: Tensor | None, mask_BT: Tensor) -> Tensor:
        if entropy_BT is None:
            raise ValueError("row weight 'entropy_scale' needs the current policy's token entropy")
        h_B = seq_mean(entropy_BT.detach(), mask_BT)
        w_B = self.coef * torch.exp(self.sign * h_B)
        w_BT = w_B[:, None].expand_as(adv_BT)
        if self.positive_only:
            w_BT = torch.where(adv_BT > 0, w_BT, torch.ones_like(w_BT))
        return w_BT
