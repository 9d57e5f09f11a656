"""Train-inference mismatch corrections (hpt_megatron/algo/mismatch.py).

Every variant's autograd gradient (float64) is checked against a closed form written here in plain
Python, one token at a time: for a GRPO-style term with the PPO clip,
    d loss / d log pi_t = -w_t * 1_clip * A_t * pi_t / pi_old_t / N
with w_t computed by hand from rho_t = pi_old / pi_rollout per variant; off-policy and SFT rows keep
w = 1. Metrics are checked against hand-computed values, micro-batching against one batch.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import yaml

from hpt_megatron.algo import (
    CORRECTIONS,
    AlgoConfig,
    LossInputs,
    Source,
    Term,
    count_rows,
    get_preset,
    mean_metrics,
    merge_metrics,
    upge_loss,
)
from hpt_megatron.algo.advantages import GRPO, Constant
from hpt_megatron.algo.denominators import CurrentPolicy, OldPolicy
from hpt_megatron.algo.loss import rollout_mismatch
from hpt_megatron.algo.masks import NoMask, PPOClip
from hpt_megatron.algo.mismatch import IcePop, NoCorrection, SeqMIS, SeqTIS, TokenMIS, TokenTIS
from hpt_megatron.cli import train_main
from hpt_megatron.config import load_config
from hpt_megatron.config.io import ConfigError
from tests.unit.test_config import QWEN_LIKE

T_MAX = 8
EPS = 0.2  # PPO clip
N_RL, N_OFF, N_SFT = 16, 2, 3
GARBAGE_LOGP = -7.0  # "rollout log-probs" of non-rollout rows: must be ignored


def make_batch(seed: int = 0) -> dict:
    """Rows ordered rl, offpolicy, sft; float64; a wide spread of rho = pi_old / pi_rollout."""
    gen = torch.Generator().manual_seed(seed)
    source = torch.tensor(
        [int(Source.RL)] * N_RL + [int(Source.OFFPOLICY)] * N_OFF + [int(Source.SFT)] * N_SFT
    )
    b = len(source)
    lengths = torch.randint(2, T_MAX + 1, (b,), generator=gen)
    mask = (torch.arange(T_MAX)[None, :] < lengths[:, None]).double()
    logp = torch.log(torch.rand(b, T_MAX, generator=gen, dtype=torch.float64) * 0.9 + 0.05) * mask
    old = (logp + 0.15 * torch.randn(b, T_MAX, generator=gen, dtype=torch.float64)) * mask
    rollout = (old + 0.6 * torch.randn(b, T_MAX, generator=gen, dtype=torch.float64)) * mask
    rollout[source != int(Source.RL)] = GARBAGE_LOGP
    adv_B = torch.randn(b, generator=gen, dtype=torch.float64)
    return {"source": source, "mask": mask, "logp": logp, "old": old, "rollout": rollout, "adv": adv_B}


def make_algo(correction) -> AlgoConfig:
    rl = Term(
        sources=("rl", "offpolicy"),
        mask=PPOClip(eps_low=EPS, eps_high=EPS),
        ref=OldPolicy(),
        advantage=GRPO(),
        correction=correction,
    )
    sft = Term(sources=("sft",), mask=NoMask(), ref=CurrentPolicy(), advantage=Constant())
    return AlgoConfig(terms={"rl": rl, "sft": sft})


def run(algo: AlgoConfig, batch: dict, slices=None, with_rollout: bool = True):
    """Loss, d loss / d logp and merged metrics, summed over row slices (micro-batches)."""
    logp = batch["logp"].clone().requires_grad_(True)
    b = logp.shape[0]
    adv = {
        "rl": batch["adv"][:, None].expand(b, T_MAX).clone(),
        "sft": torch.ones(b, T_MAX, dtype=torch.float64),
    }
    counts = count_rows(algo, batch["source"], batch["mask"])
    total, parts = 0.0, []
    for sl in slices or [slice(None)]:
        x = LossInputs(
            logp_BT=logp[sl],
            mask_BT=batch["mask"][sl],
            source_B=batch["source"][sl],
            advantages={k: v[sl] for k, v in adv.items()},
            old_logp_BT=batch["old"][sl],
            rollout_logp_BT=batch["rollout"][sl] if with_rollout else None,
        )
        loss, metrics = upge_loss(algo, x, counts)
        loss.backward()
        total += float(loss.detach())
        parts.append(metrics)
    return total, logp.grad, merge_metrics(parts)


# ---- the closed form, in plain Python ------------------------------------------------------------


def rows_of(batch: dict) -> list[dict]:
    out = []
    for i in range(len(batch["source"])):
        n = int(batch["mask"][i].sum())
        out.append(
            {
                "source": Source(int(batch["source"][i])),
                "logp": batch["logp"][i, :n].tolist(),
                "old": batch["old"][i, :n].tolist(),
                "rollout": batch["rollout"][i, :n].tolist(),
                "adv": float(batch["adv"][i]),
            }
        )
    return out


def rho_tokens(row: dict) -> list[float]:
    return [math.exp(o - r) for o, r in zip(row["old"], row["rollout"])]


def rho_seq(row: dict, geometric: bool) -> float:
    s = sum(o - r for o, r in zip(row["old"], row["rollout"]))
    return math.exp(s / len(row["old"]) if geometric else s)


def hand_weights(name: str, row: dict) -> list[float]:
    """w_t for each token of a rollout row, per variant (cap 2, 1.2 geometric; icepop [0.5, 2])."""
    n = len(row["old"])
    if name == "none":
        return [1.0] * n
    if name == "tis":
        return [min(r, 2.0) for r in rho_tokens(row)]
    if name == "mis":
        return [r if r <= 2.0 else 0.0 for r in rho_tokens(row)]
    if name == "seq_tis":
        return [min(rho_seq(row, False), 2.0)] * n
    if name == "seq_mis":
        s = rho_seq(row, False)
        return [s if s <= 2.0 else 0.0] * n
    if name == "seq_tis_geo":  # cap 1.2: a geometric mean rarely reaches 2
        return [min(rho_seq(row, True), 1.2)] * n
    if name == "seq_mis_geo":
        s = rho_seq(row, True)
        return [s if s <= 1.2 else 0.0] * n
    if name == "icepop":
        return [1.0 if 0.5 <= r <= 2.0 else 0.0 for r in rho_tokens(row)]
    if name == "icepop_weighted":
        return [r if 0.5 <= r <= 2.0 else 0.0 for r in rho_tokens(row)]
    raise AssertionError(name)


def expected(name: str, batch: dict) -> tuple[float, torch.Tensor]:
    """Loss value and d loss / d logp: token means over the rl term's and the sft term's tokens."""
    rows = rows_of(batch)
    n_rl = sum(len(r["logp"]) for r in rows if r["source"] != Source.SFT)
    n_sft = sum(len(r["logp"]) for r in rows if r["source"] == Source.SFT)
    loss, grad = 0.0, torch.zeros(len(rows), T_MAX, dtype=torch.float64)
    for i, row in enumerate(rows):
        if row["source"] == Source.SFT:
            for t, lp in enumerate(row["logp"]):
                loss -= lp / n_sft
                grad[i, t] = -1.0 / n_sft
            continue
        w = hand_weights(name, row) if row["source"] == Source.RL else [1.0] * len(row["logp"])
        a = row["adv"]
        for t, (lp, o) in enumerate(zip(row["logp"], row["old"])):
            r = math.exp(lp - o)
            clipped = (a > 0 and r > 1 + EPS) or (a < 0 and r < 1 - EPS)
            loss -= w[t] * min(r * a, min(max(r, 1 - EPS), 1 + EPS) * a) / n_rl
            grad[i, t] = 0.0 if clipped else -w[t] * a * r / n_rl
    return loss, grad


VARIANTS = {
    "none": NoCorrection(),
    "tis": TokenTIS(),
    "mis": TokenMIS(cap=2.0),
    "seq_tis": SeqTIS(),
    "seq_tis_geo": SeqTIS(cap=1.2, geometric=True),
    "seq_mis": SeqMIS(),
    "seq_mis_geo": SeqMIS(cap=1.2, geometric=True),
    "icepop": IcePop(),
    "icepop_weighted": IcePop(weighted=True),
}


def test_every_correction_is_tested():
    assert {c.name for c in VARIANTS.values()} == set(CORRECTIONS.names())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gradient_matches_closed_form(name):
    batch = make_batch(0)
    loss, grad, metrics = run(make_algo(VARIANTS[name]), batch)
    exp_loss, exp_grad = expected(name, batch)
    torch.testing.assert_close(grad, exp_grad, rtol=1e-10, atol=1e-13)
    assert math.isclose(loss, exp_loss, rel_tol=1e-10, abs_tol=1e-13)
    assert 0.05 < metrics["rl/clip_frac"] < 0.95  # the PPO clip factor is exercised too
    corr = VARIANTS[name]
    if corr.name != "none":
        frac = metrics[f"rl/is_{corr.changes}_frac"]
        assert 0.0 < frac < 1.0, frac  # both branches of the correction are exercised


def test_correction_leaves_non_rollout_rows_alone():
    """Off-policy rows in the corrected term and the SFT term's rows get exactly the uncorrected
    gradient, although their (ignored) rollout log-probs are far off."""
    batch = make_batch(1)
    _, plain, _ = run(make_algo(NoCorrection()), batch)
    other = batch["source"] != int(Source.RL)
    for corr in VARIANTS.values():
        _, grad, _ = run(make_algo(corr), batch)
        assert torch.equal(grad[other], plain[other]), corr.name
    _, grad, _ = run(make_algo(TokenMIS()), batch)
    assert not torch.allclose(grad[~other], plain[~other])


def hand_metrics(batch: dict, ratio_of, weight_name: str, changed) -> dict[str, float]:
    rl = [r for r in rows_of(batch) if r["source"] == Source.RL]
    n = sum(len(r["old"]) for r in rl)
    k3 = sum(rho - math.log(rho) - 1.0 for r in rl for rho in rho_tokens(r))
    ratios = [x for r in rl for x in ratio_of(r)]
    weights = [w for r in rl for w in hand_weights(weight_name, r)]
    return {
        "k3": k3 / n,
        "max": max(ratios),
        "min": min(ratios),
        "frac": sum(1 for x in ratios if changed(x)) / n,
        "weight": sum(weights) / n,
    }


@pytest.mark.parametrize(
    "name, key, ratio_of, changed",
    [
        ("tis", "truncated", rho_tokens, lambda x: x > 2.0),
        ("seq_mis", "masked", lambda r: [rho_seq(r, False)] * len(r["old"]), lambda x: x > 2.0),
        ("icepop", "masked", rho_tokens, lambda x: not 0.5 <= x <= 2.0),
    ],
)
def test_metrics_match_hand_computed(name, key, ratio_of, changed):
    batch = make_batch(2)
    _, _, m = run(make_algo(VARIANTS[name]), batch)
    want = hand_metrics(batch, ratio_of, name, changed)
    assert math.isclose(m["rl/mismatch_k3"], want["k3"], rel_tol=1e-10)
    assert math.isclose(m["rl/is_ratio_max"], want["max"], rel_tol=1e-12)
    assert math.isclose(m["rl/is_ratio_min"], want["min"], rel_tol=1e-12)
    assert math.isclose(m[f"rl/is_{key}_frac"], want["frac"], rel_tol=1e-12)
    assert math.isclose(m["rl/is_weight_mean"], want["weight"], rel_tol=1e-10)
    assert not any(k.startswith("sft/is_") or k == "sft/mismatch_k3" for k in m)  # no correction there


def test_no_correction_reports_no_correction_metrics():
    _, _, m = run(make_algo(NoCorrection()), make_batch(0))
    assert not [k for k in m if "/is_" in k or "mismatch_k3" in k]


def test_rollout_mismatch_reuses_the_same_ratio():
    """The engine-vs-actor metric the actor logs equals the corrected term's k3."""
    batch = make_batch(3)
    algo = make_algo(TokenTIS())
    _, _, m = run(algo, batch)
    counts = count_rows(algo, batch["source"], batch["mask"])
    x = LossInputs(batch["logp"], batch["mask"], batch["source"], {}, rollout_logp_BT=batch["rollout"])
    rm = rollout_mismatch(batch["old"], batch["rollout"], x, counts)
    assert math.isclose(float(rm["rollout/logp_mismatch_k3"]), m["rl/mismatch_k3"], rel_tol=1e-12)


@pytest.mark.parametrize("name", ["tis", "seq_mis_geo", "icepop_weighted"])
def test_micro_batches_equal_one_batch(name):
    """The last slice holds only SFT rows (no corrected tokens: no _max/_min from it)."""
    algo, batch = make_algo(VARIANTS[name]), make_batch(4)
    b = len(batch["source"])
    edges = [0, 5, 11, N_RL + 1, N_RL + N_OFF, b]
    slices = [slice(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    whole_loss, whole_g, whole_m = run(algo, batch)
    acc_loss, acc_g, acc_m = run(algo, batch, slices)
    assert math.isclose(acc_loss, whole_loss, rel_tol=1e-12, abs_tol=1e-14)
    torch.testing.assert_close(acc_g, whole_g, rtol=1e-12, atol=1e-15)
    assert set(acc_m) == set(whole_m)
    for key in whole_m:
        assert math.isclose(acc_m[key], whole_m[key], rel_tol=1e-10, abs_tol=1e-13), key


def test_min_and_max_metrics_combine_over_updates():
    parts = [
        {"rl/is_ratio_min": 0.5, "rl/is_ratio_max": 1.5, "loss/total": 1.0},
        {"rl/is_ratio_min": 0.25, "rl/is_ratio_max": 3.0, "loss/total": 3.0},
    ]
    assert mean_metrics(parts) == {"rl/is_ratio_min": 0.25, "rl/is_ratio_max": 3.0, "loss/total": 2.0}
    assert merge_metrics(parts) == {"rl/is_ratio_min": 0.25, "rl/is_ratio_max": 3.0, "loss/total": 4.0}


def test_missing_rollout_logprobs_is_an_error_naming_the_key():
    with pytest.raises(ValueError) as err:
        run(make_algo(TokenTIS()), make_batch(0), with_rollout=False)
    assert str(err.value) == (
        "algo.terms.rl.correction is 'tis', which needs the rollout engine's log-probs of the sampled "
        "tokens (rollout_logp_BT), but this batch has none; set algo.terms.rl.correction to none"
    )
    run(make_algo(NoCorrection()), make_batch(0), with_rollout=False)  # fine without a correction


def test_extreme_and_missing_engine_logprobs_stay_finite():
    """A rollout log-prob of -inf (ratio beyond exp(20)) is clamped; NaN (vLLM without an entry) is rho = 1."""
    batch = make_batch(5)
    batch["rollout"][0, 0] = float("-inf")
    batch["rollout"][1, 0] = float("nan")
    for corr in VARIANTS.values():
        loss, grad, m = run(make_algo(corr), batch)
        assert math.isfinite(loss) and torch.isfinite(grad).all(), corr.name
        assert all(math.isfinite(v) for v in m.values()), corr.name
    _, grad, _ = run(make_algo(TokenMIS()), batch)
    assert grad[0, 0] == 0.0  # masked: rho = exp(20) > cap


def test_term_needs_old_logp_and_describe():
    plain = get_preset("grpo").build().terms["rl"]
    assert "correction" not in plain.describe()
    term = Term(sources=("rl",), ref=CurrentPolicy(), correction=TokenTIS(cap=3.0))
    assert term.needs_old_logp  # pi_old must be recomputed when a step has several updates
    assert term.describe().endswith("| correction tis(cap=3)")
    assert IcePop(weighted=True).__class__ is CORRECTIONS.get("icepop")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cls": TokenTIS, "cap": 0.5}, "correction 'tis': cap must be >= 1"),
        ({"cls": SeqMIS, "cap": 0.9}, "correction 'seq_mis': cap must be >= 1"),
        ({"cls": IcePop, "alpha": 1.5}, "correction 'icepop': need 0 <= alpha <= 1 <= beta"),
    ],
)
def test_impossible_parameters(kwargs, message):
    cls = kwargs.pop("cls")
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


# ---- config ---------------------------------------------------------------------------------------

@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps(QWEN_LIKE))
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  hf_config: model.json\nalgo: {preset: grpo}\n")
    return path


def test_config_overrides_and_round_trip(recipe, tmp_path):
    cfg = load_config(recipe, ["algo.terms.rl.correction={name: tis, cap: 3.0}"])
    assert cfg.algo.terms["rl"].correction == TokenTIS(cap=3.0)
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(cfg.to_dict()))
    assert yaml.safe_load(dumped.read_text())["algo"]["terms"]["rl"]["correction"] == {
        "name": "tis",
        "cap": 3.0,
    }
    assert load_config(dumped) == cfg

    assert load_config(recipe, ["algo.terms.rl.correction=icepop"]).algo.terms["rl"].correction == IcePop()
    cfg = load_config(
        recipe, ["algo.terms.rl.correction.name=seq_mis", "algo.terms.rl.correction.geometric=true"]
    )
    assert cfg.algo.terms["rl"].correction == SeqMIS(geometric=True)
    assert load_config(recipe).algo.terms["rl"].correction == NoCorrection()


def test_config_errors_name_the_key(recipe):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["algo.terms.rl.correction=tiss"])
    assert str(err.value).startswith(
        f"{recipe}: algo.terms.rl.correction.name: unknown correction 'tiss' (did you mean 'tis'?); "
        "valid correction names: icepop, mis, none, seq_mis, seq_tis, tis"
    )
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["algo.terms.rl.correction={name: tis, cap: 0.5}"])
    assert str(err.value).startswith(
        f"{recipe}: algo.terms.rl.correction: correction 'tis': cap must be >= 1"
    )
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["algo.terms.rl.correction={name: icepop, cap: 2}"])
    assert str(err.value) == (
        f"{recipe}: unknown key 'algo.terms.rl.correction.cap' (did you mean "
        "'algo.terms.rl.correction.alpha'?); valid keys under 'algo.terms.rl.correction': alpha, beta, weighted"
    )


def test_correction_without_rollout_rows_warns(recipe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(recipe, ["algo.preset=hpt", "algo.terms.sft.correction=tis"])
    assert any("algo.terms.sft.correction 'tis' has no effect" in str(w.message) for w in caught)


def test_list_algorithms_still_works(capsys):
    assert train_main(["--list-algorithms"]) == 0
    assert "grpo" in capsys.readouterr().out
