"""The critic's value loss, value targets and explained variance against closed forms written out
by hand (plain Python floats, no torch in the oracle)."""

from __future__ import annotations

import math

import pytest
import torch

from hpt_megatron.algo import ScoredRows, Source, get_preset
from hpt_megatron.algo.advantages import GAE
from hpt_megatron.algo.value import (
    ValueLoss,
    critic_mask,
    explained_variance,
    gae_estimator,
    gae_returns,
    needs_critic,
)

# two rows, four positions; row 1 ends after two tokens
V = [[0.3, -0.2, 1.4, 0.0], [0.9, 0.1, 0.0, 0.0]]
V_OLD = [[0.0, 0.1, 0.5, 0.0], [1.0, -0.6, 0.0, 0.0]]
R = [[1.0, 0.0, 1.0, 0.0], [0.2, 0.5, 0.0, 0.0]]
M = [[1, 1, 1, 0], [1, 1, 0, 0]]


def oracle_token(v: float, v_old: float, r: float, eps: float | None) -> tuple[float, float, bool]:
    """(loss, dloss/dv, clipped branch active) of one token of 0.5 * max((v-r)^2, (vc-r)^2)."""
    plain = (v - r) ** 2
    if eps is None:
        return 0.5 * plain, v - r, False
    vc = min(max(v, v_old - eps), v_old + eps)
    far = (vc - r) ** 2
    if far > plain:
        # vc is constant in v when v is outside [v_old - eps, v_old + eps]; inside, vc = v
        inside = v_old - eps < v < v_old + eps
        return 0.5 * far, (vc - r) if inside else 0.0, True
    return 0.5 * plain, v - r, False


def tensors():
    values = torch.tensor(V, dtype=torch.float64, requires_grad=True)
    return values, torch.tensor(V_OLD, dtype=torch.float64), torch.tensor(R, dtype=torch.float64)


@pytest.mark.parametrize("eps", [0.2, 0.5, None])
def test_value_loss_and_gradient_match_closed_form(eps):
    values, old, returns = tensors()
    mask = torch.tensor(M, dtype=torch.float64)
    n = 7.0  # a global count larger than this micro-batch's 5 tokens: the loss divides by it
    loss, metrics = ValueLoss(clip=eps)(values, old, returns, mask, n)
    loss.backward()
    want_loss, want_clip, want_vmean = 0.0, 0.0, 0.0
    want_grad = [[0.0] * 4 for _ in range(2)]
    for b in range(2):
        for t in range(4):
            if not M[b][t]:
                continue
            lt, gt, clipped = oracle_token(V[b][t], V_OLD[b][t], R[b][t], eps)
            want_loss += lt / n
            want_grad[b][t] = gt / n
            want_clip += float(clipped) / n
            want_vmean += V[b][t] / n
    assert float(loss.detach()) == pytest.approx(want_loss, abs=1e-12)
    torch.testing.assert_close(values.grad, torch.tensor(want_grad, dtype=torch.float64), atol=1e-12, rtol=0)
    assert float(metrics["critic/value_clip_frac"]) == pytest.approx(want_clip, abs=1e-12)
    assert float(metrics["critic/values_mean"]) == pytest.approx(want_vmean, abs=1e-12)
    if eps == 0.2:
        assert want_clip > 0  # the example exercises the clipped branch


def test_clipped_branch_can_stop_the_gradient():
    """V moved beyond V_old + eps and away from R: the clipped term dominates and is constant in V."""
    v = torch.tensor([[2.0]], dtype=torch.float64, requires_grad=True)
    loss, metrics = ValueLoss(clip=0.5)(v, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), 1)
    loss.backward()
    # max((2 - -1)^2, (0.5 - -1)^2) = 9: the unclipped branch is larger -> gradient v - r = 3
    assert loss.item() == pytest.approx(4.5)
    assert float(v.grad) == pytest.approx(3.0)
    assert float(metrics["critic/value_clip_frac"]) == 0.0
    v = torch.tensor([[2.0]], dtype=torch.float64, requires_grad=True)
    loss, metrics = ValueLoss(clip=0.5)(v, torch.zeros(1, 1), torch.tensor([[3.0]]), torch.ones(1, 1), 1)
    loss.backward()
    # max((2-3)^2, (0.5-3)^2) = 6.25, clipped branch constant in v
    assert loss.item() == pytest.approx(3.125)
    assert float(v.grad) == 0.0
    assert float(metrics["critic/value_clip_frac"]) == 1.0


def test_micro_batches_sum_to_the_whole_batch():
    """Global-count reduction: two micro-batches' losses and gradients add up to the full batch's."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64)
    old, r = (
        torch.randn(6, 5, generator=g, dtype=torch.float64),
        torch.randn(6, 5, generator=g, dtype=torch.float64),
    )
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    n = float(mask.sum())
    loss_fn = ValueLoss(clip=0.3)
    whole = v.clone().requires_grad_(True)
    full, _ = loss_fn(whole, old, r, mask, n)
    full.backward()
    parts = v.clone().requires_grad_(True)
    total = sum(loss_fn(parts[s], old[s], r[s], mask[s], n)[0] for s in (slice(0, 2), slice(2, 6)))
    total.backward()
    assert float(total) == pytest.approx(float(full), abs=1e-12)
    torch.testing.assert_close(parts.grad, whole.grad, atol=1e-12, rtol=0)


def test_gae_returns_closed_form():
    """R_t = A_t + V_t with A from GAE(gamma, lam) and the reward on the last real token:
    A_t = sum_k (gamma*lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t (V after the end = 0)."""
    gamma, lam = 0.9, 0.8
    values = [[0.5, 0.2, -0.1, 7.0], [0.3, 0.4, 9.0, 9.0]]  # values past the end must not leak in
    mask = [[1, 1, 1, 0], [1, 1, 0, 0]]
    reward = [1.0, -0.5]
    rows = ScoredRows(
        rewards_B=torch.tensor(reward, dtype=torch.float64),
        group_B=torch.tensor([0, 1]),
        mask_BT=torch.tensor(mask, dtype=torch.float32),
        source_B=torch.tensor([int(Source.RL)] * 2),
        values_BT=torch.tensor(values, dtype=torch.float64),
    )
    got = gae_returns(GAE(gamma=gamma, lam=lam, whiten=True), rows)  # whitening never enters the targets
    for b in range(2):
        n = sum(mask[b])
        vs = [*values[b][:n], 0.0]
        rs = [0.0] * (n - 1) + [reward[b]]
        deltas = [rs[t] + gamma * vs[t + 1] - vs[t] for t in range(n)]
        for t in range(4):
            if t >= n:
                assert float(got[b, t]) == 0.0
                continue
            adv = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert float(got[b, t]) == pytest.approx(adv + vs[t], abs=1e-12)
    # lam = 1: the targets are the discounted Monte-Carlo returns whatever the values
    mc = gae_returns(GAE(gamma=gamma, lam=1.0), rows)
    assert float(mc[0, 0]) == pytest.approx(gamma**2 * 1.0, abs=1e-12)
    assert float(mc[1, 1]) == pytest.approx(-0.5, abs=1e-12)


def test_explained_variance_closed_form():
    r = [1.0, 0.0, 2.0, 1.0, 5.0]
    v = [0.5, 0.5, 1.5, 1.0, -3.0]
    m = [1, 1, 1, 1, 0]
    sel_r, sel_e = r[:4], [r[i] - v[i] for i in range(4)]

    def var(xs):
        mu = sum(xs) / len(xs)
        return sum((x - mu) ** 2 for x in xs) / len(xs)

    got = explained_variance(torch.tensor([v]), torch.tensor([r]), torch.tensor([m]))
    assert got == pytest.approx(1 - var(sel_e) / var(sel_r), abs=1e-12)
    assert explained_variance(torch.tensor([r]), torch.tensor([r]), torch.tensor([m])) == pytest.approx(1.0)
    assert math.isnan(explained_variance(torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[1]])))


def test_critic_mask_keeps_rollout_rows_only():
    mask = torch.ones(3, 2)
    src = torch.tensor([int(Source.RL), int(Source.SFT), int(Source.OFFPOLICY)])
    assert critic_mask(mask, src).tolist() == [[1, 1], [0, 0], [0, 0]]


def test_only_gae_presets_need_a_critic():
    assert needs_critic(get_preset("ppo").build())
    assert isinstance(gae_estimator(get_preset("ppo").build().terms), GAE)
    for name in ("grpo", "hpt", "sft", "reinforce_pp"):
        assert not needs_critic(get_preset(name).build())
