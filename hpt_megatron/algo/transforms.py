"""Likelihood transforms f: the surrogate uses f(pi) in place of pi, so the gradient gains f'(pi).

Each transform returns ``log f(pi)`` from ``log pi`` (log space keeps tiny probabilities exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hpt_megatron.algo.registry import Registry

TRANSFORMS: Registry = Registry("likelihood transform")


@TRANSFORMS.register
@dataclass(frozen=True)
class Identity:
    name: ClassVar[str] = "identity"

    def log_f(self, logp_BT: Tensor) -> Tensor:
        return logp_BT


@TRANSFORMS.register
@dataclass(frozen=True)
class PolicyShaping:
    """LUFFY's policy shaping f(x) = x / (x + gamma): boosts the gradient of low-probability tokens."""

    name: ClassVar[str] = "policy_shaping"
    gamma: float = 0.1

    def __post_init__(self):
        if self.gamma <= 0:
            raise ValueError(f"policy_shaping: gamma must be > 0, got {self.gamma}")

    def log_f(self, logp_BT: Tensor) -> Tensor:
        return logp_BT - torch.logaddexp(logp_BT, torch.full_like(logp_BT, math.log(self.gamma)))
