"""One step's training batch: the gate's row plan filled with token ids.

RL rows are a prompt plus one of its rollouts; off-policy and SFT rows are the prompt plus its
demonstration (with EOS). Advantages are computed here, over the whole step, before the batch is
split into mini-batches and micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpt_megatron.algo import AlgoConfig, RowPlan, ScoredRows, Source
from hpt_megatron.rollout import Completion
from hpt_megatron.train.batching import TrainBatch, build_train_batch


@dataclass
class StepBatch:
    batch: TrainBatch
    prompt_of_row: list[int]  # position of the row's prompt in this step's prompts
    rewards_B: torch.Tensor
    skipped_empty: int = 0  # rollouts without any generated token (dropped)


def build_step_batch(
    plan: RowPlan,
    prompt_ids: list[list[int]],
    completions: list[list[Completion]],
    demonstrations: dict[int, list[int]],
    rewards_GN: torch.Tensor,
    demo_rewards: dict[int, float],
    algo: AlgoConfig,
    values: Callable[[TrainBatch], torch.Tensor] | None = None,
) -> StepBatch | None:
    """Token rows per the plan, with rewards, rollout log-probs and each term's advantages.
    ``values`` gives the critic's values of the rows (for GAE). Returns None when no row is left."""
    rows, sources, coefs, rewards, prompts, rollout_logps = [], [], [], [], [], []
    skipped = 0
    for g, j, src, coef in zip(plan.prompt, plan.rollout, plan.source, plan.coef):
        if j >= 0:
            c = completions[g][j]
            if not c.token_ids:
                skipped += 1
                continue
            response, reward, logps = c.token_ids, float(rewards_GN[g, j]), c.logprobs
        else:
            response, reward, logps = demonstrations[g], demo_rewards.get(g, 1.0), None
        rows.append((prompt_ids[g] + list(response), len(prompt_ids[g])))
        sources.append(int(src))
        coefs.append(coef)
        rewards.append(reward if src != Source.SFT else 0.0)
        prompts.append(g)
        rollout_logps.append(logps)
    if not rows:
        return None
    batch = build_train_batch(rows, sources, coefs)
    batch.rollout_logp_BT = _rollout_logp(batch, rows, rollout_logps)
    rewards_B = torch.tensor(rewards, dtype=torch.float64)
    scored = ScoredRows(
        rewards_B=rewards_B,
        group_B=torch.tensor(prompts),
        mask_BT=batch.loss_mask_BT,
        source_B=batch.source_B,
        values_BT=None if values is None else values(batch),
    )
    batch.advantages = algo.advantages(scored)
    return StepBatch(batch, prompts, rewards_B, skipped)


def _rollout_logp(batch: TrainBatch, rows, logps) -> torch.Tensor:
    """The sampling engine's log-probs at each response target position (0 elsewhere)."""
    out = torch.zeros_like(batch.loss_mask_BT)
    for i, ((_, prompt_len), lp) in enumerate(zip(rows, logps)):
        if lp:
            out[i, prompt_len - 1 : prompt_len - 1 + len(lp)] = torch.tensor(lp, dtype=out.dtype)
    return out


def mini_batches(step: StepBatch, num_prompts: int, mini_batch_prompts: int) -> list[list[int]]:
    """Row indices of each mini-batch: the rows of consecutive groups of ``mini_batch_prompts``
    prompts (a prompt's rows never straddle two mini-batches). Empty groups are dropped."""
    out = []
    for a in range(0, num_prompts, mini_batch_prompts):
        members = set(range(a, a + mini_batch_prompts))
        rows = [i for i, g in enumerate(step.prompt_of_row) if g in members]
        if rows:
            out.append(rows)
    return out
