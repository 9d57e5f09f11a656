"""FLOPs formula against hand arithmetic; NVTX no-ops on CPU; metric sinks, profiler window, plots."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hpt_megatron.observability.flops import DecoderShape, forward_flops_per_token, mfu, sequence_train_flops
from hpt_megatron.observability.metrics import MetricsLogger, read_jsonl, truncate_jsonl
from hpt_megatron.observability.plots import plot_metrics
from hpt_megatron.observability.timing import ProfileWindow, StageTimer, nvtx_range

LLAMA3_8B = DecoderShape(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256)


def test_flops_llama3_8b_by_hand():
    # per layer, per token: q 2*4096*4096 = 33,554,432; k+v 4*4096*1024 = 16,777,216;
    # o 2*4096*4096 = 33,554,432; mlp 6*4096*14336 = 352,321,536  -> 436,207,616 without attention
    # attention over c = 1024 keys: 4*32*128*1024 = 16,777,216  -> 452,984,832 per layer
    # 32 layers = 14,495,514,624; output layer 2*4096*128256 = 1,050,673,152 -> 15,546,187,776
    assert forward_flops_per_token(LLAMA3_8B, 1024) == 15_546_187_776
    # a 2048-token causal sequence averages c = 1024.5 keys; training = 3x forward
    per_token = 15_546_187_776 + 32 * 4 * 32 * 128 * 0.5
    assert sequence_train_flops(LLAMA3_8B, 2048) == pytest.approx(3 * 2048 * per_token, rel=1e-15)
    # 8 such sequences in 1 s on a 989 TFLOP/s device
    assert mfu(LLAMA3_8B, [2048] * 8, 1.0, 989e12) == pytest.approx(8 * 3 * 2048 * per_token / 989e12)


def test_trainer_flops_metrics_per_device(tmp_path):
    """The trainer's MFU: training FLOPs of the rows it updated on, per device, over the update time."""
    import json
    from types import SimpleNamespace

    from hpt_megatron.models import arch_config_from_hf
    from hpt_megatron.trainer import actor_flops_metrics

    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 8192,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf))
    shape = DecoderShape.from_arch(arch_config_from_hf(str(tmp_path / "config.json")))
    assert shape == DecoderShape(**{**vars(LLAMA3_8B), "head_dim": 128})
    cfg = SimpleNamespace(trainer=SimpleNamespace(ppo_epochs=2), cluster=SimpleNamespace(world_size=8))
    run = SimpleNamespace(cfg=cfg, flops_shape=shape, peak_flops=989e12)
    per_token = 15_546_187_776 + 32 * 4 * 32 * 128 * 0.5  # as in the test above, c = 1024.5
    # 8 rows of 2048 tokens, 2 epochs, 2 s, 8 devices: each device did 2 epochs of one row per 2 s
    m = actor_flops_metrics(run, [2048] * 8, 2.0)
    assert m["perf/actor_tflops_per_device"] == pytest.approx(3 * 2048 * per_token / 1e12)
    assert m["perf/mfu"] == pytest.approx(3 * 2048 * per_token / 989e12)
    assert "perf/mfu" not in actor_flops_metrics(
        SimpleNamespace(**{**vars(run), "peak_flops": None}), [8], 1.0
    )


def test_peak_memory_on_cpu_is_the_process_rss():
    from hpt_megatron.observability.timing import peak_memory_gib

    before = peak_memory_gib("cpu")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = peak_memory_gib("cpu")
    assert after >= before and after * 2**30 >= block.numel() * 4


def test_head_dim_override():
    shape = DecoderShape(hidden=64, layers=1, heads=4, kv_heads=2, ffn=128, vocab=10, head_dim=32)
    # q 2*64*128, kv 4*64*64, o 2*128*64, attn 4*4*32*1, mlp 6*64*128, head 2*64*10
    assert forward_flops_per_token(shape, 1) == 16384 + 16384 + 16384 + 512 + 49152 + 1280


def test_nvtx_is_a_noop_without_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")

    def boom(*_):
        raise AssertionError("NVTX must not be called without CUDA")

    monkeypatch.setattr(torch.cuda.nvtx, "range_push", boom)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", boom)
    timer = StageTimer(nvtx=True)
    with timer.stage("rollout"), nvtx_range("inner"):
        sum(range(1000))
    with timer.stage("rollout"):
        pass
    assert set(timer.metrics()) == {"perf/time/rollout"} and timer.metrics()["perf/time/rollout"] > 0


def test_torch_profiler_window_writes_a_trace_on_cpu(tmp_path):
    window = ProfileWindow((2, 3), rank=0, ranks=[0], torch_profiler=True, trace_dir=str(tmp_path))
    paths = []
    for step in range(1, 5):
        window.step_begin(step)
        torch.randn(64, 64) @ torch.randn(64, 64)
        paths.append(window.step_end(step))
    assert paths[0] is None and paths[1] is None and paths[3] is None
    assert paths[2] is not None and paths[2].stat().st_size > 0
    assert ProfileWindow((2, 3), rank=1, ranks=[0], torch_profiler=True).step_end(3) is None


def test_metrics_logger_and_resume_truncation(tmp_path):
    sink = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 4):
        sink.log(step, {"loss/total": 1.0 / step, "perf/bad": math.nan}, {"hpt/gate_P": [0.0, 0.5]})
    sink.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and records[1]["loss/total"] == 0.5
    assert records[0]["perf/bad"] is None  # NaN is written as null, keeping the file valid JSON
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    truncate_jsonl(tmp_path / "metrics.jsonl", 2)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_plot(tmp_path):
    records = [{"step": s, "rollout/accuracy": s / 10, "hpt/sft_fraction": 1 - s / 10} for s in range(10)]
    path = plot_metrics(records, tmp_path / "curves.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics([{"step": 1}], tmp_path / "none.png") is None


def test_nsight_runtime_env_only_for_profiled_ranks(tmp_path):
    from hpt_megatron.cluster.ray_cluster import nsight_runtime_env
    from hpt_megatron.config import load_config

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
    cfg = load_config(tiny, ["profile.steps=[3,4]", "profile.ranks=[1]"])
    env = nsight_runtime_env(cfg, 1, tmp_path)["nsight"]
    # capture only between the worker's cudaProfilerStart/Stop, into the run directory
    assert env["capture-range"] == "cudaProfilerApi" and env["capture-range-end"] == "stop"
    assert env["o"] == str(tmp_path / "nsys" / "worker_1") and "nvtx" in env["t"].split(",")
    assert nsight_runtime_env(cfg, 0, tmp_path) is None  # not a profiled rank
    assert nsight_runtime_env(load_config(tiny, ["profile.ranks=[1]"]), 1, tmp_path) is None  # no window
    torch_prof = load_config(
        tiny, ["profile.steps=[3,4]", "profile.ranks=[1]", "profile.torch_profiler=true"]
    )
    assert nsight_runtime_env(torch_prof, 1, tmp_path) is None  # torch.profiler instead of nsys


def test_mean_metrics_over_updates():
    from hpt_megatron.algo import mean_metrics

    parts = [
        {"loss/total": 1.0, "actor/ratio_max": 1.5},
        {"loss/total": 3.0, "actor/ratio_max": 1.2, "only": 4.0},
    ]
    assert mean_metrics(parts) == {"loss/total": 2.0, "actor/ratio_max": 1.5, "only": 4.0}
