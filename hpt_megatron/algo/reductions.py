"""Reductions: how a term's per-token losses become one scalar, divided by GLOBAL counts.

``n_tokens`` / ``n_seqs`` are the term's counts over the whole mini-batch (all micro-batches, all
data-parallel ranks), so summing the micro-batch losses gives exactly the one-big-batch loss.

The two ``released_*`` reductions instead reproduce the released HPT code (verl + FSDP) as run:
there every micro-batch's loss was normalised by that micro-batch alone, the micro-batch losses
were summed (its scripts set ``ppo_micro_batch_size = ppo_mini_batch_size``, so verl's
``gradient_accumulation`` divisor is 1 while ``use_dynamic_bsz`` splits a rank's share into as many
micro-batches as its token budget needs), and FSDP AVERAGED the gradients over the ``dp_size``
data-parallel ranks. Their value therefore depends on how the mini-batch is split; every other
reduction ignores ``dp_size`` (its global counts already cover every rank).

Every reduction is called as ``reduction(loss_BT, mask_BT, n_tokens, n_seqs, dp_size=...)`` on
one micro-batch; ``mask_BT`` marks that micro-batch's tokens of the term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from hpt_megatron.algo.registry import Registry

REDUCTIONS: Registry = Registry("reduction")


def _check_positive(name: str, constant: float) -> None:
    if constant <= 0:
        raise ValueError(f"reduction {name!r}: constant must be > 0, got {constant}")


@REDUCTIONS.register
@dataclass(frozen=True)
class TokenMean:
    """sum over all tokens / number of tokens (DAPO's token-level mean)."""

    name: ClassVar[str] = "token_mean"

    def __call__(
        self, loss_BT: Tensor, mask_BT: Tensor, n_tokens: float, n_seqs: float, dp_size: int = 1
    ) -> Tensor:
        return (loss_BT * mask_BT).sum() / max(n_tokens, 1.0)


@REDUCTIONS.register
@dataclass(frozen=True)
class SeqMeanTokenMean:
    """mean over rows of each row's token mean (GRPO, GSPO)."""

    name: ClassVar[str] = "seq_mean_token_mean"

    def __call__(
        self, loss_BT: Tensor, mask_BT: Tensor, n_tokens: float, n_seqs: float, dp_size: int = 1
    ) -> Tensor:
        per_row = (loss_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1.0)
        return per_row.sum() / max(n_seqs, 1.0)


@REDUCTIONS.register
@dataclass(frozen=True)
class SeqMeanTokenSum:
    """mean over rows of each row's token sum, divided by ``constant`` (Dr.GRPO: the generation budget)."""

    name: ClassVar[str] = "seq_mean_token_sum"
    constant: float = 1.0

    def __post_init__(self):
        _check_positive(self.name, self.constant)

    def __call__(
        self, loss_BT: Tensor, mask_BT: Tensor, n_tokens: float, n_seqs: float, dp_size: int = 1
    ) -> Tensor:
        return (loss_BT * mask_BT).sum() / (max(n_seqs, 1.0) * self.constant)


@REDUCTIONS.register
@dataclass(frozen=True)
class TokenSumOverConstant:
    """sum over all tokens / ``constant`` (the released HPT/LUFFY code: 8192)."""

    name: ClassVar[str] = "token_sum"
    constant: float = 8192.0

    def __post_init__(self):
        _check_positive(self.name, self.constant)

    def __call__(
        self, loss_BT: Tensor, mask_BT: Tensor, n_tokens: float, n_seqs: float, dp_size: int = 1
    ) -> Tensor:
        return (loss_BT * mask_BT).sum() / self.constant


@REDUCTIONS.register
@dataclass(frozen=True)
class ReleasedTokenMean:
    """As released: this micro-batch's token mean, summed over micro-batches, averaged over the
    ``dp_size`` data-parallel ranks (verl's per-micro-batch ``masked_mean`` under FSDP)."""

    name: ClassVar[str] = "released_token_mean"

    def __call__(
        self, loss_BT: Tensor, mask_BT: Tensor, n_tokens: float, n_seqs: float, dp_size: int = 1
    ) -> Tensor:
        return (loss_BT * mask_BT).sum() / (mask_BT.sum().clamp(min=1.0) * dp_size)


@REDUCTIONS.register
@dataclass(frozen=True)
class ReleasedTokenSum(TokenSumOverConstant):
    """As released: token sum / ``constant``, averaged over the ``dp_size`` data-parallel ranks
    (``token_sum`` divided by ``dp_size``)."""

    name: ClassVar[str] = "released_token_sum"

    def __call__(
        self, loss_BT: Tensor, mask_BT: Tensor, n_tokens: float, n_seqs: float, dp_size: int = 1
    ) -> Tensor:
        return super().__call__(loss_BT, mask_BT, n_tokens, n_seqs) / dp_size
