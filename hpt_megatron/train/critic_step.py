"""The driver's side of the PPO critic, one step: values of the step's rows before the advantages
(GAE reads them), value targets, the critic's mini-batch updates and its metrics, and the critic's
warm-up (the first ``critic.warmup_steps`` steps that need values train the critic only).

Everything here is decided from the step number and the config, so a resumed run makes the same
choices as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hpt_megatron.algo import AlgoConfig, ScoredRows, mean_metrics
from hpt_megatron.algo.value import critic_mask, explained_variance, gae_estimator, gae_returns, needs_critic
from hpt_megatron.train.batching import TrainBatch
from hpt_megatron.train.critic import CriticBatch
from hpt_megatron.train.step_batch import StepBatch, mini_batches


@dataclass
class RolloutValues:
    """The critic's values of the step's rows, asked for once while the batch is built (the
    values at rollout time: GAE's baseline and the centre of the value clip)."""

    cluster: Any
    values_BT: Tensor | None = None

    def __call__(self, batch: TrainBatch) -> Tensor:
        self.values_BT = self.cluster.compute_values(batch)
        return self.values_BT


def first_value_step(run) -> int | None:
    """The first step of the run whose algorithm needs critic values (None: no such step)."""
    return next((s for s in range(run.total_steps) if needs_critic(run.algo_at(s))), None)


def critic_warmup(run, step: int) -> bool:
    """Whether ``step`` trains the critic only (the actor is left unchanged)."""
    first = first_value_step(run)
    return first is not None and first <= step < first + run.cfg.critic.warmup_steps


def rollout_values(run, step: int, algo: AlgoConfig) -> RolloutValues | None:
    """The values hook for ``build_step_batch`` on steps that need values. With ``critic.init =
    actor`` the critic first takes the actor's weights at the first such step (after an SFT
    phase: the SFT model)."""
    if not needs_critic(algo):
        return None
    if step == first_value_step(run) and run.cfg.critic.init == "actor":
        run.cluster.init_critic_from_actor()
    return RolloutValues(run.cluster)


def critic_batch(step_batch: StepBatch, values_BT: Tensor, algo: AlgoConfig) -> CriticBatch:
    """Value targets (GAE returns, un-whitened) for the rollout rows of the step."""
    batch = step_batch.batch
    mask_BT = critic_mask(batch.loss_mask_BT, batch.source_B)
    rows = ScoredRows(
        rewards_B=step_batch.rewards_B,
        group_B=torch.tensor(step_batch.prompt_of_row),
        mask_BT=mask_BT,
        source_B=batch.source_B,
        values_BT=values_BT,
    )
    estimator = gae_estimator(algo.terms)
    assert estimator is not None, "critic_batch is called on steps whose algorithm uses GAE"
    returns_BT = gae_returns(estimator, rows).float()
    return CriticBatch(batch, values_BT.float(), returns_BT, mask_BT)


def update_critic(run, step_batch: StepBatch, values: RolloutValues, num_prompts: int, algo) -> dict:
    """``trainer.ppo_epochs`` passes over the actor's mini-batches, one critic step each."""
    assert values.values_BT is not None, "the values hook ran while the batch was built"
    cb = critic_batch(step_batch, values.values_BT, algo)
    parts, skipped = [], 0
    for _ in range(run.cfg.trainer.ppo_epochs):
        for rows in mini_batches(step_batch, num_prompts, run.cfg.trainer.mini_batch_prompts):
            sub = cb.select(rows)
            out = run.cluster.train_critic(sub, float(sub.mask_BT.sum()))
            parts.append(out["metrics"])
            skipped += int(out["skipped"])
    metrics = mean_metrics(parts)
    ev = explained_variance(cb.old_values_BT, cb.returns_BT, cb.mask_BT)
    if math.isfinite(ev):  # undefined when every return is the same (e.g. no rollout rewarded)
        metrics["critic/explained_variance"] = ev
    metrics["critic/returns_mean"] = float((cb.returns_BT * cb.mask_BT).sum() / cb.mask_BT.sum().clamp(min=1))
    metrics["critic/updates"] = float(len(parts))
    metrics["critic/skipped_updates"] = float(skipped)
    return metrics
