"""Asynchronous rollouts (rollout.async_staleness): the staleness bound, which weights sampled each
step's rollouts, the behaviour pi_old, and a resume that continues exactly.

LUFFY's layout is used throughout: from the random initialisation every rollout fails, but each group
also holds a correct demonstration, so every step has rollout rows with non-zero advantages (and
off-policy rows, whose pi_old must stay the actor's)."""

from __future__ import annotations

import pytest
import torch

from hpt_megatron.algo import Source
from tests.e2e.runs import TINY, comparable, hpt_train, metrics, overrides

pytestmark = pytest.mark.e2e

LUFFY = "algo={preset: luffy}"
NO_WARMUP = "optim.warmup_steps=0"  # the first update changes the weights (warm-up starts at lr 0)


def test_each_step_trains_on_rollouts_of_the_weights_k_steps_back(tmp_path, monkeypatch):
    """Oracle: the actor's own log-probs of the trained rows, with its weights set back to each
    earlier step's. Step t's rollouts (k = 1) must match theta_{t-1} to numerics and not theta_t."""
    from hpt_megatron.config import load_config
    from hpt_megatron.run_setup import setup_run, teardown
    from hpt_megatron.trainer import train_step

    cfg = load_config(TINY, overrides(tmp_path, 4, LUFFY, NO_WARMUP, "rollout.async_staleness=1"))
    run = setup_run(cfg)
    try:
        params = list(run.cluster.worker.actor.model.parameters())

        def weights():
            return [p.detach().clone() for p in params]

        batches, snapshots = [], [weights()]
        real_train_step = run.cluster.train_step

        def spy(batch, algo, counts):
            batches.append(batch)
            return real_train_step(batch, algo, counts)

        monkeypatch.setattr(run.cluster, "train_step", spy)
        staleness = []
        for step in range(3):
            staleness.append(train_step(run, step)["rollout/staleness"])
            snapshots.append(weights())
        assert staleness == [0.0, 1.0, 1.0]

        def logp_under(snapshot, batch):
            with torch.no_grad():
                for p, w in zip(params, snapshot):
                    p.copy_(w)
            return run.cluster.compute_logprobs(batch)["logp_BT"]

        for step in (1, 2):
            batch = batches[step]  # one mini-batch per step
            rl_B = batch.source_B == int(Source.RL)
            tokens = rl_B[:, None] & batch.loss_mask_BT.bool()
            assert rl_B.any() and (~rl_B).any()  # rollouts and demonstrations
            engine = batch.rollout_logp_BT[tokens]
            behaviour = (engine - logp_under(snapshots[step - 1], batch)[tokens]).abs().mean()
            current = (engine - logp_under(snapshots[step], batch)[tokens]).abs().mean()
            assert behaviour < 1e-4, (step, behaviour)
            assert current > 100 * behaviour, (step, current, behaviour)
            # the behaviour pi_old: the engine's log-probs on rollout tokens, NaN (the actor's
            # current policy) on the demonstrations
            assert batch.old_is_behaviour
            assert torch.equal(batch.old_logp_BT[tokens], engine)
            assert batch.old_logp_BT[~rl_B].isnan().all()
        logp_under(snapshots[-1], batches[0])  # the actor's own weights back
    finally:
        teardown(run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("async_ref")
    proc = hpt_train(
        run_dir,
        6,
        LUFFY,
        NO_WARMUP,
        "rollout.async_staleness=2",
        "trainer.save_every=3",
        "trainer.keep_last=5",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_staleness_is_bounded_by_k_and_the_ratio_is_against_the_behaviour_policy(reference, tmp_path):
    records = metrics(reference)
    assert [r["rollout/staleness"] for r in records] == [0, 1, 2, 2, 2, 2]
    for r in records:
        # every load the engines ran on passed the probe against the actor's weights of then
        assert r["rollout/probe_logp_diff_mean_max"] < 1e-3
    # pi/pi_old against the sampling policy: 1 up to numerics on fresh rollouts, away from it on
    # stale ones (synchronous mode, or async_pi_old=actor, gives exactly 1 with one update per step)
    assert abs(records[0]["rl/ratio_max"] - 1) < 1e-4
    assert all(r["rl/ratio_max"] > 1.2 for r in records[1:])
    # the engine against the current policy: the staleness shows up as a train-rollout gap
    assert records[0]["rollout/logp_mismatch_abs"] < 1e-4
    assert all(r["rollout/logp_mismatch_abs"] > 1e-2 for r in records[1:])

    actor_old = hpt_train(
        tmp_path / "actor", 2, LUFFY, NO_WARMUP, "rollout.async_staleness=1", "rollout.async_pi_old=actor"
    )
    assert actor_old.returncode == 0, actor_old.stderr[-3000:]
    last = metrics(tmp_path / "actor")[-1]
    assert last["rollout/staleness"] == 1 and last["rl/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert last["rollout/logp_mismatch_abs"] > 1e-2  # the gap now lies between pi_old and the engine


def test_resume_continues_with_the_queued_rollouts_exactly(reference, tmp_path):
    """The checkpoint at step 3 holds the rollouts already generated for steps 3 and 4; a run resumed
    from it in another directory reproduces the uninterrupted run's steps 4..6."""
    checkpoint = reference / "checkpoints" / "iter_0000003"
    assert checkpoint.is_dir()
    run_dir = tmp_path / "resumed"
    proc = hpt_train(
        run_dir, 6, LUFFY, NO_WARMUP, "rollout.async_staleness=2", f"trainer.resume={checkpoint}",
        "trainer.keep_last=5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [comparable(r) for r in metrics(run_dir)]
    want = [comparable(r) for r in metrics(reference)][3:]
    assert [r["step"] for r in got] == [4, 5, 6]
    assert got == want
