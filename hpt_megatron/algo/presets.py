"""Named algorithms: each preset is a composition of the four UPGE parts per term, a gate, and
regularizers. ``list_presets()`` is what ``hpt-train --list-algorithms`` and the README table print.

Where a preset follows a released implementation rather than a paper, its summary or docstring says
so. The presets that use the ``ppo_clip`` mask and that verl would dual-clip (ppo, grpo, dr_grpo, dapo,
reinforce_pp) set verl's ``clip_ratio_c = 3`` (``algo.terms.rl.mask.dual_clip``; null or 0 = off).
rloo and reinforce are log-likelihood forms without a ratio, so there is nothing to dual-clip; cispo
and gspo have their own masks (verl's GSPO loss has no dual clip); hpt and hpt_official keep none,
as the released HPT code (a verl fork whose ``compute_policy_loss`` has no dual clip) ran.

``hpt_official`` and ``hpt_released`` share the released losses; they differ only in normalizers.
``hpt_official`` divides by global counts (micro-batching and data parallelism change nothing);
``hpt_released`` reproduces the released code's normalizers as run on its hardware: per-micro-batch
SFT and entropy token means summed over micro-batches, and every term averaged over data-parallel
ranks (``released_token_mean``, ``released_token_sum``, ``algo.regularizer_reduction``). It is a
preset rather than a flag on ``hpt_official`` so that the difference is spelled out in its terms'
reductions (and in the algorithm table), and so that any preset can opt into either reduction per
term with ``algo.terms.<name>.reduction``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hpt_megatron.algo.advantages import GAE, GRPO, RLOO, Constant, EntropyScale, Reinforce, ReinforcePP
from hpt_megatron.algo.denominators import CurrentPolicy, GSPORef, OldPolicy, One
from hpt_megatron.algo.gate import HardSwitchGate, MixedGate, RLGate, SFTGate
from hpt_megatron.algo.masks import CISPO, GSPOSeqClip, NoMask, PPOClip
from hpt_megatron.algo.reductions import (
    ReleasedTokenMean,
    ReleasedTokenSum,
    SeqMeanTokenMean,
    SeqMeanTokenSum,
    TokenMean,
    TokenSumOverConstant,
)
from hpt_megatron.algo.spec import AlgoConfig, Term
from hpt_megatron.algo.transforms import PolicyShaping

# The released HPT/LUFFY/SRFT code divides token sums by the padded response length, 8192.
RELEASED_CONSTANT = 8192.0
# verl's default ``actor.clip_ratio_c`` (dual-clip PPO's c); its DAPO example scripts raise it to 10.
VERL_DUAL_CLIP = 3.0


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    build: Callable[[], AlgoConfig]
    # Defaults this preset sets outside ``algo`` (dotted keys); a recipe or CLI override wins.
    overrides: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {}


def preset(name: str, summary: str, overrides: dict[str, Any] | None = None):
    def wrap(fn: Callable[[], AlgoConfig]) -> Callable[[], AlgoConfig]:
        if name in PRESETS:
            raise ValueError(f"duplicate preset {name!r}")

        def build() -> AlgoConfig:
            cfg = fn()
            cfg.preset = name
            return cfg

        PRESETS[name] = Preset(name, summary, build, dict(overrides or {}))
        return fn

    return wrap


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        import difflib

        hint = difflib.get_close_matches(name, PRESETS, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown algo.preset {name!r}{did_you_mean}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def list_presets() -> list[Preset]:
    return list(PRESETS.values())


def sft_term(
    coef: float = 1.0, sources: tuple[str, ...] = ("sft",), weight: Any = None, reduction: Any = None
) -> Term:
    extra = {"weight": weight} if weight is not None else {}
    if reduction is not None:
        extra["reduction"] = reduction
    return Term(sources=sources, mask=NoMask(), ref=CurrentPolicy(), advantage=Constant(), coef=coef, **extra)


def verl_clip(eps_low: float = 0.2, eps_high: float = 0.2) -> PPOClip:
    """verl's ``compute_policy_loss_vanilla``: the PPO clip plus dual clip at c = 3."""
    return PPOClip(eps_low=eps_low, eps_high=eps_high, dual_clip=VERL_DUAL_CLIP)


def clipped_rl_term(advantage: Any, reduction: Any, mask: Any = None) -> Term:
    """An RL term in importance-ratio form (pi_ref = pi_old); the mask defaults to ``verl_clip()``."""
    return Term(
        sources=("rl",), mask=mask or verl_clip(), ref=OldPolicy(), advantage=advantage, reduction=reduction
    )


@preset("sft", "supervised fine-tuning on the demonstrations: -log pi, token mean")
def _sft() -> AlgoConfig:
    return AlgoConfig(terms={"sft": sft_term()}, gate=SFTGate())


@preset("reinforce", "REINFORCE with +-1 rewards in log-likelihood form")
def _reinforce() -> AlgoConfig:
    term = Term(sources=("rl",), ref=CurrentPolicy(), advantage=Reinforce(mode="pm1"))
    return AlgoConfig(terms={"rl": term}, gate=RLGate())


@preset(
    "ppo",
    "PPO: clipped ratio (dual clip 3), GAE(1, 0.95) advantages (whitened) from the Megatron critic "
    "(critic.*: built automatically; clipped value loss)",
)
def _ppo() -> AlgoConfig:
    return AlgoConfig(terms={"rl": clipped_rl_term(GAE(gamma=1.0, lam=0.95, whiten=True), TokenMean())})


@preset(
    "grpo",
    "GRPO: clipped ratio (dual clip 3), group-normalised advantage (mean and std), "
    "sequence mean of token means",
)
def _grpo() -> AlgoConfig:
    return AlgoConfig(terms={"rl": clipped_rl_term(GRPO(std_normalize=True), SeqMeanTokenMean())})


@preset("dr_grpo", "Dr.GRPO: GRPO without std normalisation and without length normalisation (dual clip 3)")
def _dr_grpo() -> AlgoConfig:
    term = clipped_rl_term(GRPO(std_normalize=False), SeqMeanTokenSum(constant=RELEASED_CONSTANT))
    return AlgoConfig(terms={"rl": term})


@preset("dapo", "DAPO: clip-higher (0.2/0.28), dual clip 3, token-level mean, uniform groups dropped")
def _dapo() -> AlgoConfig:
    term = clipped_rl_term(GRPO(std_normalize=True), TokenMean(), mask=verl_clip(eps_low=0.2, eps_high=0.28))
    return AlgoConfig(terms={"rl": term}, drop_uniform_groups=True)


@preset("rloo", "RLOO: leave-one-out baseline, REINFORCE on whole sequences")
def _rloo() -> AlgoConfig:
    term = Term(sources=("rl",), ref=CurrentPolicy(), advantage=RLOO(), reduction=SeqMeanTokenSum())
    return AlgoConfig(terms={"rl": term})


@preset(
    "reinforce_pp",
    "REINFORCE++ as verl: clipped ratio (dual clip 3), returns whitened over every token of the global batch",
)
def _reinforce_pp() -> AlgoConfig:
    return AlgoConfig(terms={"rl": clipped_rl_term(ReinforcePP(whiten="tokens"), TokenMean())})


@preset("cispo", "CISPO: clipped stop-gradient importance weight on every token, token mean")
def _cispo() -> AlgoConfig:
    term = clipped_rl_term(GRPO(std_normalize=True), TokenMean(), mask=CISPO(eps_low=None, eps_high=0.28))
    return AlgoConfig(terms={"rl": term})


@preset("gspo", "GSPO: sequence-level ratio and clip, sequence mean of token means")
def _gspo() -> AlgoConfig:
    term = Term(
        sources=("rl",),
        mask=GSPOSeqClip(),
        ref=GSPORef(),
        advantage=GRPO(std_normalize=True),
        reduction=SeqMeanTokenMean(),
    )
    return AlgoConfig(terms={"rl": term})


def _luffy_terms() -> dict[str, Term]:
    adv = GRPO(std_normalize=False)
    reduction = TokenSumOverConstant(RELEASED_CONSTANT)
    return {
        "rl": Term(sources=("rl",), mask=NoMask(), ref=OldPolicy(), advantage=adv, reduction=reduction),
        "offpolicy": Term(
            sources=("offpolicy",),
            mask=NoMask(),
            ref=One(),
            advantage=adv,
            transform=PolicyShaping(gamma=0.1),
            reduction=reduction,
        ),
    }


@preset(
    "luffy",
    "LUFFY (released code): demonstration + n-1 rollouts per group, GRPO without std over both, "
    "no clip, shaped f(pi) = pi/(pi+0.1) on the demonstration, token sum / 8192",
)
def _luffy() -> AlgoConfig:
    return AlgoConfig(terms=_luffy_terms(), gate=MixedGate(), entropy_coef=0.001)


@preset(
    "srft",
    "SRFT (released code): LUFFY's layout; demonstration also trained by SFT weighted 0.5*exp(-H); "
    "rollouts: -A log pi with A = 0.1*exp(H) if correct else -1",
)
def _srft() -> AlgoConfig:
    terms = _luffy_terms()
    terms["rl"] = Term(
        sources=("rl",),
        mask=NoMask(),
        ref=CurrentPolicy(),
        advantage=Reinforce(mode="pm1"),
        weight=EntropyScale(coef=0.1, sign=1.0, positive_only=True),
        reduction=TokenSumOverConstant(RELEASED_CONSTANT),
    )
    terms["sft"] = sft_term(sources=("offpolicy",), weight=EntropyScale(coef=0.5, sign=-1.0))
    return AlgoConfig(terms=terms, gate=MixedGate(), entropy_coef=0.001)


@preset(
    "hpt",
    "HPT as the paper describes: SFT iff no rollout of 8 is correct, else GRPO (clipped, std-normalised)",
)
def _hpt() -> AlgoConfig:
    # PPO clip without dual clip: neither the paper nor the released code has one
    rl = clipped_rl_term(GRPO(std_normalize=True), TokenMean(), mask=PPOClip())
    terms = {"rl": rl, "sft": sft_term()}
    return AlgoConfig(terms=terms, gate=HardSwitchGate(gamma=0, unit="count"))


@preset(
    "hpt_official",
    "HPT as the released code ran: no clip, no std, RL = token sum / 8192, SFT token mean x sft coef, "
    "entropy 0.001, skip steps with grad norm > 80",
    overrides={"optim.skip_grad_norm_above": 80.0},
)
def _hpt_official() -> AlgoConfig:
    return _hpt_released_code(released_normalizers=False)


@preset(
    "hpt_released",
    "hpt_official with the released normalizers as run: SFT and entropy token means per micro-batch, "
    "summed over micro-batches; every term averaged over data-parallel ranks (RL = token sum / 8192 / DP)",
    overrides={"optim.skip_grad_norm_above": 80.0},
)
def _hpt_released() -> AlgoConfig:
    return _hpt_released_code(released_normalizers=True)


def _hpt_released_code(released_normalizers: bool) -> AlgoConfig:
    """The released HPT losses. ``hpt_official`` divides by global counts, so its gradient does not
    depend on how a mini-batch is split; ``hpt_released`` uses the released code's normalizers
    (``released_*`` reductions), whose relative weight of SFT vs RL depends on the number of
    micro-batches per rank and on the number of data-parallel ranks. The two agree at one
    micro-batch on one rank."""
    if released_normalizers:
        rl_reduction: Any = ReleasedTokenSum(RELEASED_CONSTANT)
        token_mean: Any = ReleasedTokenMean()
    else:
        rl_reduction, token_mean = TokenSumOverConstant(RELEASED_CONSTANT), TokenMean()
    rl = Term(
        sources=("rl",),
        mask=NoMask(),
        ref=OldPolicy(),
        advantage=GRPO(std_normalize=False),
        reduction=rl_reduction,
    )
    terms = {"rl": rl, "sft": sft_term(coef=1.0, reduction=token_mean)}
    return AlgoConfig(
        terms=terms,
        gate=HardSwitchGate(gamma=0, unit="count"),
        entropy_coef=0.001,
        regularizer_reduction=token_mean,
    )
