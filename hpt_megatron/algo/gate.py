"""The HPT gate: per prompt, from the rewards of its rollouts, decide how it is trained.

Algorithm 1 of the paper: P = mean rollout reward, (alpha, beta) = (f(P), g(P)), and
    loss = alpha * L_RL(rollouts) + beta * L_SFT(demonstration).
A gate returns a ``Routing`` (alpha, beta and whether the demonstration is trained as an off-policy
row of its prompt's group, per prompt); ``plan_rows`` turns it into the rows of one training batch.

Gates:
    rl      every prompt trains on its rollouts (GRPO, PPO, DAPO, ...)
    sft     every prompt trains on its demonstration; no rollouts are sampled
    mixed   the demonstration joins the group of n-1 rollouts as an off-policy row (LUFFY, SRFT)
    hard    the released HPT switch: SFT iff P <= gamma (rollouts discarded), else RL on the same n
            rollouts; optional band gamma < P <= gamma_off (the released ``switch_gate_off``,
            unused in the released scripts) where the rollouts are dropped and the demonstration is
            trained as an off-policy row
    linear  soft schedule alpha = P, beta = 1 - P
    table   soft schedule read from per-count tables alpha[k], beta[k], k = number of correct rollouts
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hpt_megatron.algo.registry import Registry
from hpt_megatron.algo.types import Source

GATES: Registry = Registry("gate")

# A rollout counts as correct when its reward exceeds this (rewards are binary 0/1 by default).
SUCCESS_THRESHOLD = 0.5


@dataclass
class Routing:
    """Per-prompt decisions; all tensors have shape [G]."""

    n_correct_G: Tensor
    p_G: Tensor  # fraction correct (0 where the gate samples no rollouts)
    rl_coef_G: Tensor  # alpha; 0 drops the prompt's rollouts
    sft_coef_G: Tensor  # beta; > 0 adds one SFT row of the demonstration
    off_G: Tensor  # bool: the demonstration is an off-policy row of the prompt's group (with its
    # rollouts when rl_coef > 0, alone when they are dropped)
    uniform_G: Tensor  # bool: all rollout rewards equal, so group advantages are zero

    @property
    def num_prompts(self) -> int:
        return int(self.p_G.shape[0])


def _stats(rewards_GN: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    correct = rewards_GN > SUCCESS_THRESHOLD
    n_correct = correct.sum(-1)
    n = rewards_GN.shape[1]
    p = n_correct.double() / n if n else torch.zeros(rewards_GN.shape[0], dtype=torch.float64)
    uniform = (
        (rewards_GN == rewards_GN[:, :1]).all(-1) if n else torch.ones(rewards_GN.shape[0], dtype=torch.bool)
    )
    return n_correct, p, uniform


def _routing(rewards_GN: Tensor, alpha: Tensor, beta: Tensor, off: Tensor) -> Routing:
    n_correct, p, uniform = _stats(rewards_GN)
    g = rewards_GN.shape[0]
    return Routing(
        n_correct_G=n_correct,
        p_G=p,
        rl_coef_G=alpha.double().expand(g).clone(),
        sft_coef_G=beta.double().expand(g).clone(),
        off_G=off.bool().expand(g).clone(),
        uniform_G=uniform,
    )


_ONE, _ZERO = torch.tensor(1.0), torch.tensor(0.0)
_TRUE, _FALSE = torch.tensor(True), torch.tensor(False)


@GATES.register
@dataclass(frozen=True)
class RLGate:
    """Every prompt trains on its n rollouts (verl's PPO/GRPO layout)."""

    name: ClassVar[str] = "rl"
    sources: ClassVar[tuple[Source, ...]] = (Source.RL,)

    def rollouts_per_prompt(self, n: int) -> int:
        return n

    def validate(self, n: int) -> None:
        pass

    def route(self, rewards_GN: Tensor) -> Routing:
        return _routing(rewards_GN, _ONE, _ZERO, _FALSE)


@GATES.register
@dataclass(frozen=True)
class SFTGate:
    """Every prompt trains on its demonstration; nothing is sampled."""

    name: ClassVar[str] = "sft"
    sources: ClassVar[tuple[Source, ...]] = (Source.SFT,)

    def rollouts_per_prompt(self, n: int) -> int:
        return 0

    def validate(self, n: int) -> None:
        pass

    def route(self, rewards_GN: Tensor) -> Routing:
        return _routing(rewards_GN, _ZERO, _ONE, _FALSE)


@GATES.register
@dataclass(frozen=True)
class MixedGate:
    """The released LUFFY/SRFT layout: each group is the demonstration plus n-1 rollouts."""

    name: ClassVar[str] = "mixed"
    sources: ClassVar[tuple[Source, ...]] = (Source.RL, Source.OFFPOLICY)

    def rollouts_per_prompt(self, n: int) -> int:
        return n - 1

    def validate(self, n: int) -> None:
        if n < 2:
            raise ValueError(
                f"gate 'mixed' puts the demonstration beside n-1 rollouts; rollout.n must be >= 2, got {n}"
            )

    def route(self, rewards_GN: Tensor) -> Routing:
        return _routing(rewards_GN, _ONE, _ZERO, _TRUE)


BAND_MODES = ("replace", "join")


@GATES.register
@dataclass(frozen=True)
class HardSwitchGate:
    """The released HPT switch (``select_on_off_ada_balance``, ``unify_strategy=switch`` of
    Unify-Post-Training's ``mix_trainer.py``): SFT iff P <= gamma (ties go to SFT, the rollouts are
    discarded), else RL on the same n rollouts. ``unit`` says whether gamma counts correct rollouts
    ("count", the released ``switch_gate``: 0 for Qwen, 2 for Llama) or is a fraction of n.

    ``gamma_off`` (the released ``switch_gate_off``; >= gamma) adds a band gamma < P <= gamma_off.
    ``band`` says what a band prompt trains:

    - ``replace`` (default, the released semantics): its n rollouts are dropped and its demonstration
      is one off-policy row, alone in its group (``whether_off``). The term(s) covering ``offpolicy``
      train it: LUFFY's shaped term reproduces ``offline_loss_type=off_sft`` (its advantage is the
      singleton-group GRPO advantage, i.e. its reward); adding ``offpolicy`` to the SFT term's sources
      reproduces ``offline_loss_type=sft``, where the band acts like a larger gamma.
    - ``join`` (this project's earlier band): the rollouts stay as RL rows and the demonstration
      joins their group as an off-policy row (LUFFY's layout, with all n rollouts).
    """

    name: ClassVar[str] = "hard"
    gamma: float = 0.0
    unit: str = "count"
    gamma_off: float | None = None
    band: str = "replace"

    @property
    def sources(self) -> tuple[Source, ...]:
        band = (Source.OFFPOLICY,) if self.gamma_off is not None else ()
        return (Source.RL, Source.SFT, *band)

    def rollouts_per_prompt(self, n: int) -> int:
        return n

    def validate(self, n: int) -> None:
        if self.unit not in ("count", "fraction"):
            raise ValueError(f"gate 'hard': unit must be 'count' or 'fraction', got {self.unit!r}")
        if self.band not in BAND_MODES:
            raise ValueError(f"gate 'hard': band must be 'replace' or 'join', got {self.band!r}")
        top = float(n) if self.unit == "count" else 1.0
        for key, value in (("gamma", self.gamma), ("gamma_off", self.gamma_off)):
            if value is not None and not 0 <= value <= top:
                raise ValueError(
                    f"gate 'hard': {key}={value} is outside [0, {top:g}] for unit={self.unit!r} and rollout.n={n}"
                )
        if self.gamma_off is not None and self.gamma_off < self.gamma:
            raise ValueError(f"gate 'hard': gamma_off={self.gamma_off} must be >= gamma={self.gamma}")

    def _at_most(self, rewards_GN: Tensor, threshold: float) -> Tensor:
        n_correct, p, _ = _stats(rewards_GN)
        if self.unit == "count":
            return n_correct <= threshold
        return p <= threshold + 1e-9

    def route(self, rewards_GN: Tensor) -> Routing:
        sft = self._at_most(rewards_GN, self.gamma)
        band = torch.zeros_like(sft)
        if self.gamma_off is not None:
            band = ~sft & self._at_most(rewards_GN, self.gamma_off)
        rl = ~sft & ~band if self.band == "replace" else ~sft
        return _routing(rewards_GN, rl.double(), sft.double(), band)


@GATES.register
@dataclass(frozen=True)
class LinearGate:
    """The paper's general form of Algorithm 1 with f(P) = P, g(P) = 1 - P (not in the released code)."""

    name: ClassVar[str] = "linear"
    sources: ClassVar[tuple[Source, ...]] = (Source.RL, Source.SFT)

    def rollouts_per_prompt(self, n: int) -> int:
        return n

    def validate(self, n: int) -> None:
        pass

    def route(self, rewards_GN: Tensor) -> Routing:
        _, p, _ = _stats(rewards_GN)
        return _routing(rewards_GN, p, 1.0 - p, _FALSE)


@GATES.register
@dataclass(frozen=True)
class TableGate:
    """alpha = alpha_table[k], beta = beta_table[k], k = number of correct rollouts (0..n): the
    on-policy and SFT columns of the released ``unify_strategy=soft`` tables (whose third column,
    an off-policy row weight, has no counterpart here)."""

    name: ClassVar[str] = "table"
    sources: ClassVar[tuple[Source, ...]] = (Source.RL, Source.SFT)
    alpha: tuple[float, ...] = ()
    beta: tuple[float, ...] = ()

    def rollouts_per_prompt(self, n: int) -> int:
        return n

    def validate(self, n: int) -> None:
        for key, table in (("alpha", self.alpha), ("beta", self.beta)):
            if len(table) != n + 1:
                raise ValueError(
                    f"gate 'table': {key} needs one entry per number of correct rollouts 0..{n} "
                    f"({n + 1} entries), got {len(table)}"
                )

    def route(self, rewards_GN: Tensor) -> Routing:
        n_correct, _, _ = _stats(rewards_GN)
        alpha = torch.tensor(self.alpha, dtype=torch.float64)[n_correct]
        beta = torch.tensor(self.beta, dtype=torch.float64)[n_correct]
        return _routing(rewards_GN, alpha, beta, _FALSE)


@dataclass
class RowPlan:
    """The rows of one training batch, in order. ``rollout`` is the rollout index within its
    prompt, or -1 for the prompt's demonstration."""

    prompt: list[int]
    rollout: list[int]
    source: list[Source]
    coef: list[float]

    def __len__(self) -> int:
        return len(self.prompt)

    def add(self, prompt: int, rollout: int, source: Source, coef: float) -> None:
        self.prompt.append(prompt)
        self.rollout.append(rollout)
        self.source.append(source)
        self.coef.append(coef)


def plan_rows(routing: Routing, n_rollouts: int, drop_uniform_groups: bool = False) -> RowPlan:
    """Rows per prompt: its rollouts (RL, weight alpha) and, where routed, its demonstration as an
    off-policy row inside the group (weight 1) and/or as an SFT row (weight beta). Prompts whose
    rollout rewards are all equal keep their RL rows (with zero group advantage) unless
    ``drop_uniform_groups`` (DAPO's dynamic-sampling filter) removes them."""
    plan = RowPlan([], [], [], [])
    for g in range(routing.num_prompts):
        alpha, beta = float(routing.rl_coef_G[g]), float(routing.sft_coef_G[g])
        off = bool(routing.off_G[g])
        keep_rl = (
            alpha > 0 and n_rollouts > 0 and not (drop_uniform_groups and routing.uniform_G[g] and not off)
        )
        if keep_rl:
            for j in range(n_rollouts):
                plan.add(g, j, Source.RL, alpha)
        if off:
            plan.add(g, -1, Source.OFFPOLICY, 1.0)
        if beta > 0:
            plan.add(g, -1, Source.SFT, beta)
    return plan
