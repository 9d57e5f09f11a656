"""``hpt_released``: the released HPT code's normalizers, which depend on the micro-batch split and
the data-parallel size, against the released formula written out by hand.

The released code (verl + FSDP, ``ppo_micro_batch_size = ppo_mini_batch_size`` so verl's
``gradient_accumulation`` is 1) backpropagates, on every rank and for every micro-batch M,

    sft_coef * mean_{sft tokens of M}(-log pi) + sum_{rl tokens of M}(-A * ratio) / 8192
        - 0.001 * mean_{all tokens of M}(entropy)

and FSDP averages the gradients over the DP ranks. So, per token, with dp = number of ranks:

    d/d log pi (rl token)   = -A * ratio / (8192 * dp)
    d/d log pi (sft token)  = -sft_coef / (n_sft(M) * dp)
    d/d entropy (any token) = -0.001 / (n_all(M) * dp)

``hpt_official`` (global counts) must instead give the one-big-batch gradient for every split.
Everything expected here is plain Python over floats, sharing no code with hpt_megatron.algo.
"""

from __future__ import annotations

import math

import pytest
import torch

from hpt_megatron.algo import LossInputs, Source, count_rows, get_preset, merge_metrics, upge_loss
from hpt_megatron.algo.reductions import ReleasedTokenMean, ReleasedTokenSum, TokenMean
from hpt_megatron.config import resolve_algo
from hpt_megatron.train.batching import micro_batches, split_for_data_parallel

T_MAX = 9
RELEASED = 8192.0
ENTROPY_COEF = 0.001
# 3 groups of 3 rollouts and 3 demonstrations, interleaved so that splits leave some micro-batches
# without any SFT row (their SFT mean is over no tokens: 0, as the released code skips its NaN)
SOURCES = ["rl", "sft", "rl", "rl", "rl", "rl", "sft", "sft", "rl", "rl", "rl", "rl"]
GROUPS = [0, 3, 0, 0, 1, 1, 4, 5, 1, 2, 2, 2]
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]


def make_batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    b = len(SOURCES)
    lengths = torch.randint(2, T_MAX + 1, (b,), generator=gen)
    mask = (torch.arange(T_MAX)[None, :] < lengths[:, None]).double()
    logp = torch.log(torch.rand(b, T_MAX, generator=gen, dtype=torch.float64) * 0.9 + 0.05) * mask
    old = (logp + 0.3 * torch.randn(b, T_MAX, generator=gen, dtype=torch.float64)) * mask
    entropy = torch.rand(b, T_MAX, generator=gen, dtype=torch.float64) * 3.0 * mask
    return {"lengths": lengths.tolist(), "mask": mask, "logp": logp, "old": old, "entropy": entropy}


def grpo_no_std() -> list[float]:
    """A = R - mean(R of the row's group) for rollouts; 1 for demonstrations (by hand)."""
    adv = []
    for i, src in enumerate(SOURCES):
        if src == "sft":
            adv.append(1.0)
            continue
        group = [REWARDS[j] for j in range(len(SOURCES)) if SOURCES[j] == "rl" and GROUPS[j] == GROUPS[i]]
        adv.append(REWARDS[i] - sum(group) / len(group))
    return adv


def run(name: str, batch: dict, ranks: list[list[list[int]]], kl_coef: float = 0.0):
    """Sum of the loss and its gradients over every rank's micro-batches (rows by index), as the
    actor does: one ``upge_loss`` call per micro-batch with the global counts and ``dp_size``.
    ``kl_coef``: a k1 KL penalty against ``batch["old"]`` as the reference model."""
    algo = get_preset(name).build()
    if kl_coef:
        algo.kl = type(algo.kl)(coef=kl_coef, estimator="k1")
    source = torch.tensor([int(Source.parse(s)) for s in SOURCES])
    counts = count_rows(algo, source, batch["mask"])
    adv_B = torch.tensor(grpo_no_std(), dtype=torch.float64)
    adv_BT = adv_B[:, None].expand(-1, T_MAX)
    logp = batch["logp"].clone().requires_grad_(True)
    entropy = batch["entropy"].clone().requires_grad_(True)
    total, parts = 0.0, []
    for rank in ranks:
        for rows in rank:
            idx = torch.tensor(rows)
            x = LossInputs(
                logp_BT=logp[idx],
                mask_BT=batch["mask"][idx],
                source_B=source[idx],
                advantages={"rl": adv_BT[idx], "sft": adv_BT[idx]},
                coef_B=torch.ones(len(rows), dtype=torch.float64),
                old_logp_BT=batch["old"][idx],
                entropy_BT=entropy[idx],
                ref_logp_BT=batch["old"][idx] if kl_coef else None,
                dp_size=len(ranks),
            )
            loss, metrics = upge_loss(algo, x, counts)
            loss.backward()
            total += float(loss.detach())
            parts.append(metrics)
    return total, logp.grad, entropy.grad, merge_metrics(parts)


def expected(batch: dict, ranks: list[list[list[int]]], released: bool):
    """Loss and per-token gradients of the released formula (``released``) or of the global one."""
    n = [int(x) for x in batch["lengths"]]
    logp, old, ent = batch["logp"].tolist(), batch["old"].tolist(), batch["entropy"].tolist()
    adv = grpo_no_std()
    g_logp = [[0.0] * T_MAX for _ in SOURCES]
    g_ent = [[0.0] * T_MAX for _ in SOURCES]
    loss = 0.0
    everything = [i for rank in ranks for mb in rank for i in mb]
    n_sft_all = sum(n[i] for i in everything if SOURCES[i] == "sft")
    n_all = sum(n[i] for i in everything)
    dp = len(ranks) if released else 1
    for rank in ranks:
        for mb in rank:
            n_sft = sum(n[i] for i in mb if SOURCES[i] == "sft") if released else n_sft_all
            n_tok = sum(n[i] for i in mb) if released else n_all
            for i in mb:
                for t in range(n[i]):
                    if SOURCES[i] == "rl":
                        ratio = math.exp(logp[i][t] - old[i][t])
                        loss += -adv[i] * ratio / (RELEASED * dp)
                        g_logp[i][t] = -adv[i] * ratio / (RELEASED * dp)
                    else:
                        loss += -logp[i][t] / (n_sft * dp)
                        g_logp[i][t] = -1.0 / (n_sft * dp)
                    loss += -ENTROPY_COEF * ent[i][t] / (n_tok * dp)
                    g_ent[i][t] = -ENTROPY_COEF / (n_tok * dp)
    as_t = lambda g: torch.tensor(g, dtype=torch.float64)  # noqa: E731
    return loss, as_t(g_logp), as_t(g_ent)


def split(rows: list[int], k: int) -> list[list[int]]:
    """``rows`` in ``k`` contiguous, non-empty micro-batches."""
    edges = [round(j * len(rows) / k) for j in range(k + 1)]
    return [rows[edges[j] : edges[j + 1]] for j in range(k)]


def layout(dp: int, n_micro: int) -> list[list[list[int]]]:
    """Rows dealt round-robin over ``dp`` ranks, each rank's share in ``n_micro`` micro-batches."""
    return [split([i for i in range(len(SOURCES)) if i % dp == r], n_micro) for r in range(dp)]


LAYOUTS = [(dp, k) for dp in (1, 2) for k in (1, 2, 3)]


def test_layouts_cover_micro_batches_without_sft_rows():
    ranks = layout(1, 3)
    assert any(all(SOURCES[i] != "sft" for i in mb) for mb in ranks[0])
    assert sorted(i for dp, k in LAYOUTS for rank in layout(dp, k) for mb in rank for i in mb) == sorted(
        list(range(len(SOURCES))) * len(LAYOUTS)
    )


@pytest.mark.parametrize(("dp", "n_micro"), LAYOUTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_hpt_released_equals_the_released_formula(dp, n_micro, seed):
    batch = make_batch(seed)
    ranks = layout(dp, n_micro)
    loss, g_logp, g_ent, metrics = run("hpt_released", batch, ranks)
    exp_loss, exp_logp, exp_ent = expected(batch, ranks, released=True)
    assert math.isclose(loss, exp_loss, rel_tol=1e-11, abs_tol=1e-14)
    assert math.isclose(metrics["loss/total"], exp_loss, rel_tol=1e-11, abs_tol=1e-14)
    torch.testing.assert_close(g_logp, exp_logp, rtol=1e-11, atol=1e-15)
    torch.testing.assert_close(g_ent, exp_ent, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize(("dp", "n_micro"), LAYOUTS)
def test_hpt_official_is_invariant_to_the_split(dp, n_micro):
    batch = make_batch(0)
    ranks = layout(dp, n_micro)
    loss, g_logp, g_ent, metrics = run("hpt_official", batch, ranks)
    exp_loss, exp_logp, exp_ent = expected(batch, [[list(range(len(SOURCES)))]], released=False)
    assert math.isclose(loss, exp_loss, rel_tol=1e-11, abs_tol=1e-14)
    torch.testing.assert_close(g_logp, exp_logp, rtol=1e-11, atol=1e-15)
    torch.testing.assert_close(g_ent, exp_ent, rtol=1e-11, atol=1e-15)
    one_loss, one_logp, one_ent, one_metrics = run("hpt_official", batch, layout(1, 1))
    assert math.isclose(loss, one_loss, rel_tol=1e-12, abs_tol=1e-15)
    torch.testing.assert_close(g_logp, one_logp, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g_ent, one_ent, rtol=1e-12, atol=1e-15)
    for key in one_metrics:
        if not key.endswith("_max"):
            assert math.isclose(metrics[key], one_metrics[key], rel_tol=1e-9, abs_tol=1e-12), key


def test_released_and_official_agree_at_one_micro_batch_on_one_rank():
    batch = make_batch(2)
    rel = run("hpt_released", batch, layout(1, 1))
    off = run("hpt_official", batch, layout(1, 1))
    assert math.isclose(rel[0], off[0], rel_tol=1e-13)
    torch.testing.assert_close(rel[1], off[1], rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(rel[2], off[2], rtol=1e-13, atol=1e-16)


def test_the_sft_to_rl_weight_depends_on_the_split():
    """The documented consequence: under the released normalizers each micro-batch holding
    demonstrations adds a whole SFT mean (weight 1 / dp), while the RL term's weight is fixed
    at 1 / (8192 dp); so more micro-batches raise SFT relative to RL, more ranks lower RL."""
    batch = make_batch(0)
    sft = torch.tensor([s == "sft" for s in SOURCES])
    rl = ~sft

    def masses(ranks):
        _, g, _, _ = run("hpt_released", batch, ranks)
        return float(g[sft].sum()), float(g[rl].sum())

    sft_1, rl_1 = masses([[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]])
    sft_3, rl_3 = masses([[[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]]])  # each holds one demonstration
    sft_dp, rl_dp = masses([[[0, 1, 2, 3, 4, 5]], [[6, 7, 8, 9, 10, 11]]])  # one micro-batch per rank
    assert math.isclose(sft_1, -1.0) and math.isclose(sft_3, -3.0) and math.isclose(sft_dp, -1.0)
    assert math.isclose(rl_3, rl_1, rel_tol=1e-12) and math.isclose(rl_dp, rl_1 / 2, rel_tol=1e-12)


def test_the_token_budget_changes_released_but_not_official():
    """Through the actor's own splitting (token-balanced DP shares, token-budget micro-batches)."""
    batch = make_batch(1)
    lengths = [n + 4 for n in batch["lengths"]]  # prompt + response

    def actor_layout(dp: int, budget: int) -> list[list[list[int]]]:
        out = []
        for mine in split_for_data_parallel(lengths, dp):
            groups = micro_batches([lengths[i] for i in mine], budget, packed=False)
            out.append([[mine[j] for j in g] for g in groups])
        return out

    results = {}
    for dp, budget in [(1, 10_000), (1, 30), (2, 10_000), (2, 30)]:
        ranks = actor_layout(dp, budget)
        results[dp, budget] = len([mb for r in ranks for mb in r])
        for name, released in [("hpt_released", True), ("hpt_official", False)]:
            loss, g_logp, g_ent, _ = run(name, batch, ranks)
            exp_loss, exp_logp, exp_ent = expected(batch, ranks, released=released)
            assert math.isclose(loss, exp_loss, rel_tol=1e-11, abs_tol=1e-14)
            torch.testing.assert_close(g_logp, exp_logp, rtol=1e-11, atol=1e-15)
            torch.testing.assert_close(g_ent, exp_ent, rtol=1e-11, atol=1e-15)
    assert results[1, 30] > results[1, 10_000] == 1  # the small budget really splits


def test_preset_and_config_syntax():
    algo = get_preset("hpt_released").build()
    assert algo.terms["rl"].reduction == ReleasedTokenSum(constant=8192.0)
    assert algo.terms["sft"].reduction == ReleasedTokenMean()
    assert algo.regularizer_reduction == ReleasedTokenMean()
    official = get_preset("hpt_official").build()
    assert official.regularizer_reduction == TokenMean()
    # apart from the normalizers, hpt_released is hpt_official
    for term in ("rl", "sft"):
        a, b = algo.terms[term], official.terms[term]
        assert (a.sources, a.mask, a.ref, a.advantage, a.transform, a.coef) == (
            b.sources,
            b.mask,
            b.ref,
            b.advantage,
            b.transform,
            b.coef,
        )
    assert (algo.gate, algo.entropy_coef, algo.kl) == (official.gate, official.entropy_coef, official.kl)
    # the same normalizers on any preset, term by term
    custom = resolve_algo(
        {
            "preset": "hpt_official",
            "terms": {
                "rl": {"reduction": {"name": "released_token_sum", "constant": 8192}},
                "sft": {"reduction": "released_token_mean"},
            },
            "regularizer_reduction": "released_token_mean",
        },
        "algo",
    )
    assert custom.terms["rl"].reduction == algo.terms["rl"].reduction
    assert custom.terms["sft"].reduction == algo.terms["sft"].reduction
    assert custom.regularizer_reduction == algo.regularizer_reduction
    assert custom.terms["sft"].coef == 1.0 and custom.entropy_coef == 0.001


def test_regularizer_reduction_also_covers_the_kl_penalty():
    """With a KL penalty, the released reduction takes its per-micro-batch token mean too."""
    batch = make_batch(3)
    ranks = layout(2, 2)
    _, g_with_kl, _, _ = run("hpt_released", batch, ranks, kl_coef=0.5)
    _, g_without_kl, _, _ = run("hpt_released", batch, ranks)
    n = batch["lengths"]
    for rank in ranks:
        for mb in rank:
            n_tok = sum(n[i] for i in mb)
            for i in mb:
                # k1 = log pi - log pi_ref: d/d log pi = 1, times coef / (n_all(M) * dp)
                kl_grad = g_with_kl[i, : n[i]] - g_without_kl[i, : n[i]]
                torch.testing.assert_close(
                    kl_grad, torch.full((n[i],), 0.5 / (n_tok * 2), dtype=torch.float64)
                )
