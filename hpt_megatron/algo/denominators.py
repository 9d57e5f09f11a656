"""Reference-policy denominators pi_ref, as detached per-token log-probabilities.

The surrogate of a token is ``r = f(pi) / pi_ref``; its gradient is ``f'(pi) grad(pi) / pi_ref``.
    current    pi_ref = pi_theta       log-likelihood form (SFT, REINFORCE)
    old        pi_ref = pi_old         importance-ratio form (PPO, GRPO, CISPO)
    one        pi_ref = 1              raw-probability form (offline rows: LUFFY, SRFT)
    gspo       pi_ref = pi_theta * (pi_old(tau) / pi_theta(tau)) ** (1 / |tau|)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hpt_megatron.algo.masks import seq_mean
from hpt_megatron.algo.registry import Registry

DENOMINATORS: Registry = Registry("reference denominator")


def _require_old(old_logp_BT: Tensor | None, name: str) -> Tensor:
    if old_logp_BT is None:
        raise ValueError(f"reference denominator {name!r} needs the rollout policy's log-probs (pi_old)")
    return old_logp_BT


@DENOMINATORS.register
@dataclass(frozen=True)
class CurrentPolicy:
    name: ClassVar[str] = "current"
    needs_old_logp: ClassVar[bool] = False
    # The loss value of this form is reported as log f(pi) (the NLL for SFT), not as the ratio 1.
    log_likelihood_form: ClassVar[bool] = True

    def log_ref(self, logp_BT: Tensor, old_logp_BT: Tensor | None, mask_BT: Tensor) -> Tensor:
        return logp_BT.detach()


@DENOMINATORS.register
@dataclass(frozen=True)
class OldPolicy:
    name: ClassVar[str] = "old"
    needs_old_logp: ClassVar[bool] = True
    log_likelihood_form: ClassVar[bool] = False

    def log_ref(self, logp_BT: Tensor, old_logp_BT: Tensor | None, mask_BT: Tensor) -> Tensor:
        return _require_old(old_logp_BT, self.name)


@DENOMINATORS.register
@dataclass(frozen=True)
class One:
    name: ClassVar[str] = "one"
    needs_old_logp: ClassVar[bool] = False
    log_likelihood_form: ClassVar[bool] = False

    def log_ref(self, logp_BT: Tensor, old_logp_BT: Tensor | None, mask_BT: Tensor) -> Tensor:
        return torch.zeros_like(logp_BT)


@DENOMINATORS.register
@dataclass(frozen=True)
class GSPORef:
    name: ClassVar[str] = "gspo"
    needs_old_logp: ClassVar[bool] = True
    log_likelihood_form: ClassVar[bool] = False

    def log_ref(self, logp_BT: Tensor, old_logp_BT: Tensor | None, mask_BT: Tensor) -> Tensor:
        old = _require_old(old_logp_BT, self.name)
        lp = logp_BT.detach()
        return lp + seq_mean(old - lp, mask_BT)[:, None]
