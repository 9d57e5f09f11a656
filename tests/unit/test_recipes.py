"""Every recipe in configs/ loads and passes the dry run through the real CLI, and the paper's
recipes carry the official scripts' settings (numbers restated here from the paper and its code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpt_megatron.algo.gate import HardSwitchGate
from hpt_megatron.cli import train_main
from hpt_megatron.config import load_config
from hpt_megatron.config.io import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
PAPER = [p for p in RECIPES if p.name != "tiny_cpu.yaml"]


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    """No downloaded weights or data: the dry run must work from configs/models/*.json alone."""
    monkeypatch.chdir(tmp_path)


def recipe(name: str, overrides=()):
    return load_config(CONFIGS / name, list(overrides))


def test_the_paper_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {
        "qwen2.5-math-7b_hpt.yaml",
        "qwen2.5-math-1.5b_hpt.yaml",
        "llama3.1-8b_hpt.yaml",
        "qwen2.5-math-7b_sft.yaml",
        "qwen2.5-math-7b_grpo.yaml",
        "qwen2.5-math-7b_sft_then_grpo.yaml",
        "qwen2.5-math-7b_luffy.yaml",
        "qwen2.5-math-7b_srft.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_passes_the_dry_run(path, capsys):
    assert train_main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layout" in out and "memory" in out
    assert "\nFITS: peak" in out


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_recipes_fit_8_gpus_of_80_gb(path, capsys):
    assert train_main([str(path), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["layout"]["world_size"] == 8
    assert plan["memory"]["peak"] <= 80 * 2**30
    assert not plan["model"]["weights_on_disk"]


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_shared_official_settings(path):
    cfg = load_config(path)
    assert (cfg.cluster.num_nodes, cfg.cluster.devices_per_node) == (1, 8)
    assert cfg.rollout.engine == "vllm" and cfg.cluster.colocate
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p) == (8, 1.0, 1.0)
    d, t, o = cfg.data, cfg.trainer, cfg.optim
    assert (d.max_prompt_len, d.max_response_len, cfg.rollout.max_new_tokens) == (1024, 8192, 8192)
    assert (t.prompts_per_step, t.mini_batch_prompts, t.ppo_epochs, t.micro_batch_tokens) == (
        128,
        64,
        1,
        32768,
    )
    assert (o.schedule, o.warmup_steps, o.betas) == ("constant", 0, (0.9, 0.999))
    assert (o.weight_decay, o.grad_clip) == (0.01, 1.0)
    assert cfg.model.dtype in ("auto", "bf16") and cfg.cluster.device == "cuda"
    assert cfg.model.recompute_activations
    assert (cfg.eval.temperature, cfg.eval.top_p) == (0.6, 0.95)
    assert cfg.data.train_files == ["data/openr1.parquet"] and cfg.data.val_files == ["data/valid.parquet"]
    for algo in [p.algo for p in cfg.trainer.phases] or [cfg.algo]:
        if algo.preset != "sft":
            assert algo.entropy_coef == 0.001 and algo.kl.coef == 0
    if not cfg.trainer.phases and cfg.algo.preset != "sft":
        assert cfg.trainer.total_steps == 500


def test_qwen7b_hpt():
    cfg = recipe("qwen2.5-math-7b_hpt.yaml")
    assert cfg.algo.preset == "hpt_official"
    assert cfg.algo.gate == HardSwitchGate(gamma=0, unit="count")
    assert cfg.algo.terms["sft"].coef == 1.0
    assert cfg.optim.lr == 5e-6 and cfg.optim.skip_grad_norm_above == 80
    assert (cfg.model.rope_theta, cfg.model.max_position_embeddings) == (40000, 16384)
    arch = cfg.model.arch()
    assert (arch.rope_theta, arch.max_position_embeddings) == (40000, 16384)
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads) == (3584, 28, 28, 4)
    assert (arch.ffn_hidden_size, arch.vocab_size, arch.tie_embeddings) == (18944, 152064, False)
    assert cfg.model.path == "checkpoints/Qwen2.5-Math-7B" and cfg.model.hub_id == "Qwen/Qwen2.5-Math-7B"


def test_qwen15b_hpt():
    cfg = recipe("qwen2.5-math-1.5b_hpt.yaml")
    assert cfg.algo.preset == "hpt_official" and cfg.algo.gate == HardSwitchGate(gamma=0, unit="count")
    assert cfg.algo.terms["sft"].coef == 0.3
    assert cfg.optim.lr == 5e-6
    arch = cfg.model.arch()
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads) == (1536, 28, 12, 2)
    assert (arch.ffn_hidden_size, arch.vocab_size, arch.tie_embeddings) == (8960, 151936, True)
    assert (cfg.parallel.tp, cfg.dp) == (1, 8)


def test_llama_hpt():
    cfg = recipe("llama3.1-8b_hpt.yaml")
    assert cfg.algo.preset == "hpt_official" and cfg.algo.gate == HardSwitchGate(gamma=2, unit="count")
    assert cfg.data.template == "llama_base"
    assert cfg.optim.lr == 5e-6 and cfg.optim.skip_grad_norm_above is None  # only the Qwen script skips
    arch = cfg.model.arch()
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads) == (4096, 32, 32, 8)
    assert (arch.ffn_hidden_size, arch.vocab_size, arch.rope_theta) == (14336, 128256, 500000)
    assert arch.max_position_embeddings == 131072
    assert arch.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


@pytest.mark.parametrize(
    ("name", "preset", "lr"),
    [
        ("qwen2.5-math-7b_sft.yaml", "sft", 5e-6),
        ("qwen2.5-math-7b_grpo.yaml", "grpo", 5e-6),
        ("qwen2.5-math-7b_luffy.yaml", "luffy", 1e-6),
        ("qwen2.5-math-7b_srft.yaml", "srft", 1e-6),
    ],
)
def test_qwen7b_baselines(name, preset, lr):
    cfg = recipe(name)
    assert cfg.algo.preset == preset and cfg.optim.lr == lr
    assert cfg.model.arch().rope_theta == 40000 and cfg.parallel.tp == 2 and cfg.optim.distributed
    assert cfg.optim.skip_grad_norm_above is None  # the skip belongs to the HPT script


def test_sft_then_grpo_has_two_phases():
    cfg = recipe("qwen2.5-math-7b_sft_then_grpo.yaml")
    assert [(p.name, p.algo.preset) for p in cfg.trainer.phases] == [("sft", "sft"), ("grpo", "grpo")]
    assert cfg.trainer.phases[1].steps == 500


def test_tp_not_dividing_the_heads_fails_at_load_naming_the_key(capsys):
    with pytest.raises(ConfigError, match=r"num_attention_heads=28 is not divisible by parallel\.tp=8"):
        recipe("qwen2.5-math-7b_hpt.yaml", ["parallel.tp=8"])
    assert train_main([str(CONFIGS / "qwen2.5-math-7b_hpt.yaml"), "parallel.tp=8", "--dry-run"]) == 2
    assert "parallel.tp" in capsys.readouterr().err


def test_layout_that_cannot_fit_exits_1_naming_the_key(capsys):
    argv = [str(CONFIGS / "qwen2.5-math-7b_hpt.yaml"), "parallel.tp=1", "--dry-run", "--gpu-mem-gb", "40"]
    assert train_main(argv) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "parallel.tp" in out


def test_training_without_the_weights_says_how_to_download_them():
    from hpt_megatron.run_setup import require_checkpoint

    with pytest.raises(ValueError) as err:
        require_checkpoint(recipe("qwen2.5-math-7b_hpt.yaml"))
    message = str(err.value)
    assert "model.path='checkpoints/Qwen2.5-Math-7B'" in message
    assert "huggingface-cli download Qwen/Qwen2.5-Math-7B --local-dir checkpoints/Qwen2.5-Math-7B" in message
