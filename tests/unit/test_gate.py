"""The HPT gate: a table of cases with the expected routing of each prompt."""

from __future__ import annotations

import pytest
import torch

from hpt_megatron.algo import GATES, ScoredRows, Source, get_preset, plan_rows
from hpt_megatron.algo.gate import HardSwitchGate, LinearGate, MixedGate, RLGate, SFTGate, TableGate

N = 8


def rewards_with(correct_counts: list[int], n: int = N) -> torch.Tensor:
    """One row per prompt with the given number of correct rollouts (placed last, to show order
    does not matter)."""
    out = torch.zeros(len(correct_counts), n)
    for g, k in enumerate(correct_counts):
        if k:
            out[g, n - k :] = 1.0
    return out


def route_kinds(gate, correct_counts: list[int]) -> list[str]:
    """Each prompt's route as a word: sft, rl, band (RL rollouts + demonstration in the group),
    off (rollouts dropped, the demonstration alone as an off-policy row: the released band)."""
    r = gate.route(rewards_with(correct_counts))
    kinds = []
    for g in range(len(correct_counts)):
        rl, sft, off = float(r.rl_coef_G[g]) > 0, float(r.sft_coef_G[g]) > 0, bool(r.off_G[g])
        kinds.append(
            {
                (False, True, False): "sft",
                (True, False, False): "rl",
                (True, False, True): "band",
                (False, False, True): "off",
            }[rl, sft, off]
        )
    return kinds


COUNTS = [0, 1, 2, 3, 8]

CASES = [
    # (gate, expected route for 0, 1, 2, 3, 8 correct of 8)
    (HardSwitchGate(gamma=0, unit="count"), ["sft", "rl", "rl", "rl", "rl"]),  # Qwen: SFT only when all fail
    (HardSwitchGate(gamma=2, unit="count"), ["sft", "sft", "sft", "rl", "rl"]),  # Llama: tie at 2 goes to SFT
    (HardSwitchGate(gamma=0.25, unit="fraction"), ["sft", "sft", "sft", "rl", "rl"]),  # 2/8 == 0.25 -> SFT
    (HardSwitchGate(gamma=0.125, unit="fraction"), ["sft", "sft", "rl", "rl", "rl"]),
    # the released switch_gate_off band: rollouts dropped, demonstration trained off-policy
    (HardSwitchGate(gamma=0, unit="count", gamma_off=2), ["sft", "off", "off", "rl", "rl"]),
    (HardSwitchGate(gamma=1, unit="count", gamma_off=3), ["sft", "sft", "off", "off", "rl"]),
    (HardSwitchGate(gamma=0.125, unit="fraction", gamma_off=0.25), ["sft", "sft", "off", "rl", "rl"]),
    (HardSwitchGate(gamma=0, gamma_off=0), ["sft", "rl", "rl", "rl", "rl"]),  # the scripts' 2-stage switch
    (HardSwitchGate(gamma=0, gamma_off=8), ["sft", "off", "off", "off", "off"]),
    # band="join": this project's earlier band, rollouts kept and the demonstration joins their group
    (HardSwitchGate(gamma=0, unit="count", gamma_off=2, band="join"), ["sft", "band", "band", "rl", "rl"]),
    (HardSwitchGate(gamma=8, unit="count"), ["sft", "sft", "sft", "sft", "sft"]),
    (RLGate(), ["rl"] * 5),
    (MixedGate(), ["band"] * 5),
]


@pytest.mark.parametrize(("gate", "expected"), CASES, ids=[f"{c[0]!r}" for c in CASES])
def test_routing_table(gate, expected):
    gate.validate(N)
    assert route_kinds(gate, COUNTS) == expected


def test_sft_gate_samples_nothing_and_trains_demonstrations():
    gate = SFTGate()
    assert gate.rollouts_per_prompt(N) == 0
    r = gate.route(torch.zeros(3, 0))
    plan = plan_rows(r, 0)
    assert plan.source == [Source.SFT] * 3 and plan.rollout == [-1] * 3 and plan.prompt == [0, 1, 2]


def test_plan_rows_layouts():
    # hard switch, gamma 0: prompt 0 -> one SFT row; prompt 1 -> its 8 rollouts as RL rows
    plan = plan_rows(HardSwitchGate(gamma=0).route(rewards_with([0, 3])), N)
    assert plan.source == [Source.SFT] + [Source.RL] * N
    assert plan.prompt == [0] + [1] * N and plan.rollout == [-1, *range(N)]
    # LUFFY layout: n-1 rollouts and the demonstration in one group
    gate = MixedGate()
    plan = plan_rows(gate.route(rewards_with([2], n=N - 1)), gate.rollouts_per_prompt(N))
    assert plan.source == [Source.RL] * (N - 1) + [Source.OFFPOLICY]
    assert set(plan.prompt) == {0}
    # released band: the rollouts are dropped and the demonstration is the prompt's only row
    plan = plan_rows(HardSwitchGate(gamma=0, gamma_off=2).route(rewards_with([0, 1, 3])), N)
    assert plan.source == [Source.SFT, Source.OFFPOLICY] + [Source.RL] * N
    assert plan.prompt == [0, 1] + [2] * N and plan.rollout == [-1, -1, *range(N)]
    assert plan.coef == [1.0] * (N + 2)
    # band="join": the rollouts stay and the demonstration joins their group
    plan = plan_rows(HardSwitchGate(gamma=0, gamma_off=2, band="join").route(rewards_with([1])), N)
    assert plan.source == [Source.RL] * N + [Source.OFFPOLICY]


def test_uniform_groups_have_zero_advantage_and_can_be_dropped():
    rewards = rewards_with([0, 8, 4])
    routing = RLGate().route(rewards)
    assert routing.uniform_G.tolist() == [True, True, False]
    plan = plan_rows(routing, N)
    rows = ScoredRows(
        rewards_B=torch.tensor([float(rewards[g, j]) for g, j in zip(plan.prompt, plan.rollout)]),
        group_B=torch.tensor(plan.prompt),
        mask_BT=torch.ones(len(plan), 3),
        source_B=torch.tensor([int(s) for s in plan.source]),
    )
    adv = get_preset("grpo").build().advantages(rows)["rl"]
    group = torch.tensor(plan.prompt)
    assert (adv[group != 2] == 0).all()
    assert (adv[group == 2] != 0).all()
    # DAPO's dynamic-sampling filter removes them
    dropped = plan_rows(routing, N, drop_uniform_groups=True)
    assert set(dropped.prompt) == {2} and len(dropped) == N


def test_soft_gates():
    routing = LinearGate().route(rewards_with([0, 2, 8]))
    assert routing.rl_coef_G.tolist() == [0.0, 0.25, 1.0]
    assert routing.sft_coef_G.tolist() == [1.0, 0.75, 0.0]
    plan = plan_rows(routing, N)
    assert plan.source.count(Source.SFT) == 2 and plan.source.count(Source.RL) == 2 * N
    assert sorted(set(plan.coef)) == [0.25, 0.75, 1.0]

    table = TableGate(alpha=tuple(k / N for k in range(N + 1)), beta=(1.0, 0.5) + (0.0,) * (N - 1))
    table.validate(N)
    routing = table.route(rewards_with([0, 1, 4]))
    assert routing.rl_coef_G.tolist() == [0.0, 0.125, 0.5]
    assert routing.sft_coef_G.tolist() == [1.0, 0.5, 0.0]


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        (HardSwitchGate(gamma=9, unit="count"), "gamma=9 is outside [0, 8] for unit='count' and rollout.n=8"),
        (HardSwitchGate(gamma=1.5, unit="fraction"), "gamma=1.5 is outside [0, 1] for unit='fraction'"),
        (HardSwitchGate(gamma=0, unit="percent"), "unit must be 'count' or 'fraction', got 'percent'"),
        (HardSwitchGate(gamma=2, gamma_off=1), "gamma_off=1 must be >= gamma=2"),
        (HardSwitchGate(gamma_off=2, band="both"), "band must be 'replace' or 'join', got 'both'"),
        (TableGate(alpha=(1.0,), beta=(0.0,)), "alpha needs one entry per number of correct rollouts 0..8"),
        (MixedGate(), None),
    ],
)
def test_gate_validation(gate, message):
    if message is None:
        with pytest.raises(ValueError, match=r"rollout\.n must be >= 2"):
            gate.validate(1)
        return
    with pytest.raises(ValueError) as err:
        gate.validate(N)
    assert message in str(err.value)


def test_registry_errors():
    with pytest.raises(
        ValueError, match=r"unknown gate 'hardd' \(did you mean 'hard'\?\); valid gate names:"
    ):
        GATES.get("hardd")
    with pytest.raises(ValueError, match="duplicate gate registration: 'hard'"):
        GATES.register(HardSwitchGate)
    with pytest.raises(
        ValueError, match="gate 'hard' has no parameter 'gama'; its parameters: band, gamma, gamma_off, unit"
    ):
        GATES.build("hard", gama=1)
