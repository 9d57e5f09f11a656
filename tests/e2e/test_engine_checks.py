"""The checks that keep rollouts on-policy, with the HF engine (tests/vllm/ has the vLLM ones): the
probe after every weight sync stops a run whose engine kept old weights, and the first step stops a
run whose actor and engine compute different distributions from the same weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.e2e.runs import TINY, overrides


@pytest.fixture
def run(tmp_path):
    from hpt_megatron.config import load_config
    from hpt_megatron.run_setup import setup_run, teardown

    cfg = load_config(TINY, overrides(tmp_path, 1, "algo={preset: grpo}"))
    r = setup_run(cfg)
    yield r
    teardown(r)


def test_a_sync_that_changes_nothing_stops_the_run(run, monkeypatch):
    from hpt_megatron.cluster.base import StaleEngineError

    worker = run.cluster.worker
    monkeypatch.setattr(worker.engine, "load_weights", lambda buckets, manifest: None)  # silent no-op
    with torch.no_grad():
        for p in worker.actor.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with pytest.raises(StaleEngineError, match=r"rank 0: .* differ from the actor's by [0-9.e-]+ on average"):
        run.cluster.sync_weights()
    monkeypatch.undo()
    assert run.cluster.sync_weights()["rollout/probe_logp_diff_mean_max"] < 1e-5


def test_the_first_step_refuses_a_train_rollout_gap(run):
    from hpt_megatron.trainer import train_step

    actor = run.cluster.worker.actor
    actor.opts = dataclasses.replace(actor.opts, temperature=0.5)  # the engine samples at 1.0
    with pytest.raises(RuntimeError, match=r"step 0: the actor's log-probs of the sampled tokens differ"):
        train_step(run, 0)
