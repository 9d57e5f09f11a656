"""Ray: TP=2 on two colocated workers trains like TP=1 in-process, and a dead worker stops the driver
at once with its rank and log (never a hang)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.e2e.runs import ROOT, hpt_train, metrics

pytestmark = pytest.mark.e2e

KEYS = (
    "rollout/accuracy",
    "hpt/sft_fraction",
    "loss/total",
    "loss/sft",
    "actor/grad_norm",
    "actor/entropy",
    "rollout/generated_tokens",
)


@pytest.fixture(scope="module")
def hf_start(tmp_path_factory):
    """A random tiny checkpoint (tiny_cpu's shape) with the task's tokenizer: both runs start here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hpt_megatron.data.tokenizer import save_tokenizer

    out = tmp_path_factory.mktemp("start")
    cfg = json.loads((ROOT / "configs/models/tiny-qwen2.json").read_text())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    )
    model.save_pretrained(out)
    save_tokenizer(out)
    return out


def test_tp2_on_two_ray_workers_matches_tp1(hf_start, tmp_path):
    common = (f"model.path={hf_start}", "model.hf_config=")
    one = hpt_train(tmp_path / "tp1", 1, *common)
    two = hpt_train(tmp_path / "tp2", 1, *common, "cluster.devices_per_node=2", "parallel.tp=2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "tp2" / "logs" / "worker_1.log").exists()  # it really ran on two Ray workers
    a, b = metrics(tmp_path / "tp1")[0], metrics(tmp_path / "tp2")[0]
    for key in KEYS:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_async_rollouts_on_two_ray_workers_match_tp1(hf_start, tmp_path):
    """Each Ray worker's engine thread generates ahead while its actor trains (the collective weight
    export stays on the actor's thread); three steps of staleness-1 LUFFY equal the in-process run."""
    common = (f"model.path={hf_start}", "model.hf_config=", "algo={preset: luffy}", "optim.warmup_steps=0",
              "rollout.async_staleness=1")  # fmt: skip
    one = hpt_train(tmp_path / "tp1", 3, *common)
    two = hpt_train(tmp_path / "tp2", 3, *common, "cluster.devices_per_node=2", "parallel.tp=2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    for a, b in zip(metrics(tmp_path / "tp1"), metrics(tmp_path / "tp2"), strict=True):
        assert b["rollout/staleness"] == a["rollout/staleness"] == min(a["step"] - 1, 1)
        luffy = ("loss/rl", "loss/offpolicy", "rl/ratio_max", "rollout/logp_mismatch_abs")
        for key in (*(k for k in KEYS if k != "loss/sft"), *luffy):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_a_dead_worker_stops_the_driver_with_its_log(tmp_path):
    from hpt_megatron.cluster.ray_cluster import RayCluster, WorkerDied
    from hpt_megatron.config import load_config
    from hpt_megatron.run_setup import materialize_synthetic, prepare_run_dir
    from tests.e2e.runs import TINY, overrides

    cfg = load_config(TINY, [*overrides(tmp_path, 1), "cluster.devices_per_node=2", "parallel.tp=2"])
    cfg = materialize_synthetic(cfg, prepare_run_dir(cfg))
    cluster = RayCluster(cfg)
    try:
        os.kill(cluster.worker_pids()[1], signal.SIGKILL)
        start = time.time()
        with pytest.raises(WorkerDied) as err:
            cluster.sync_weights()  # a collective: rank 0 alone would wait for rank 1 forever
        assert time.time() - start < 60
        msg = str(err.value)
        assert "worker rank 1" in msg and "worker_1.log" in msg and "last lines of its log" in msg
    finally:
        cluster.shutdown()
