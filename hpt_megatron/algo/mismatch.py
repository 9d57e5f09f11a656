"""Train-inference mismatch corrections: a detached per-token weight from rho = pi_old / pi_rollout.

The rollout engine (vLLM, HF) samples from pi_rollout, which differs from the actor's pi_old
(kernels, precision, fused ops), so "on-policy" rows are slightly off-policy. A correction multiplies
a term's per-token loss by a constant weight w_t, so the token's gradient becomes w_t times the
uncorrected one (truncated importance sampling, Yao et al. 2025; IcePop's ratio mask):
    none     w = 1
    tis      w = min(rho_t, cap)                          token-level truncated IS
    mis      w = rho_t if rho_t <= cap else 0             token-level masked IS
    seq_tis  w = min(rho_seq, cap) on every token of the row, rho_seq = prod_t rho_t (or its
             geometric mean with ``geometric: true``)
    seq_mis  w = rho_seq if rho_seq <= cap else 0
    icepop   w = 1 if alpha <= rho_t <= beta else 0 (times rho_t with ``weighted: true``)
Only rollout rows (source rl) carry engine log-probs; every other row keeps w = 1. Ratios are formed
in log space and clamped to +-MAX_LOG_RATIO. Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hpt_megatron.algo.masks import MAX_LOG_RATIO
from hpt_megatron.algo.registry import Registry
from hpt_megatron.algo.types import LossInputs, Source

CORRECTIONS: Registry = Registry("correction")


def log_rollout_ratio(old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """log rho = log pi_old - log pi_rollout on the tokens of ``mask_BT`` (0 elsewhere), clamped.
    A token the engine gave no log-prob for (vLLM reports NaN) counts as rho = 1."""
    diff = torch.where(mask_BT.bool(), old_logp_BT.detach() - rollout_logp_BT, 0.0)
    return torch.nan_to_num(diff, nan=0.0).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def k3(log_rho_BT: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi_rollout || pi_old) from samples of pi_rollout: rho - log rho - 1,
    in float64 (a metric: the mismatch is often below float32's resolution of exp)."""
    x = log_rho_BT.double()
    return torch.expm1(x) - x


def seq_log_ratio(log_rho_BT: Tensor, mask_BT: Tensor, geometric: bool) -> Tensor:
    """Each row's log sequence ratio (sum, or mean with ``geometric``) over its tokens, as [B, T]."""
    m = mask_BT.to(log_rho_BT.dtype)
    s_B = (log_rho_BT * m).sum(-1)
    if geometric:
        s_B = s_B / m.sum(-1).clamp(min=1.0)
    return s_B.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)[:, None].expand_as(log_rho_BT)


@dataclass(frozen=True)
class CorrectionOut:
    weight_BT: Tensor  # detached weight on each token's loss
    ratio_BT: Tensor  # the ratio it came from: the token's rho, or its row's rho_seq
    changed_BT: Tensor  # bool: weight truncated or zeroed


def _truncate(ratio_BT: Tensor, cap: float) -> CorrectionOut:
    return CorrectionOut(ratio_BT.clamp(max=cap), ratio_BT, ratio_BT > cap)


def _mask_above(ratio_BT: Tensor, cap: float) -> CorrectionOut:
    keep = ratio_BT <= cap
    return CorrectionOut(torch.where(keep, ratio_BT, 0.0), ratio_BT, ~keep)


def _check_cap(name: str, cap: float) -> None:
    if cap < 1.0:
        raise ValueError(
            f"correction {name!r}: cap must be >= 1 (rho = 1, no mismatch, keeps its weight), got {cap}"
        )


@CORRECTIONS.register
@dataclass(frozen=True)
class NoCorrection:
    name: ClassVar[str] = "none"
    needs_rollout_logp: ClassVar[bool] = False
    needs_old_logp: ClassVar[bool] = False
    changes: ClassVar[str] = ""

    def __call__(self, log_rho_BT: Tensor, mask_BT: Tensor) -> CorrectionOut:
        ones = torch.ones_like(log_rho_BT)
        return CorrectionOut(ones, ones, torch.zeros_like(ones, dtype=torch.bool))


@dataclass(frozen=True)
class _CappedIS:
    """tis / mis / seq_tis / seq_mis: a ratio (the token's, or its row's) truncated at ``cap``
    (``changes = "truncated"``) or zeroed above it (``"masked"``)."""

    needs_rollout_logp: ClassVar[bool] = True
    needs_old_logp: ClassVar[bool] = True
    changes: ClassVar[str] = "truncated"
    cap: float = 2.0

    def __post_init__(self):
        _check_cap(self.name, self.cap)

    def ratio(self, log_rho_BT: Tensor, mask_BT: Tensor) -> Tensor:
        return torch.exp(log_rho_BT)

    def __call__(self, log_rho_BT: Tensor, mask_BT: Tensor) -> CorrectionOut:
        ratio = self.ratio(log_rho_BT, mask_BT)
        return _truncate(ratio, self.cap) if self.changes == "truncated" else _mask_above(ratio, self.cap)


@dataclass(frozen=True)
class _SeqCappedIS(_CappedIS):
    geometric: bool = False  # rho_seq = exp(mean_t log rho_t) instead of the product

    def ratio(self, log_rho_BT: Tensor, mask_BT: Tensor) -> Tensor:
        return torch.exp(seq_log_ratio(log_rho_BT, mask_BT, self.geometric))


@CORRECTIONS.register
@dataclass(frozen=True)
class TokenTIS(_CappedIS):
    name: ClassVar[str] = "tis"


@CORRECTIONS.register
@dataclass(frozen=True)
class TokenMIS(_CappedIS):
    name: ClassVar[str] = "mis"
    changes: ClassVar[str] = "masked"


@CORRECTIONS.register
@dataclass(frozen=True)
class SeqTIS(_SeqCappedIS):
    name: ClassVar[str] = "seq_tis"


@CORRECTIONS.register
@dataclass(frozen=True)
class SeqMIS(_SeqCappedIS):
    name: ClassVar[str] = "seq_mis"
    changes: ClassVar[str] = "masked"


@CORRECTIONS.register
@dataclass(frozen=True)
class IcePop:
    """IcePop: drop the gradient of tokens whose ratio left ``[alpha, beta]``; ``weighted`` also
    multiplies the kept ones by rho (masked IS with a lower bound)."""

    name: ClassVar[str] = "icepop"
    needs_rollout_logp: ClassVar[bool] = True
    needs_old_logp: ClassVar[bool] = True
    changes: ClassVar[str] = "masked"
    alpha: float = 0.5
    beta: float = 2.0
    weighted: bool = False

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0 <= self.beta:
            raise ValueError(
                f"correction 'icepop': need 0 <= alpha <= 1 <= beta (rho = 1 must be kept), "
                f"got alpha={self.alpha}, beta={self.beta}"
            )

    def __call__(self, log_rho_BT: Tensor, mask_BT: Tensor) -> CorrectionOut:
        rho = torch.exp(log_rho_BT)
        keep = (rho >= self.alpha) & (rho <= self.beta)
        weight = torch.where(keep, rho if self.weighted else torch.ones_like(rho), 0.0)
        return CorrectionOut(weight, rho, ~keep)


def correction_weight(
    name: str, correction, x: LossInputs, term_mask_BT: Tensor, n_rollout_tokens: float
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Term ``name``'s detached per-token weight ([B, T], 1 outside rollout rows; None for
    ``none``) and its metrics, additive over micro-batches (divided by the global rollout-token
    count; ``*_max`` / ``*_min`` only where this micro-batch has corrected tokens)."""
    if not correction.needs_rollout_logp:
        return None, {}
    if x.rollout_logp_BT is None:
        raise ValueError(
            f"algo.terms.{name}.correction is {correction.name!r}, which needs the rollout engine's "
            "log-probs of the sampled tokens (rollout_logp_BT), but this batch has none; set "
            f"algo.terms.{name}.correction to none"
        )
    rl_BT = term_mask_BT * (x.source_B == int(Source.RL))[:, None]
    old = x.old_logp_BT if x.old_logp_BT is not None else x.logp_BT.detach()
    log_rho = log_rollout_ratio(old, x.rollout_logp_BT.to(old.dtype), rl_BT)
    out = correction(log_rho, rl_BT)
    on = rl_BT.bool()
    weight = torch.where(on, out.weight_BT, 1.0).detach()
    n = max(n_rollout_tokens, 1.0)
    metrics = {
        f"{name}/mismatch_k3": (k3(log_rho) * rl_BT).sum() / n,
        f"{name}/is_weight_mean": torch.where(on, weight, 0.0).sum() / n,
        f"{name}/is_{correction.changes}_frac": (out.changed_BT & on).to(rl_BT.dtype).sum() / n,
    }
    if bool(on.any()):
        metrics[f"{name}/is_ratio_max"] = out.ratio_BT[on].max()
        metrics[f"{name}/is_ratio_min"] = out.ratio_BT[on].min()
    return weight, metrics
