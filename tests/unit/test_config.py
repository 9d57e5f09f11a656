"""Config loading: YAML + dotted overrides, presets, and the exact error messages users see."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from hpt_megatron.algo.gate import HardSwitchGate
from hpt_megatron.algo.masks import CISPO, PPOClip
from hpt_megatron.config import Config, config_from_dict, load_config
from hpt_megatron.config.io import ConfigError

QWEN_LIKE = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "intermediate_size": 128,
    "vocab_size": 300,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128,
}


@pytest.fixture
def recipe(tmp_path: Path):
    (tmp_path / "model.json").write_text(json.dumps(QWEN_LIKE))

    def write(body: str) -> Path:
        path = tmp_path / "recipe.yaml"
        path.write_text("model:\n  hf_config: model.json\n" + body)
        return path

    return write


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    return str(err.value)


def test_defaults_are_the_hpt_preset(recipe):
    cfg = load_config(recipe(""))
    assert cfg.algo.preset == "hpt"
    assert cfg.algo.gate == HardSwitchGate(gamma=0, unit="count")
    assert set(cfg.algo.terms) == {"rl", "sft"}
    assert cfg.model.hf_config.endswith("model.json") and Path(cfg.model.hf_config).is_file()
    assert cfg.dp == 1


def test_dotted_overrides_and_types(recipe):
    cfg = load_config(
        recipe("optim:\n  lr: 5e-6\n"),  # YAML reads 5e-6 as a string; float fields accept it
        ["algo.gate.gamma=2", "rollout.n=4", "algo.terms.rl.mask.eps_high=0.28", "data.train_files=[a, b]"],
    )
    assert cfg.optim.lr == 5e-6
    assert cfg.algo.gate == HardSwitchGate(gamma=2.0, unit="count")
    assert cfg.algo.terms["rl"].mask == PPOClip(eps_low=0.2, eps_high=0.28)
    assert cfg.rollout.n == 4 and cfg.data.train_files == ["a", "b"]


def test_preset_merge_and_component_replacement(recipe):
    cfg = load_config(
        recipe("algo:\n  preset: dapo\n  terms:\n    rl:\n      mask: {name: cispo, eps_high: 4.0}\n")
    )
    assert cfg.algo.preset == "dapo"
    assert cfg.algo.drop_uniform_groups  # kept from the preset
    assert cfg.algo.terms["rl"].mask == CISPO(eps_low=None, eps_high=4.0)  # replaced, not merged


def test_preset_overrides_outside_algo_and_recipe_wins(recipe):
    assert load_config(recipe("algo: {preset: hpt_official}\n")).optim.skip_grad_norm_above == 80.0
    cfg = load_config(recipe("algo: {preset: hpt_official}\noptim: {skip_grad_norm_above: 50}\n"))
    assert cfg.optim.skip_grad_norm_above == 50.0


def test_terms_can_be_removed_and_added(recipe):
    body = "algo:\n  preset: luffy\n  terms:\n    offpolicy: null\n"
    msg = error_of(recipe(body))
    assert msg.endswith(
        "algo.gate 'mixed' produces 'offpolicy' rows but no entry of algo.terms covers source 'offpolicy'; "
        "add it to some term's sources"
    )


def test_phases_resolve_their_own_presets(recipe):
    cfg = load_config(
        recipe(
            "trainer:\n  phases:\n    - {name: sft, steps: 3, algo: {preset: sft}}\n"
            "    - {name: rl, steps: 5, algo: {preset: grpo}}\n"
        )
    )
    assert [p.algo.preset for p in cfg.trainer.phases] == ["sft", "grpo"]
    assert cfg.trainer.phases[0].algo.gate.name == "sft"


def test_round_trip_through_yaml(recipe, tmp_path):
    cfg = load_config(recipe("algo: {preset: srft}\n"), ["parallel.tp=2", "cluster.devices_per_node=2"])
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_config(dumped)
    assert again == cfg


def test_extends(recipe, tmp_path):
    base = recipe("optim: {lr: 1.0e-6}\nrollout: {n: 4}\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {base.name}\nrollout: {{n: 6}}\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 1e-6 and cfg.rollout.n == 6


# ---- the messages users see ----------------------------------------------------------------------


def test_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hf_config: x\n   bad_indent: 1\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}: invalid YAML at line 3, column")


def test_boolean_keys_are_rejected(recipe):
    path = recipe("algo:\n  terms:\n    off: null\n")
    assert error_of(path) == (
        f"{path}: a key under 'algo.terms' was read as the bool False (YAML reads unquoted "
        "on/off/yes/no/true/false as booleans); quote the key"
    )


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"config file {str(tmp_path / 'nope.yaml')!r} does not exist"


def test_unknown_key_suggests_the_closest(recipe):
    path = recipe("algo:\n  gate:\n    gama: 2\n")
    assert error_of(path) == (
        f"{path}: unknown key 'algo.gate.gama' (did you mean 'algo.gate.gamma'?); "
        "valid keys under 'algo.gate': band, gamma, gamma_off, unit"
    )
    assert error_of(recipe(""), ["optim.learning_rate=1"]) == (
        f"{path}: unknown key 'optim.learning_rate'; valid keys under 'optim': "
        "betas, distributed, eps, grad_clip, lr, min_lr, schedule, skip_grad_norm_above, warmup_steps, weight_decay"
    )
    msg = error_of(recipe("trainr: {}\n"))
    assert msg == (
        f"{path}: unknown key 'trainr' (did you mean 'trainer'?); valid keys under '<top level>': "
        "algo, cluster, critic, data, eval, logging, model, optim, parallel, profile, reward, rollout, trainer"
    )


def test_a_leftover_gate_key_after_a_preset_change_names_the_fix():
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
    assert error_of(str(tiny), ["algo.preset=grpo"]) == (
        f"{tiny}: unknown key 'algo.gate.gamma': 'algo.gate' takes no keys; to switch algorithm replace "
        "the whole block, e.g. 'algo={preset: grpo}'"
    )


def test_wrong_types(recipe):
    path = recipe("rollout:\n  n: eight\n")
    assert error_of(path) == f"{path}: rollout.n: expected int, got str 'eight'"
    assert (
        error_of(path, ["rollout.n=8", "data.shuffle=3"]) == f"{path}: data.shuffle: expected bool, got int 3"
    )
    assert error_of(path, ["rollout.n=8", "data.template=llama"]) == (
        f"{path}: data.template: 'llama' is not allowed (did you mean 'llama_base'?); "
        "choose one of 'tokenizer', 'llama_base', 'raw'"
    )
    assert error_of(path, ["rollout.n=8", "algo.terms.rl.mask.name=ppo_clipp"]).startswith(
        f"{path}: algo.terms.rl.mask.name: unknown mask 'ppo_clipp' (did you mean 'ppo_clip'?); valid mask names:"
    )
    assert error_of(path, ["rollout.n=8", "algo.preset=hptt"]).startswith(
        f"{path}: algo.preset: unknown algo.preset 'hptt' (did you mean 'hpt'?); valid presets: sft, reinforce"
    )


def test_impossible_combinations(recipe):
    path = recipe("")
    model = Path(path).parent / "model.json"
    assert error_of(path, ["parallel.tp=3", "cluster.devices_per_node=3"]) == (
        f"{path}: num_attention_heads=4 is not divisible by parallel.tp=3; choose parallel.tp in [1, 2, 4] "
        f"(model: {model})"
    )
    assert error_of(path, ["parallel.tp=4", "cluster.devices_per_node=4"]) == (
        f"{path}: num_key_value_heads=2 is not divisible by parallel.tp=4; choose parallel.tp in [1, 2] "
        f"(model: {model})"
    )
    assert error_of(path, ["parallel.pp=3", "cluster.devices_per_node=3"]) == (
        f"{path}: num_hidden_layers=4 is not divisible by parallel.pp=3; choose parallel.pp in [1, 2, 4] "
        f"(model: {model})"
    )
    assert error_of(path, ["parallel.tp=2"]) == (
        f"{path}: parallel.tp * parallel.pp = 2 does not divide the world size 1 "
        "(cluster.num_nodes x cluster.devices_per_node); change one of them"
    )
    assert error_of(path, ["algo.gate.gamma=9"]) == (
        f"{path}: algo.gate: gate 'hard': gamma=9.0 is outside [0, 8] for unit='count' and rollout.n=8"
    )
    assert error_of(path, ["algo.gate.unit=fraction", "algo.gate.gamma=2"]) == (
        f"{path}: algo.gate: gate 'hard': gamma=2.0 is outside [0, 1] for unit='fraction' and rollout.n=8"
    )
    assert error_of(path, ["trainer.mini_batch_prompts=48"]) == (
        f"{path}: trainer.mini_batch_prompts=48 must divide trainer.prompts_per_step=128"
    )
    assert error_of(path, ["algo.terms.sft.advantage=grpo"]) == (
        f"{path}: algo.terms.sft.advantage is 'grpo', but SFT rows carry no reward; "
        "use advantage {name: constant} for a term that covers source 'sft'"
    )
    sp = ["parallel.tp=2", "cluster.devices_per_node=2", "parallel.sequence_parallel=true"]
    assert error_of(path, [*sp, "model.layer_spec=local"]) == (
        f"{path}: parallel.sequence_parallel needs Transformer Engine layers, but model.layer_spec='local' "
        "uses Megatron's torch norms, which cannot split the sequence; set model.layer_spec=te (or auto with "
        "Transformer Engine installed)"
    )

    assert error_of(path, ["rollout.async_staleness=-1"]) == (
        f"{path}: rollout.async_staleness must be >= 0 (0: synchronous rollouts), got -1"
    )
    assert error_of(path, ["rollout.async_staleness=1", "rollout.engine=vllm"]).startswith(
        f"{path}: rollout.async_staleness > 0 needs rollout.engine=hf for now"
    )
    assert "rollout.async_pi_old" in error_of(path, ["rollout.async_pi_old=proximal"])


def test_unsupported_architecture(recipe, tmp_path):
    path = recipe("")
    (tmp_path / "model.json").write_text(json.dumps(dict(QWEN_LIKE, architectures=["GPT2LMHeadModel"])))
    msg = error_of(path)
    assert (
        msg.startswith(f"{path}: model.hf_config: ")
        and "GPT2LMHeadModel" in msg
        and "Qwen2ForCausalLM" in msg
    )


def test_model_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim: {lr: 1.0e-5}\n")
    assert error_of(path) == (
        f"{path}: model.path or model.hf_config must be set (a Hugging Face checkpoint or its config.json)"
    )
    path.write_text("model: {hf_config: missing.json}\n")
    assert error_of(path) == f"{path}: model.hf_config: 'missing.json' does not exist"


def test_component_errors_name_the_parameter(recipe):
    path = recipe("algo:\n  terms:\n    rl:\n      mask: {name: ppo_clip, eps: 0.3}\n")
    assert error_of(path) == (
        f"{path}: unknown key 'algo.terms.rl.mask.eps' (did you mean 'algo.terms.rl.mask.eps_low'?); "
        "valid keys under 'algo.terms.rl.mask': dual_clip, eps_high, eps_low"
    )
    path = recipe("algo:\n  terms:\n    rl:\n      mask: {name: ppo_clip, dual_clip: 0.5}\n")
    assert error_of(path) == f"{path}: algo.terms.rl.mask: ppo_clip: dual_clip must be > 1 (or null), got 0.5"


def test_override_syntax_error(recipe):
    assert error_of(recipe(""), ["algo.gate.gamma"]) == (
        "override 'algo.gate.gamma' must look like key.path=value, e.g. algo.gate.gamma=2"
    )


def test_config_from_dict_without_files():
    cfg = config_from_dict({"rollout": {"n": 4}})
    assert isinstance(cfg, Config) and cfg.rollout.n == 4
    assert re.fullmatch(r"hpt", cfg.algo.preset)
