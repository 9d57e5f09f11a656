"""Reductions: how a term's per-token losses become one scalar, divided by GLOBAL counts.

``n_tokens`` / ``n_seqs`` are the term's counts over the whole mini-batch (all micro-batches, all
data-parallel ranks), so summing the micro-batch losses gives exactly the one-big-batch loss.
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

    def __call__(self, loss_BT: Tensor, mask_BT: Tensor, n_tokens: float, n_seqs: float) -> Tensor:
        return (loss_BT * mask_BT).sum() / max(n_tokens, 1.0)


@REDUCTIONS.register
@dataclass(frozen=True)
class SeqMeanTokenMean:
    """mean over rows of each row's token mean (GRPO, GSPO)."""

    name: ClassVar[str] = "seq_mean_token_mean"

    def __call__(self, loss_BT: Tensor, mask_BT: Tensor, n_tokens: float, n_seqs: float) -> Tensor:
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

    def __call__(self, loss_BT: Tensor, mask_BT: Tensor, n_tokens: float, n_seqs: float) -> Tensor:
        return (loss_BT * mask_BT).sum() / (max(n_seqs, 1.0) * self.constant)


@REDUCTIONS.register
@dataclass(frozen=True)
class TokenSumOverConstant:
    """sum over all tokens / ``constant`` (the released HPT/LUFFY code: 8192)."""

    name: ClassVar[str] = "token_sum"
    constant: float = 8192.0

    def __post_init__(self):
        _check_positive(self.name, self.constant)

    def __call__(self, loss_BT: Tensor, mask_BT: Tensor, n_tokens: float, n_seqs: float) -> Tensor:
        return (loss_BT * mask_BT).sum() / self.constant
