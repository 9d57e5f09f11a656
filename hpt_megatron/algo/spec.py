"""An algorithm = named loss terms (each: four UPGE parts + a reduction) + a gate + regularizers.

Each ``Term`` covers the rows of some sources and composes
    mask (1_stable) x reference denominator (pi_ref) x advantage (A_hat) x likelihood transform (f)
into a per-token surrogate whose gradient is ``1_stable * A_hat * f'(pi) grad(pi) / pi_ref``, then
reduces it with a global normaliser (or, for the ``released_*`` reductions, the released code's
per-micro-batch one). An optional ``correction`` (``mismatch.py``) weights rollout
tokens by the truncated or masked ratio pi_old / pi_rollout (train-inference mismatch). Fields
marked with a registry are built from configs such as ``{name: ppo_clip, eps_high: 0.28}``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from hpt_megatron.algo.advantages import ADVANTAGES, ROW_WEIGHTS, Constant, NoWeight, compute_advantages
from hpt_megatron.algo.denominators import DENOMINATORS, CurrentPolicy
from hpt_megatron.algo.gate import GATES, RLGate
from hpt_megatron.algo.masks import MASKS, NoMask
from hpt_megatron.algo.mismatch import CORRECTIONS, NoCorrection
from hpt_megatron.algo.reductions import REDUCTIONS, TokenMean
from hpt_megatron.algo.registry import describe
from hpt_megatron.algo.transforms import TRANSFORMS, Identity
from hpt_megatron.algo.types import ScoredRows, Source

KL_ESTIMATORS = ("k1", "k2", "k3")


def component(registry, default) -> Any:
    return field(default=default, metadata={"registry": registry})


@dataclass(frozen=True)
class Term:
    sources: tuple[str, ...] = ("rl",)
    mask: Any = component(MASKS, NoMask())
    ref: Any = component(DENOMINATORS, CurrentPolicy())
    advantage: Any = component(ADVANTAGES, Constant())
    transform: Any = component(TRANSFORMS, Identity())
    reduction: Any = component(REDUCTIONS, TokenMean())
    weight: Any = component(ROW_WEIGHTS, NoWeight())
    coef: float = 1.0
    correction: Any = component(CORRECTIONS, NoCorrection())

    def source_ids(self) -> tuple[int, ...]:
        return tuple(int(Source.parse(s)) for s in self.sources)

    @property
    def needs_old_logp(self) -> bool:
        return self.mask.needs_old_logp or self.ref.needs_old_logp or self.correction.needs_old_logp

    def describe(self) -> str:
        parts = [describe(self.mask), describe(self.ref), describe(self.advantage), describe(self.transform)]
        text = " | ".join(parts) + f" | {describe(self.reduction)}"
        if not isinstance(self.weight, NoWeight):
            text += f" | weight {describe(self.weight)}"
        if not isinstance(self.correction, NoCorrection):
            text += f" | correction {describe(self.correction)}"
        return text + (f" | x{self.coef:g}" if self.coef != 1.0 else "")


@dataclass(frozen=True)
class KLPenalty:
    """Penalty ``coef * token_mean(KL(pi || pi_ref_model))`` over all rows; estimators: k1 = log
    ratio, k2 = half squared log ratio, k3 = the low-variance ``exp(-x) + x - 1``."""

    coef: float = 0.0
    estimator: str = "k3"

    def __post_init__(self):
        if self.estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"kl estimator must be one of {', '.join(KL_ESTIMATORS)}, got {self.estimator!r}"
            )


@dataclass
class AlgoConfig:
    preset: str = "hpt"
    terms: dict[str, Term] = field(default_factory=lambda: {"rl": Term()})
    gate: Any = component(GATES, RLGate())
    entropy_coef: float = 0.0
    kl: KLPenalty = field(default_factory=KLPenalty)
    # how the entropy bonus and the KL penalty reduce their per-token values over all rows: the global
    # token mean by default; ``released_token_mean`` for the released code's per-micro-batch means
    regularizer_reduction: Any = component(REDUCTIONS, TokenMean())
    drop_uniform_groups: bool = False

    @property
    def needs_old_logp(self) -> bool:
        return any(t.needs_old_logp for t in self.terms.values())

    def advantages(self, rows: ScoredRows) -> dict[str, Tensor]:
        """Each term's advantages over the whole batch (see ``compute_advantages``)."""
        return compute_advantages({name: t.advantage for name, t in self.terms.items()}, rows)

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0 or any(t.weight.needs_entropy for t in self.terms.values())

    @property
    def needs_ref_model(self) -> bool:
        return self.kl.coef != 0

    def validate(self, n_rollouts: int, key: str = "algo") -> None:
        """Raise ValueError naming the ``{key}.*`` entry of any impossible combination."""
        if not self.terms:
            raise ValueError(f"{key}.terms is empty; an algorithm needs at least one loss term")
        covered: set[Source] = set()
        for name, term in self.terms.items():
            _validate_term(f"{key}.terms.{name}", name, term)
            covered |= {Source(s) for s in term.source_ids()}
        try:
            self.gate.validate(n_rollouts)
        except ValueError as e:
            raise ValueError(f"{key}.gate: {e}") from None
        for src in self.gate.sources:
            if src not in covered:
                raise ValueError(
                    f"{key}.gate {self.gate.name!r} produces {src.name.lower()!r} rows but no entry of {key}.terms "
                    f"covers source {src.name.lower()!r}; add it to some term's sources"
                )


def _validate_term(key: str, name: str, term: Term) -> None:
    if name == "all":
        raise ValueError(f"{key}: 'all' is reserved; rename that term")
    if not term.sources:
        raise ValueError(f"{key}.sources is empty; list the row sources it trains (rl, offpolicy, sft)")
    for s in term.sources:
        try:
            Source.parse(s)
        except ValueError as e:
            raise ValueError(f"{key}.sources: {e}") from None
    if not isinstance(term.correction, NoCorrection) and int(Source.RL) not in term.source_ids():
        warnings.warn(
            f"{key}.correction {term.correction.name!r} has no effect: only rl rows carry rollout "
            f"log-probs and the term covers {', '.join(term.sources)}",
            stacklevel=2,
        )
    if "sft" in term.sources and term.advantage.needs_reward:
        raise ValueError(
            f"{key}.advantage is {term.advantage.name!r}, but SFT rows carry no reward; "
            "use advantage {name: constant} for a term that covers source 'sft'"
        )
