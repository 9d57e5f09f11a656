"""Every preset's autograd gradient equals the closed-form Table 1 expression (tests/unit/upge_oracle.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hpt_megatron.algo import (
    PRESETS,
    AlgoConfig,
    LossInputs,
    ScoredRows,
    Source,
    count_rows,
    get_preset,
    merge_metrics,
    plan_rows,
    upge_loss,
)
from hpt_megatron.algo.gate import LinearGate
from tests.unit import upge_oracle as oracle

# Presets whose one-micro-batch, one-rank gradient is another preset's oracle: hpt_released's
# per-micro-batch normalizers equal hpt_official's global ones there (tests/unit/test_released_normalizers.py
# checks the split cases against the released formula).
ORACLE_ALIASES = {"hpt_released": "hpt_official"}

N_ROLLOUTS = 8
CORRECT_PER_PROMPT = [0, 0, 1, 3, 5, 8, 2, 6]  # all-wrong, all-right and mixed groups
T_MAX = 12


def make_rewards(gen: torch.Generator) -> torch.Tensor:
    rows = []
    for k in CORRECT_PER_PROMPT:
        r = torch.zeros(N_ROLLOUTS, dtype=torch.float64)
        r[torch.randperm(N_ROLLOUTS, generator=gen)[:k]] = 1.0
        rows.append(r)
    return torch.stack(rows)


def build_batch(algo: AlgoConfig, seed: int, old_noise: float = 0.25):
    """Route prompts through the preset's gate, then fill every row with random log-probs."""
    gen = torch.Generator().manual_seed(seed)
    rewards_GN = make_rewards(gen)
    n_roll = algo.gate.rollouts_per_prompt(N_ROLLOUTS)
    routing = algo.gate.route(rewards_GN[:, :n_roll])
    plan = plan_rows(routing, n_roll, algo.drop_uniform_groups)
    b = len(plan)
    lengths = torch.randint(3, T_MAX + 1, (b,), generator=gen)
    mask = (torch.arange(T_MAX)[None, :] < lengths[:, None]).double()
    probs = torch.rand(b, T_MAX, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    logp = torch.log(probs)
    old = (logp + old_noise * torch.randn(b, T_MAX, generator=gen, dtype=torch.float64)) * mask
    entropy = torch.rand(b, T_MAX, generator=gen, dtype=torch.float64) * 3.0
    values = torch.randn(b, T_MAX, generator=gen, dtype=torch.float64) * 0.5
    reward = torch.tensor(
        [1.0 if j < 0 else float(rewards_GN[g, j]) for g, j in zip(plan.prompt, plan.rollout)],
        dtype=torch.float64,
    )
    return {
        "plan": plan,
        "mask": mask,
        "logp": logp * mask,
        "old": old,
        "entropy": entropy * mask,
        "values": values * mask,
        "reward": reward,
        "source": torch.tensor([int(s) for s in plan.source]),
        "group": torch.tensor(plan.prompt),
        "coef": torch.tensor(plan.coef, dtype=torch.float64),
    }


def run_loss(algo: AlgoConfig, batch, rows_slices=None):
    """Loss and gradients, optionally summed over micro-batches (row slices) with global counts."""
    logp = batch["logp"].clone().requires_grad_(True)
    entropy = batch["entropy"].clone().requires_grad_(True)
    rows = ScoredRows(
        rewards_B=batch["reward"],
        group_B=batch["group"],
        mask_BT=batch["mask"],
        source_B=batch["source"],
        values_BT=batch["values"],
    )
    adv = algo.advantages(rows)
    counts = count_rows(algo, batch["source"], batch["mask"])
    slices = rows_slices or [slice(None)]
    total, parts = 0.0, []
    for sl in slices:
        x = LossInputs(
            logp_BT=logp[sl],
            mask_BT=batch["mask"][sl],
            source_B=batch["source"][sl],
            advantages={k: v[sl].double() for k, v in adv.items()},
            coef_B=batch["coef"][sl],
            old_logp_BT=batch["old"][sl],
            entropy_BT=entropy[sl],
        )
        loss, metrics = upge_loss(algo, x, counts)
        loss.backward()
        total += float(loss.detach())
        parts.append(metrics)
    g_ent = entropy.grad if entropy.grad is not None else torch.zeros_like(entropy)
    return total, logp.grad, g_ent, merge_metrics(parts)


def oracle_rows(batch) -> list[oracle.Row]:
    out = []
    for i, src in enumerate(batch["plan"].source):
        n = int(batch["mask"][i].sum())
        out.append(
            oracle.Row(
                source=Source(src).name.lower(),
                group=int(batch["group"][i]),
                reward=float(batch["reward"][i]),
                coef=float(batch["coef"][i]),
                logp=batch["logp"][i, :n].tolist(),
                old=batch["old"][i, :n].tolist(),
                entropy=batch["entropy"][i, :n].tolist(),
                values=batch["values"][i, :n].tolist(),
            )
        )
    return out


def padded(grads: list[list[float]]) -> torch.Tensor:
    out = torch.zeros(len(grads), T_MAX, dtype=torch.float64)
    for i, g in enumerate(grads):
        out[i, : len(g)] = torch.tensor(g, dtype=torch.float64)
    return out


def test_every_preset_has_an_oracle():
    assert set(PRESETS) == set(oracle.ORACLES) | set(ORACLE_ALIASES)
    assert set(ORACLE_ALIASES.values()) <= set(oracle.ORACLES)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("seed", [0, 1])
def test_preset_gradient_matches_table1(name, seed):
    algo = get_preset(name).build()
    batch = build_batch(algo, seed, old_noise=1.5e-3 if name == "gspo" else 0.25)
    _, g_logp, g_ent, _ = run_loss(algo, batch)
    exp_logp, exp_ent = oracle.expected_grads(ORACLE_ALIASES.get(name, name), oracle_rows(batch))
    torch.testing.assert_close(g_logp, padded(exp_logp), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_ent, padded(exp_ent), rtol=1e-9, atol=1e-12)
    assert torch.isfinite(g_logp).all()
    # the gradient is not trivially zero: every preset trains something on this batch
    assert g_logp.abs().sum() > 0


@pytest.mark.parametrize("name", ["grpo", "hpt", "dapo", "ppo", "reinforce_pp"])
def test_clipping_is_exercised(name):
    """The random batch really has clipped tokens, so the PPO mask part of the oracle is tested."""
    algo = get_preset(name).build()
    *_, metrics = run_loss(algo, build_batch(algo, 0))
    assert 0.05 < metrics["rl/clip_frac"] < 0.95


def test_gspo_clips_some_sequences_and_keeps_others():
    algo = get_preset("gspo").build()
    *_, metrics = run_loss(algo, build_batch(algo, 0, old_noise=1.5e-3))
    assert 0.0 < metrics["rl/clip_frac"] < 1.0


def test_hpt_routes_zero_correct_prompts_to_sft():
    algo = get_preset("hpt").build()
    plan = build_batch(algo, 0)["plan"]
    sft_prompts = {g for g, s in zip(plan.prompt, plan.source) if s == Source.SFT}
    assert sft_prompts == {i for i, k in enumerate(CORRECT_PER_PROMPT) if k == 0}


def test_soft_gate_coefficients_enter_the_gradient():
    """HPT's general form: RL rows weighted alpha = P, SFT rows beta = 1 - P."""
    algo = get_preset("hpt").build()
    algo.gate = LinearGate()
    batch = build_batch(algo, 3)
    assert {round(c, 6) for c in batch["coef"].tolist()} > {1.0}  # fractional weights present
    _, g_logp, _, _ = run_loss(algo, batch)
    exp_logp, _ = oracle.expected_grads("hpt", oracle_rows(batch))
    torch.testing.assert_close(g_logp, padded(exp_logp), rtol=1e-9, atol=1e-12)


def test_sft_preset_is_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    b, t, v = 3, 7, 11
    logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.float64)
    mask[0, 5:] = 0
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    algo = get_preset("sft").build()
    source = torch.full((b,), int(Source.SFT))
    x = LossInputs(logp_BT=logp, mask_BT=mask, source_B=source, advantages={"sft": torch.ones(b, t)})
    loss, _ = upge_loss(algo, x, count_rows(algo, source, mask))
    (grad,) = torch.autograd.grad(loss, logits)

    ref_logits = logits.detach().clone().requires_grad_(True)
    keep = mask.bool()
    ce = F.cross_entropy(ref_logits[keep], targets[keep])
    (ref_grad,) = torch.autograd.grad(ce, ref_logits)
    torch.testing.assert_close(loss, ce.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


DUAL_CLIPPED = ["ppo", "grpo", "dr_grpo", "dapo", "reinforce_pp"]


def dual_capped_fraction(batch, adv_B_or_BT) -> float:
    """Fraction of rollout tokens with A < 0 and ratio > 3: the ones dual clip flattens."""
    rl = (batch["source"] == int(Source.RL))[:, None] & batch["mask"].bool()
    adv = adv_B_or_BT if adv_B_or_BT.dim() == 2 else adv_B_or_BT[:, None].expand_as(batch["mask"])
    ratio = torch.exp(batch["logp"] - batch["old"])
    return float(((adv < 0) & (ratio > 3.0) & rl).sum() / rl.sum())


@pytest.mark.parametrize("name", DUAL_CLIPPED)
def test_dual_clip_is_exercised_and_matches_the_oracle(name):
    """Far off-policy rows (log-ratio noise 1.5) put many A < 0 tokens beyond r = 3."""
    algo = get_preset(name).build()
    assert algo.terms["rl"].mask.dual_clip == 3.0
    batch = build_batch(algo, 4, old_noise=1.5)
    rows = ScoredRows(batch["reward"], batch["group"], batch["mask"], batch["source"], batch["values"])
    assert dual_capped_fraction(batch, algo.advantages(rows)["rl"]) > 0.02
    _, g_logp, _, _ = run_loss(algo, batch)
    exp_logp, _ = oracle.expected_grads(name, oracle_rows(batch))
    torch.testing.assert_close(g_logp, padded(exp_logp), rtol=1e-9, atol=1e-12)


def test_grpo_is_the_grpo_objective():
    """Loss value and gradient equal a direct transcription of DeepSeekMath's GRPO objective
    (beta = 0) with verl's dual clip (c = 3):
    -1/G sum_i 1/|o_i| sum_t s_t, s_t = min(r A, clip(r, 1-e, 1+e) A), raised to max(s_t, c A) where A < 0."""
    algo = get_preset("grpo").build()
    batch = build_batch(algo, 5, old_noise=1.0)
    loss, g_logp, _, _ = run_loss(algo, batch)

    logp = batch["logp"].clone().requires_grad_(True)
    mask, rl = batch["mask"], batch["source"] == int(Source.RL)
    rewards, groups = batch["reward"], batch["group"]
    adv = torch.zeros_like(rewards)
    for g in groups.unique():
        sel = (groups == g) & rl
        r = rewards[sel]
        adv[sel] = (r - r.mean()) / (r.std() + 1e-6)
    assert dual_capped_fraction(batch, adv) > 0.02
    ratio = torch.exp(logp - batch["old"])
    a = adv[:, None]
    surr = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    surr = torch.where(a < 0, torch.maximum(surr, 3.0 * a), surr)
    per_seq = (surr * mask).sum(-1) / mask.sum(-1)
    objective = per_seq[rl].mean()
    (-objective).backward()
    torch.testing.assert_close(
        torch.tensor(loss, dtype=torch.float64), -objective.detach(), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(g_logp, logp.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["hpt_official", "grpo", "dapo", "luffy", "srft", "gspo"])
def test_micro_batch_accumulation_equals_one_batch(name):
    algo = get_preset(name).build()
    batch = build_batch(algo, 2, old_noise=1.5e-3 if name == "gspo" else 0.25)
    b = batch["mask"].shape[0]
    edges = [0, b // 5, b // 2, (3 * b) // 4, b]
    slices = [slice(edges[i], edges[i + 1]) for i in range(4)]
    whole_loss, whole_g, whole_e, whole_m = run_loss(algo, batch)
    acc_loss, acc_g, acc_e, acc_m = run_loss(algo, batch, slices)
    assert math.isclose(acc_loss, whole_loss, rel_tol=1e-12, abs_tol=1e-14)
    torch.testing.assert_close(acc_g, whole_g, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(acc_e, whole_e, rtol=1e-12, atol=1e-15)
    for key in whole_m:
        assert math.isclose(acc_m[key], whole_m[key], rel_tol=1e-9, abs_tol=1e-12), key


def test_kl_estimators_gradients():
    """k1, k2, k3 against their closed-form derivatives in log pi."""
    gen = torch.Generator().manual_seed(0)
    logp = torch.log(torch.rand(2, 5, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    ref = torch.log(torch.rand(2, 5, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    mask = torch.ones(2, 5, dtype=torch.float64)
    source = torch.zeros(2, dtype=torch.long)
    d = ref - logp
    closed = {"k1": torch.ones_like(d), "k2": -d, "k3": 1.0 - torch.exp(d)}
    for est, dk in closed.items():
        algo = get_preset("grpo").build()
        algo.kl = type(algo.kl)(coef=0.5, estimator=est)
        algo.terms = {"rl": algo.terms["rl"]}
        x_logp = logp.clone().requires_grad_(True)
        x = LossInputs(
            logp_BT=x_logp,
            mask_BT=mask,
            source_B=source,
            advantages={"rl": torch.zeros(2, 5, dtype=torch.float64)},
            old_logp_BT=logp.clone(),
            ref_logp_BT=ref,
        )
        loss, metrics = upge_loss(algo, x, count_rows(algo, source, mask))
        loss.backward()
        torch.testing.assert_close(x_logp.grad, 0.5 * dk / 10, rtol=1e-10, atol=1e-12)
        assert metrics["actor/kl"] >= 0 or est == "k1"
