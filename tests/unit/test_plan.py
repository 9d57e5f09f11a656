"""The dry-run planner's numbers: parameter counts against an independently built Hugging Face model,
per-GPU bytes against a hand count, and the FITS / DOES NOT FIT verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpt_megatron.config import load_config
from hpt_megatron.models.arch import arch_config_from_hf
from hpt_megatron.plan import make_plan
from hpt_megatron.plan.memory import (
    GIB,
    activation_bytes,
    count_parameters,
    estimate_memory,
    stage_parameters,
)
from hpt_megatron.plan.text import render_text

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QWEN7B = CONFIGS / "qwen2.5-math-7b_hpt.yaml"


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    """Relative model/data paths must not exist, whatever directory the suite runs from."""
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("name", "published_billions"),
    [("qwen2.5-math-7b", 7.62), ("qwen2.5-math-1.5b", 1.54), ("llama3.1-8b", 8.03)],
)
def test_parameter_count_equals_the_hf_model(name, published_billions):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((CONFIGS / "models" / f"{name}.json").read_text())
    hf = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    expected = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
    counted = count_parameters(arch_config_from_hf(CONFIGS / "models" / f"{name}.json"))
    assert counted == expected
    assert abs(counted / 1e9 - published_billions) < 0.01


def test_qwen7b_per_gpu_bytes_by_hand():
    cfg = load_config(QWEN7B, ["parallel.tp=4", "optim.distributed=false"])  # the replicated layout
    assert (cfg.parallel.tp, cfg.parallel.pp) == (4, 1)
    # Qwen2.5-Math-7B: h 3584, 28 layers, 28 heads of 128, 4 kv heads, ffn 18944, vocab 152064, untied.
    h, layers, q, kv, f, vocab, tp = 3584, 28, 28 * 128, 4 * 128, 18944, 152064, 4
    split = h * (q + 2 * kv) + (q + 2 * kv) + q * h + 3 * h * f  # qkv (+bias), o_proj, gate/up/down
    per_gpu = layers * (split // tp + 2 * h) + 2 * (vocab // tp) * h + h  # embedding + output shards, norm
    assert per_gpu == 1_904_057_344
    memory = estimate_memory(cfg, cfg.model.arch(), 80)
    (stage,) = memory.stages
    assert stage.params == per_gpu
    assert (stage.weights, stage.grads, stage.optimizer) == (2 * per_gpu, 4 * per_gpu, 12 * per_gpu)
    assert stage.resident == 18 * per_gpu  # ~31.9 GiB: bf16 + fp32 grads + Adam + fp32 master
    # the distributed optimizer would keep 1/DP of the 12 bytes
    assert memory.distributed_optimizer_saving == 12 * per_gpu - 12 * per_gpu // 2
    # colocated vLLM: 0.45 x 80 GiB, of which a full bf16 replica of the 7.6e9 weights
    assert memory.rollout == int(0.45 * 80 * GIB)
    assert memory.kv_cache == memory.rollout - 2 * 7_615_616_512


def test_distributed_optimizer_shards_adam_and_master_weights_by_hand():
    """optim.distributed at TP 2 x DP 4: Adam moments + fp32 master (12 B) over the 4 DP ranks, the
    fp32 grad buffer (4 B) and bf16 weights whole; the PPO critic keeps its replicated optimizer."""
    h, layers, q, kv, f, vocab, tp, dp = 3584, 28, 28 * 128, 4 * 128, 18944, 152064, 2, 4
    split = h * (q + 2 * kv) + (q + 2 * kv) + q * h + 3 * h * f
    per_gpu = layers * (split // tp + 2 * h) + 2 * (vocab // tp) * h + h
    replicated = load_config(QWEN7B, ["optim.distributed=false"])
    sharded = load_config(QWEN7B)  # the recipe: TP 2 with the distributed optimizer
    assert sharded.dp == dp
    (rep,) = estimate_memory(replicated, replicated.model.arch(), 80).stages
    memory = estimate_memory(sharded, sharded.model.arch(), 80)
    (stage,) = memory.stages
    assert stage.params == rep.params == per_gpu
    assert (stage.weights, stage.grads) == (2 * per_gpu, 4 * per_gpu)
    assert stage.optimizer == -(-per_gpu // dp) * 12 and rep.optimizer == 12 * per_gpu
    assert memory.distributed_optimizer_saving == rep.optimizer - stage.optimizer
    # at TP 2 the replicated optimizer does not fit 80 GB; the distributed one does
    assert not make_plan(replicated, 80).fits
    plan = make_plan(sharded, 80)
    assert plan.fits
    assert "distributed optimizer: 1/4 of them per GPU" in render_text(plan, sharded)
    ppo = ["parallel.tp=2", "optim.distributed=true", "algo={preset: ppo}"]
    critic = load_config(QWEN7B, ppo)
    (with_critic,) = estimate_memory(critic, critic.model.arch(), 80).stages
    value_params = per_gpu - (vocab // tp) * h + h + 1  # no output layer, a scalar head
    assert with_critic.critic == value_params * (2 + 4 + 12)


def test_stages_and_tensor_ranks_add_up_to_the_model():
    arch = load_config(QWEN7B).model.arch()
    assert stage_parameters(arch, tp=1, pp=1, stage=0) == count_parameters(arch)  # vocab needs no padding
    pp4 = [stage_parameters(arch, tp=1, pp=4, stage=s) for s in range(4)]
    assert sum(pp4) == count_parameters(arch)
    assert pp4[1] == pp4[2] < pp4[0]  # middle stages have no embedding / output layer


def test_activation_scaling():
    arch = load_config(QWEN7B).model.arch()
    common = dict(arch=arch, tp=4, act_bytes=2, sequence_parallel=False, flash=True, longest=9216)
    off = activation_bytes(tokens=32768, layers=28, in_flight=1, recompute=False, **common)
    assert activation_bytes(tokens=65536, layers=28, in_flight=1, recompute=False, **common) == 2 * off
    # pipeline stage 0 of 2 keeps 2 micro-batches of 14 layers: as much as 28 layers of one
    assert activation_bytes(tokens=32768, layers=14, in_flight=2, recompute=False, **common) == off
    on = activation_bytes(tokens=32768, layers=28, in_flight=1, recompute=True, **common)
    assert on < off / 4
    # with recompute, each layer keeps only its bf16 input [T, h]
    assert on > 28 * 32768 * 3584 * 2
    one = dict(tokens=32768, layers=28, in_flight=1, recompute=False)
    assert activation_bytes(**one, **{**common, "sequence_parallel": True}) < off
    local = activation_bytes(**one, **{**common, "flash": False})
    assert local - off >= 28 * 3 * 9216**2 * (28 // 4) * 2  # 3 full rows of bf16 probabilities per layer


def test_does_not_fit_names_the_key_and_every_fix_fits():
    cfg = load_config(QWEN7B, ["parallel.tp=1"])
    plan = make_plan(cfg, gpu_mem_gb=80)
    assert not plan.fits
    assert plan.verdict.startswith("DOES NOT FIT") and "parallel.tp" in plan.verdict
    assert "parallel.tp=2" in plan.fixes  # the recipe's layout (with its distributed optimizer)
    for fix in plan.fixes:
        assert make_plan(load_config(QWEN7B, ["parallel.tp=1", fix]), gpu_mem_gb=80).fits, fix


def test_kv_cache_too_small_names_gpu_memory_utilization():
    plan = make_plan(load_config(QWEN7B, ["rollout.gpu_memory_utilization=0.18"]))
    assert not plan.fits and "rollout.gpu_memory_utilization" in plan.verdict


def test_context_shorter_than_the_rows_is_a_warning():
    plan = make_plan(load_config(QWEN7B, ["model.max_position_embeddings=4096"]))
    assert any("model.max_position_embeddings" in w and "9216" in w for w in plan.warnings)


def test_downloaded_checkpoint_wins_and_the_rope_overrides_reach_vllm(tmp_path):
    ckpt = tmp_path / "checkpoints" / "Qwen2.5-Math-7B"
    ckpt.mkdir(parents=True)
    raw = json.loads((CONFIGS / "models" / "qwen2.5-math-7b.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 4}))
    cfg = load_config(QWEN7B)
    assert cfg.model.config_json() == Path("checkpoints/Qwen2.5-Math-7B/config.json")
    plan = make_plan(cfg)
    assert plan.arch.num_layers == 4 and plan.weights_on_disk
    assert plan.arch.rope_theta == 40000  # the recipe's override over the file's 10000
    # vLLM reads the file itself: the worker hands it the actor's values
    from hpt_megatron.cluster.worker import vllm_config_overrides

    over = vllm_config_overrides(cfg, plan.arch.hf_config)
    assert over["rope_theta"] == 40000 and over["max_position_embeddings"] == 16384
    assert raw["rope_theta"] == 10000 and raw["max_position_embeddings"] == 4096
