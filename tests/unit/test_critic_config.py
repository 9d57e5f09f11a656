"""The ``critic`` config block, the PPO recipe and the memory planner's critic."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hpt_megatron.config import load_config
from hpt_megatron.config.io import ConfigError
from hpt_megatron.plan.memory import critic_stage_parameters, estimate_memory, stage_parameters

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = CONFIGS / "tiny_cpu.yaml"
PPO_RECIPE = CONFIGS / "baselines" / "tiny_cpu_ppo.yaml"
SFT_RECIPE = CONFIGS / "baselines" / "tiny_cpu_sft.yaml"


PHASES = "trainer.phases=[{steps: 2, algo: {preset: sft}}, {steps: 2, algo: {preset: ppo}}]"


def test_ppo_builds_a_critic_without_a_critic_block():
    assert load_config(TINY, ["algo={preset: ppo}"]).critic_enabled
    assert load_config(TINY, [PHASES]).critic_enabled  # SFT -> PPO in one run
    assert not load_config(TINY, ["algo={preset: grpo}"]).critic_enabled
    cfg = load_config(PPO_RECIPE)
    assert cfg.critic_enabled and cfg.algo.preset == "ppo" and cfg.critic.warmup_steps > 0
    assert load_config(SFT_RECIPE).algo.preset == "sft"


def test_ppo_with_the_critic_switched_off_names_the_key_and_the_fix():
    with pytest.raises(
        ConfigError, match=r"critic\.enabled=false.*algo uses the 'gae' advantage.*remove critic"
    ):
        load_config(TINY, ["algo={preset: ppo}", "critic.enabled=false"])
    with pytest.raises(ConfigError, match=r"trainer\.phases\[1\]\.algo"):
        load_config(TINY, [PHASES, "critic.enabled=false"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("critic.lr=0", "critic.lr"),
        ("critic.clip=-0.1", "critic.clip"),
        ("critic.warmup_steps=-1", "critic.warmup_steps"),
        ("critic.init=/no/such/dir", "critic.init"),
        ("critic.bogus=1", "bogus"),
    ],
)
def test_bad_critic_settings_fail_at_load_time(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, ["algo={preset: ppo}", override])


def test_enabling_a_critic_no_algorithm_uses_warns():
    with pytest.warns(UserWarning, match="critic.enabled=true has no effect"):
        load_config(TINY, ["algo={preset: grpo}", "critic.enabled=true"])


def test_critic_lr_defaults_to_the_actor_lr():
    from hpt_megatron.train.critic import critic_optim

    cfg = load_config(TINY, ["algo={preset: ppo}"])
    assert critic_optim(cfg) == cfg.optim
    cfg = load_config(TINY, ["algo={preset: ppo}", "critic.lr=6e-3"])
    opt = critic_optim(cfg)
    assert opt.lr == 6e-3 and opt.min_lr == pytest.approx(cfg.optim.min_lr * 2)
    assert dataclasses.replace(opt, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr) == cfg.optim


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_critic_parameters_per_stage(tp, pp):
    """The actor's stage minus its LM head (and the tied copy on the last stage), plus the head."""
    arch = load_config(TINY).model.arch()
    vocab_shard = arch.padded_vocab_size(tp) // tp * arch.hidden_size
    h = arch.hidden_size
    for s in range(pp):
        actor = stage_parameters(arch, tp, pp, s)
        last = s == pp - 1
        # tied model: pp = 1 holds the embedding once; pp > 1 keeps a copy on the last stage
        lm_head = vocab_shard if last and pp > 1 else 0
        assert critic_stage_parameters(arch, tp, pp, s) == actor - lm_head + ((h + 1) if last else 0)


def test_planner_counts_the_critic_as_resident_memory():
    ppo = load_config(TINY, ["algo={preset: ppo}", "cluster.device=cuda"])
    grpo = load_config(TINY, ["algo={preset: grpo}", "cluster.device=cuda"])
    arch = ppo.model.arch()
    with_critic, without = estimate_memory(ppo, arch, 80), estimate_memory(grpo, arch, 80)
    stage = with_critic.stages[0]
    # bf16 weights (2) + fp32 grads (4) + Adam moments (8) + fp32 master (4) per critic parameter
    assert stage.critic == critic_stage_parameters(arch, 1, 1, 0) * 18
    assert with_critic.generation_peak - without.generation_peak == stage.critic
    assert without.stages[0].critic == 0
