"""Where a component follows verl's core algorithms or the released HPT code, it matches them on a
small hand-made batch whose expected values are computed here, independently of the package:

    (a) REINFORCE++ whitens discounted returns over every valid token of the global batch
    (b) the verl-family PPO/GRPO presets dual-clip at c = 3 (hpt / hpt_official do not)
    (c) a GRPO group of one gets its raw reward (verl: mean 0, std 1)
    (d) the HPT band gamma < P <= gamma_off drops the rollouts and trains the demonstration
"""

from __future__ import annotations

import math
from statistics import mean, stdev, variance

import pytest
import torch

from hpt_megatron.algo import LossInputs, ScoredRows, Source, count_rows, get_preset, plan_rows, upge_loss
from hpt_megatron.algo.advantages import GRPO, ReinforcePP, compute_advantages
from hpt_megatron.algo.denominators import OldPolicy
from hpt_megatron.algo.gate import HardSwitchGate
from hpt_megatron.algo.masks import CISPO, GSPOSeqClip, NoMask, PPOClip
from hpt_megatron.algo.presets import PRESETS
from hpt_megatron.algo.reductions import TokenMean
from hpt_megatron.algo.spec import AlgoConfig, Term
from hpt_megatron.config import config_from_dict

RL, OFF, SFT = int(Source.RL), int(Source.OFFPOLICY), int(Source.SFT)


def scored(rewards, lengths, sources=None, groups=None, t_max=None, token_rewards=None) -> ScoredRows:
    t_max = t_max or max(lengths)
    b = len(rewards)
    return ScoredRows(
        rewards_B=torch.tensor(rewards, dtype=torch.float64),
        group_B=torch.tensor(groups if groups is not None else list(range(b))),
        mask_BT=(torch.arange(t_max)[None, :] < torch.tensor(lengths)[:, None]).double(),
        source_B=torch.tensor(sources if sources is not None else [RL] * b),
        token_rewards_BT=token_rewards,
    )


def rows_of(adv_BT: torch.Tensor, lengths) -> list[list[float]]:
    return [adv_BT[i, :n].tolist() for i, n in enumerate(lengths)]


def assert_rows(got: list[list[float]], want: list[list[float]], rel: float = 1e-12) -> None:
    assert [len(r) for r in got] == [len(r) for r in want]
    assert [x for r in got for x in r] == pytest.approx([x for r in want for x in r], rel=rel)


# ---- (a) REINFORCE++: whitening over the tokens of the global batch ---------------------------------


def whiten_tokens(returns: list[list[float]]) -> list[list[float]]:
    """verl's masked_whiten over every token: (G - mean) / sqrt(unbiased var + 1e-8)."""
    flat = [g for row in returns for g in row]
    mu, var = mean(flat), variance(flat)
    return [[(g - mu) / math.sqrt(var + 1e-8) for g in row] for row in returns]


def test_reinforce_pp_whitens_returns_over_every_token_of_the_batch():
    lengths, rewards = [2, 3, 1], [1.0, 0.0, 1.0]
    rows = scored(rewards, lengths, t_max=4)
    adv = ReinforcePP()(rows)
    # gamma = 1: every token's return is its row's reward; 6 tokens, mean 1/2, unbiased var 3/10
    half = 0.5 / math.sqrt(0.3 + 1e-8)
    expected = [[half, half], [-half, -half, -half], [half]]
    assert_rows(rows_of(adv, lengths), expected)
    assert (adv[rows.mask_BT == 0] == 0).all()
    flat = adv[rows.mask_BT.bool()]
    assert float(flat.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(flat.var()) == pytest.approx(1.0, rel=1e-7)


def test_reinforce_pp_statistics_are_token_weighted_not_row_weighted():
    """Same rewards, different lengths: the per-row form does not notice, the token form does."""
    rewards = [1.0, 0.0, 1.0]
    short, long_ = [2, 2, 2], [2, 6, 2]
    rows_mode = ReinforcePP(whiten="rows")
    r_short = rows_of(rows_mode(scored(rewards, short)), short)
    r_long = rows_of(rows_mode(scored(rewards, long_)), long_)
    assert r_short[0][0] == pytest.approx(r_long[0][0], rel=1e-12)
    # per-row closed form: mean 2/3, sample std sqrt(1/3), eps 1e-6 on the std
    assert r_short[0][0] == pytest.approx((1 - 2 / 3) / (math.sqrt(1 / 3) + 1e-6), rel=1e-12)

    tokens = rows_of(ReinforcePP()(scored(rewards, long_)), long_)
    expected = whiten_tokens([[r] * n for r, n in zip(rewards, long_)])
    assert_rows(tokens, expected)
    assert tokens[0][0] != pytest.approx(r_long[0][0], rel=1e-3)


def test_reinforce_pp_discounts_returns():
    gamma, lengths, rewards = 0.9, [3, 1, 4], [1.0, 0.0, 2.0]
    adv = ReinforcePP(gamma=gamma)(scored(rewards, lengths, t_max=5))
    returns = [[r * gamma ** (n - 1 - t) for t in range(n)] for r, n in zip(rewards, lengths)]
    assert_rows(rows_of(adv, lengths), whiten_tokens(returns))


def test_reinforce_pp_uses_per_token_rewards_when_given():
    gamma, lengths = 0.5, [3, 2]
    per_token = [[1.0, 0.0, 2.0], [0.0, -1.0]]
    token_rewards = torch.zeros(2, 4, dtype=torch.float64)
    for i, row in enumerate(per_token):
        token_rewards[i, : len(row)] = torch.tensor(row)
    token_rewards[0, 3] = 5.0  # on padding: must not leak into the row
    adv = ReinforcePP(gamma=gamma)(scored([0.0, 0.0], lengths, t_max=4, token_rewards=token_rewards))
    returns = []
    for row in per_token:
        g, out = 0.0, []
        for r in reversed(row):
            g = r + gamma * g
            out.append(g)
        returns.append(out[::-1])
    assert_rows(rows_of(adv, lengths), whiten_tokens(returns))


def test_reinforce_pp_sees_the_scored_rows_of_the_whole_batch_and_not_sft_rows():
    lengths = [2, 3, 4]
    rows = scored([1.0, 0.0, 0.0], lengths, sources=[RL, SFT, RL], t_max=4)
    adv = compute_advantages({"rl": ReinforcePP()}, rows)["rl"]
    expected = whiten_tokens([[1.0] * 2, [0.0] * 4])
    assert rows_of(adv, lengths)[0] == pytest.approx(expected[0], rel=1e-12)
    assert rows_of(adv, lengths)[2] == pytest.approx(expected[1], rel=1e-12)
    assert (adv[1] == 0).all()


def test_reinforce_pp_edge_cases_and_options():
    assert (ReinforcePP()(scored([1.0], [1])) == 0).all()  # one token: nothing to whiten against
    with pytest.raises(ValueError, match="whiten must be 'tokens' or 'rows', got 'row'"):
        ReinforcePP(whiten="row")
    with pytest.warns(UserWarning, match="gamma=0.9 has no effect with whiten='rows'"):
        ReinforcePP(whiten="rows", gamma=0.9)
    assert get_preset("reinforce_pp").build().terms["rl"].advantage == ReinforcePP(whiten="tokens")
    cfg = config_from_dict(
        {"algo": {"preset": "reinforce_pp", "terms": {"rl": {"advantage": {"whiten": "rows"}}}}}
    )
    assert cfg.algo.terms["rl"].advantage == ReinforcePP(whiten="rows")


# ---- (b) dual clip ----------------------------------------------------------------------------------

# preset -> dual clip c of its rl term (None: a ppo_clip mask without dual clip; "-": no ppo_clip mask)
DUAL_CLIP_BY_PRESET = {
    "ppo": 3.0,
    "grpo": 3.0,
    "dr_grpo": 3.0,
    "dapo": 3.0,
    "reinforce_pp": 3.0,
    "hpt": None,  # the paper's clipped GRPO; neither paper nor released code dual-clips
    "hpt_official": "-",  # released code: no clip at all
    "hpt_released": "-",  # released code: no clip at all
    "rloo": "-",  # log-likelihood form, no ratio
    "reinforce": "-",
    "cispo": "-",
    "gspo": "-",
    "luffy": "-",
    "srft": "-",
    "sft": "-",
}


def test_dual_clip_table_covers_every_preset():
    assert set(DUAL_CLIP_BY_PRESET) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(DUAL_CLIP_BY_PRESET))
def test_which_presets_dual_clip(name):
    algo = get_preset(name).build()
    masks = [t.mask for t in algo.terms.values()]
    expected = DUAL_CLIP_BY_PRESET[name]
    if expected == "-":
        assert not any(isinstance(m, PPOClip) for m in masks)
        assert all(isinstance(m, (NoMask, CISPO, GSPOSeqClip)) for m in masks)
    else:
        assert algo.terms["rl"].mask.dual_clip == expected


@pytest.mark.parametrize("off", [None, 0, 0.0])
def test_dual_clip_is_configurable_and_null_or_zero_turns_it_off(off):
    assert PPOClip(dual_clip=off) == PPOClip()
    cfg = config_from_dict({"algo": {"preset": "grpo", "terms": {"rl": {"mask": {"dual_clip": off}}}}})
    assert cfg.algo.terms["rl"].mask.dual_clip is None
    cfg = config_from_dict({"algo": {"preset": "dapo", "terms": {"rl": {"mask": {"dual_clip": 10.0}}}}})
    assert cfg.algo.terms["rl"].mask == PPOClip(eps_low=0.2, eps_high=0.28, dual_clip=10.0)
    with pytest.raises(ValueError, match=r"dual_clip must be > 1"):
        PPOClip(dual_clip=0.5)


# (advantage, ratio) -> verl's per-token loss and d loss / d log pi, c = 3, eps = 0.2, by hand:
# A < 0: min(max(-A r, -A clip(r)), -A c); A > 0: max(-A r, -A clip(r)).
VERL_TOKENS = [
    # A,   r,    loss (dual 3), grad (dual 3), loss (no dual), grad (no dual)
    (-1.0, 4.0, 3.0, 0.0, 4.0, 4.0),  # beyond c: capped at -A c, no gradient
    (-2.0, 3.5, 6.0, 0.0, 7.0, 7.0),
    (-1.0, 2.0, 2.0, 2.0, 2.0, 2.0),  # above 1 + eps but below c: the ratio term wins
    (-1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    (-1.0, 0.5, 0.8, 0.0, 0.8, 0.0),  # below 1 - eps: clipped
    (1.0, 4.0, -1.2, 0.0, -1.2, 0.0),  # A > 0 never dual-clips
    (1.0, 0.5, -0.5, -0.5, -0.5, -0.5),
]


@pytest.mark.parametrize("dual", [3.0, None])
def test_dual_clip_loss_and_gradient_equal_verls_closed_form(dual):
    a = torch.tensor([[t[0] for t in VERL_TOKENS]], dtype=torch.float64)
    r = torch.tensor([[t[1] for t in VERL_TOKENS]], dtype=torch.float64)
    col = (2, 3) if dual else (4, 5)
    want_loss = [t[col[0]] for t in VERL_TOKENS]
    want_grad = [t[col[1]] for t in VERL_TOKENS]
    n = a.shape[1]
    term = Term(sources=("rl",), mask=PPOClip(dual_clip=dual), ref=OldPolicy(), reduction=TokenMean())
    algo = AlgoConfig(terms={"rl": term})
    old = torch.zeros(1, n, dtype=torch.float64)
    logp = torch.log(r).requires_grad_(True)
    mask, source = torch.ones(1, n, dtype=torch.float64), torch.tensor([RL])
    x = LossInputs(logp_BT=logp, mask_BT=mask, source_B=source, advantages={"rl": a}, old_logp_BT=old)
    loss, _ = upge_loss(algo, x, count_rows(algo, source, mask))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(sum(want_loss) / n, rel=1e-12)
    assert logp.grad[0].tolist() == pytest.approx([g / n for g in want_grad], rel=1e-12, abs=1e-15)


# ---- (c) GRPO group of one --------------------------------------------------------------------------


def test_grpo_singleton_group_gets_its_raw_reward():
    rewards, groups = [1.0, 0.0, 1.0, 1.0, 0.0, 0.7], [0, 0, 0, 1, 2, 3]
    rows = scored(rewards, [2] * 6, groups=groups)
    mu, sd = mean(rewards[:3]), stdev(rewards[:3])
    std_adv = GRPO()(rows)[:, 0].tolist()
    assert std_adv[:3] == pytest.approx([(r - mu) / (sd + 1e-6) for r in rewards[:3]], rel=1e-12)
    assert std_adv[3:] == pytest.approx([r / (1 + 1e-6) for r in rewards[3:]], rel=1e-12)  # mean 0, std 1
    no_std = GRPO(std_normalize=False)(rows)[:, 0].tolist()
    assert no_std == pytest.approx([r - mu for r in rewards[:3]] + rewards[3:], rel=1e-12)
    old_rule = GRPO(singleton="zero")(rows)[:, 0].tolist()
    assert old_rule[:3] == pytest.approx(std_adv[:3], rel=1e-12) and old_rule[3:] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="singleton must be 'raw' or 'zero'"):
        GRPO(singleton="none")


def test_grpo_with_one_rollout_per_prompt_trains_on_the_reward():
    """rollout.n = 1: every group is a singleton; verl's GRPO then reduces to REINFORCE on R."""
    algo = get_preset("grpo").build()
    rows = scored([1.0, 0.0, 1.0], [3, 2, 4])
    adv = algo.advantages(rows)["rl"]
    assert adv[:, 0].tolist() == pytest.approx([1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6)], rel=1e-12)


# ---- (d) the HPT band: the released switch_gate_off ---------------------------------------------------

N = 8


def rewards_with(counts: list[int]) -> torch.Tensor:
    out = torch.zeros(len(counts), N)
    for g, k in enumerate(counts):
        out[g, :k] = 1.0
    return out


def luffy_offpolicy_term() -> Term:
    return get_preset("luffy").build().terms["offpolicy"]


# correct rollouts of 8 -> (rows the prompt trains, as source names), released switch with
# switch_gate = 1, switch_gate_off = 3: k <= 1 SFT, 1 < k <= 3 demonstration only (whether_off), else RL
BAND_TABLE = [
    (0, ["sft"]),
    (1, ["sft"]),
    (2, ["offpolicy"]),
    (3, ["offpolicy"]),
    (4, ["rl"] * N),
    (8, ["rl"] * N),
]


def test_released_band_table():
    gate = HardSwitchGate(gamma=1, gamma_off=3)
    assert gate.band == "replace"
    counts = [k for k, _ in BAND_TABLE]
    plan = plan_rows(gate.route(rewards_with(counts)), N)
    for g, (_, expected) in enumerate(BAND_TABLE):
        got = [Source(s).name.lower() for p, s in zip(plan.prompt, plan.source) if p == g]
        assert got == expected, (counts[g], got)
    join = plan_rows(HardSwitchGate(gamma=1, gamma_off=3, band="join").route(rewards_with([2])), N)
    assert [Source(s).name.lower() for s in join.source] == ["rl"] * N + ["offpolicy"]


def band_algo(sft_sources: tuple[str, ...] = ("sft",), with_offpolicy_term: bool = True) -> AlgoConfig:
    algo = get_preset("hpt_official").build()
    algo.gate = HardSwitchGate(gamma=0, gamma_off=2)
    algo.terms["sft"] = Term(sources=sft_sources, advantage=algo.terms["sft"].advantage)
    if with_offpolicy_term:
        algo.terms["offpolicy"] = luffy_offpolicy_term()
    return algo


def test_band_needs_a_term_for_its_demonstrations():
    with pytest.raises(ValueError, match=r"produces 'offpolicy' rows but no entry of algo\.terms covers"):
        band_algo(with_offpolicy_term=False).validate(N)
    band_algo().validate(N)  # released offline_loss_type=off_sft
    band_algo(sft_sources=("sft", "offpolicy"), with_offpolicy_term=False).validate(N)  # =sft


def band_batch(algo: AlgoConfig, counts: list[int], demo_len: int = 4, roll_len: int = 3):
    rewards = rewards_with(counts)
    plan = plan_rows(algo.gate.route(rewards), N)
    lengths = [roll_len if s == Source.RL else demo_len for s in plan.source]
    row_rewards = [1.0 if j < 0 else float(rewards[g, j]) for g, j in zip(plan.prompt, plan.rollout)]
    rows = scored(row_rewards, lengths, sources=[int(s) for s in plan.source], groups=plan.prompt)
    return plan, rows, torch.tensor(plan.coef, dtype=torch.float64)


def test_band_demonstration_is_alone_in_its_group_with_advantage_equal_to_its_reward():
    """off_sft in the released code: the band's demonstration row is the only row of its uid, so
    GRPO (no std) gives it R - 0 = 1; the other prompt's rollouts keep their group baseline."""
    algo = band_algo()
    plan, rows, _ = band_batch(algo, [0, 1, 3])
    adv = algo.advantages(rows)
    src = [Source(s) for s in plan.source]
    off = src.index(Source.OFFPOLICY)
    assert plan.prompt[off] == 1 and plan.prompt.count(1) == 1
    assert float(adv["offpolicy"][off, 0]) == 1.0
    rl = [i for i, s in enumerate(src) if s == Source.RL]
    assert [plan.prompt[i] for i in rl] == [2] * N
    assert adv["rl"][rl, 0].tolist() == pytest.approx([(1.0 if j < 3 else 0.0) - 3 / 8 for j in range(N)])


def test_band_as_sft_is_the_released_sft_loss_over_sft_and_band_demonstrations():
    """offline_loss_type=sft: every demonstration (SFT-routed or band) enters one token-mean NLL."""
    algo = band_algo(sft_sources=("sft", "offpolicy"), with_offpolicy_term=False)
    plan, rows, coef = band_batch(algo, [0, 1, 2, 5], demo_len=4)
    demos = [i for i, s in enumerate(plan.source) if s != Source.RL]
    assert [Source(plan.source[i]) for i in demos] == [Source.SFT, Source.OFFPOLICY, Source.OFFPOLICY]
    mask = rows.mask_BT
    logp = torch.full(mask.shape, -0.5, dtype=torch.float64, requires_grad=True)
    x = LossInputs(
        logp_BT=logp,
        mask_BT=mask,
        source_B=rows.source_B,
        advantages=algo.advantages(rows),
        coef_B=coef,
        old_logp_BT=torch.full(mask.shape, -0.5, dtype=torch.float64),
        entropy_BT=torch.zeros(mask.shape, dtype=torch.float64),
    )
    loss, _ = upge_loss(algo, x, count_rows(algo, rows.source_B, mask))
    loss.backward()
    n_demo_tokens = 3 * 4
    for i in demos:
        assert logp.grad[i, :4].tolist() == pytest.approx([-1.0 / n_demo_tokens] * 4, rel=1e-9, abs=1e-12)
