"""Batch types shared by the estimator components.

Shape legend (suffixes on tensor names):
    B  rows (sequences) in a micro-batch
    T  response tokens per row (right-padded; ``mask_BT`` marks the real ones)
    G  prompts (groups) in a step
    N  rollouts per prompt

A *row* is one sequence the actor trains on. Every row has a ``Source``:
    RL         an on-policy rollout sampled by the rollout engine
    OFFPOLICY  a demonstration placed inside a rollout group as an off-policy row (LUFFY, SRFT, HPT's band)
    SFT        a demonstration trained by supervised fine-tuning (outside any rollout group)

Everything here is pure torch; nothing imports megatron, ray or vllm.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor


class Source(enum.IntEnum):
    RL = 0
    OFFPOLICY = 1
    SFT = 2

    @classmethod
    def parse(cls, name: str) -> Source:
        try:
            return cls[name.upper()]
        except KeyError:
            valid = ", ".join(s.name.lower() for s in cls)
            raise ValueError(f"unknown row source {name!r}; valid sources: {valid}") from None


@dataclass
class LossInputs:
    """One micro-batch as the loss sees it. All [B, T] tensors are aligned to response tokens.

    ``logp_BT`` (and ``entropy_BT`` when an entropy bonus is used) carry the autograd graph of the
    current policy; every other tensor is data.
    """

    logp_BT: Tensor
    mask_BT: Tensor
    source_B: Tensor
    advantages: dict[str, Tensor]  # term name -> advantage [B, T] (rows outside the term are ignored)
    coef_B: Tensor | None = None  # per-row gate coefficient (alpha for RL rows, beta for SFT rows)
    old_logp_BT: Tensor | None = None  # pi_old, recomputed by the actor before the update
    ref_logp_BT: Tensor | None = None  # frozen reference policy, for the KL penalty
    entropy_BT: Tensor | None = None  # current policy entropy per token
    # the rollout engine's log-probs of the sampled tokens (rl rows; other rows' values are ignored),
    # for the train-inference mismatch corrections and metrics
    rollout_logp_BT: Tensor | None = None
    # data-parallel ranks whose micro-batch gradients are summed into the mini-batch gradient. Only the
    # ``released_*`` reductions use it (they average over ranks as the released FSDP code did); the
    # default reductions divide by global ``Counts``, which already span every rank. The micro-batch
    # count needs no field: the loss is called once per micro-batch and those losses are summed.
    dp_size: int = 1

    def row_coef(self) -> Tensor:
        if self.coef_B is None:
            return torch.ones_like(self.source_B, dtype=self.logp_BT.dtype)
        return self.coef_B.to(self.logp_BT.dtype)


@dataclass
class Counts:
    """GLOBAL normalizers for one mini-batch: summed over every micro-batch and data-parallel rank.

    ``tokens[name]`` / ``seqs[name]`` count the response tokens / rows each loss term covers;
    ``tokens["all"]`` / ``seqs["all"]`` count every row (for the entropy bonus and the KL penalty).
    Dividing by these instead of by per-micro-batch counts makes gradient accumulation and data
    parallelism equal to one big batch.
    """

    tokens: dict[str, float] = field(default_factory=dict)
    seqs: dict[str, float] = field(default_factory=dict)

    def add(self, other: Counts) -> Counts:
        keys = set(self.tokens) | set(other.tokens)
        return Counts(
            tokens={k: self.tokens.get(k, 0.0) + other.tokens.get(k, 0.0) for k in keys},
            seqs={k: self.seqs.get(k, 0.0) + other.seqs.get(k, 0.0) for k in keys},
        )

    def to_tensor(self, names: list[str]) -> Tensor:
        """[len(names), 2] float64 tensor (tokens, seqs), e.g. for an all-reduce across DP ranks."""
        return torch.tensor(
            [[self.tokens.get(n, 0.0), self.seqs.get(n, 0.0)] for n in names], dtype=torch.float64
        )

    @classmethod
    def from_tensor(cls, names: list[str], t: Tensor) -> Counts:
        return cls(
            tokens={n: float(t[i, 0]) for i, n in enumerate(names)},
            seqs={n: float(t[i, 1]) for i, n in enumerate(names)},
        )


@dataclass
class ScoredRows:
    """All rows of a step's global batch, for the advantage estimators (computed once per step,
    before micro-batching, so group and batch statistics are exact). SFT rows carry no reward.

    ``group_B`` holds the prompt index of each row; rows of one prompt form one group, whatever
    their source (so LUFFY/SRFT groups mix rollouts and the demonstration).
    """

    rewards_B: Tensor
    group_B: Tensor
    mask_BT: Tensor
    source_B: Tensor
    values_BT: Tensor | None = None  # critic values, for GAE
    token_rewards_BT: Tensor | None = (
        None  # per-token rewards, for GAE; default: outcome reward at the last token
    )

    @property
    def num_rows(self) -> int:
        return int(self.rewards_B.shape[0])

    def subset(self, rows_B: Tensor) -> ScoredRows:
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows_B]

        return ScoredRows(
            rewards_B=self.rewards_B[rows_B],
            group_B=self.group_B[rows_B],
            mask_BT=self.mask_BT[rows_B],
            source_B=self.source_B[rows_B],
            values_BT=pick(self.values_BT),
            token_rewards_BT=pick(self.token_rewards_BT),
        )
