"""Worker functions for the critic tests (run by ``hpt_megatron.distributed.launch``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from hpt_megatron.algo import Source
from hpt_megatron.distributed import init_parallel
from hpt_megatron.models import arch_config_from_hf
from hpt_megatron.train.batching import TrainBatch, build_train_batch
from hpt_megatron.train.critic import CriticBatch, CriticOptions, MegatronCritic, load_critic, save_critic
from tests.dist.actor_workers import OPTIM, VOCAB

CLIP = 0.3


def critic_batch(seed: int = 0) -> CriticBatch:
    """Rollout rows of different lengths (plus one SFT row the critic must ignore) with random
    value targets and rollout-time values."""
    g = torch.Generator().manual_seed(seed)
    rows, sources = [], []
    for i in range(7):
        prompt_len, resp_len = 3 + (i * 2) % 5, int(torch.randint(2, 9, (1,), generator=g))
        rows.append((torch.randint(0, VOCAB, (prompt_len + resp_len,), generator=g).tolist(), prompt_len))
        sources.append(int(Source.SFT if i == 3 else Source.RL))
    batch = build_train_batch(rows, sources, [1.0] * len(rows))
    from hpt_megatron.algo.value import critic_mask

    mask = critic_mask(batch.loss_mask_BT, batch.source_B)
    returns = torch.randn(mask.shape, generator=g) * mask
    old = (torch.randn(mask.shape, generator=g) * 0.5) * mask
    return CriticBatch(batch, old, returns, mask)


def head_init(hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-zero head (the same on every rank), so gradients reach the trunk from the first step."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, hidden, generator=g) * 0.3, torch.tensor([0.1])


def make_critic(root: str, kind: str, tp: int, pp: int, budget: int = 40) -> MegatronCritic:
    ctx = init_parallel(tp, pp)
    arch = arch_config_from_hf(Path(root) / kind)
    opts = CriticOptions(spec="local", micro_batch_tokens=budget, clip=CLIP)
    critic = MegatronCritic(arch, ctx, OPTIM, total_steps=10, options=opts)
    critic.load_hf(Path(root) / kind)
    if ctx.is_last_stage:
        w, b = head_init(arch.hidden_size)
        with torch.no_grad():
            critic.model.output_layer.score.weight.copy_(w)
            critic.model.output_layer.score.bias.copy_(b)
    return critic


def gather_values(critic: MegatronCritic, batch: TrainBatch) -> torch.Tensor:
    """Every rank gets the whole batch's values from the reporting ranks."""
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, critic.compute_values(batch))
    out = torch.zeros_like(batch.loss_mask_BT)
    for r in reports:
        if r is not None and r["rows"]:
            out[r["rows"]] = r["values_BT"].to(out.dtype)
    return out


def _sum_metrics(metrics: dict) -> dict:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, metrics or None)
    total: dict = {}
    for m in parts:
        for k, v in (m or {}).items():
            total[k] = total.get(k, 0.0) + v
    return total


def train(critic: MegatronCritic, cb: CriticBatch, steps: int) -> list[dict]:
    num_tokens = float(cb.mask_BT.sum())
    history = []
    for _ in range(steps):
        values = gather_values(critic, cb.batch)
        out = critic.train_step(cb, num_tokens)
        history.append(
            {"metrics": _sum_metrics(out["metrics"]), "grad_norm": out["grad_norm"], "values": values}
        )
    return history


def train_worker(root: str, kind: str, tp: int, pp: int, steps: int, budget: int) -> dict:
    critic = make_critic(root, kind, tp, pp, budget)
    cb = critic_batch()
    history = train(critic, cb, steps)
    return {"history": history, "final_values": gather_values(critic, cb.batch)}


def save_worker(root: str, kind: str, tp: int, pp: int, ckpt: str) -> dict:
    critic = make_critic(root, kind, tp, pp)
    history = train(critic, critic_batch(), 1)
    save_critic(critic, ckpt)
    return {"history": history}


def resume_worker(root: str, kind: str, tp: int, pp: int, ckpt: str) -> dict:
    ctx = init_parallel(tp, pp)
    arch = arch_config_from_hf(Path(root) / kind)
    critic = MegatronCritic(arch, ctx, OPTIM, total_steps=10, options=CriticOptions(spec="local", clip=CLIP))
    load_critic(critic, ckpt)
    cb = critic_batch()
    history = train(critic, cb, 1)
    return {"history": history, "final_values": gather_values(critic, cb.batch)}


def values_worker(root: str, kind: str, tp: int, pp: int, source: str, how: str) -> torch.Tensor:
    """Values of the test batch of a critic initialised from ``source`` (``hf`` or ``megatron``)."""
    ctx = init_parallel(tp, pp)
    arch = arch_config_from_hf(Path(root) / kind)
    critic = MegatronCritic(arch, ctx, OPTIM, total_steps=10, options=CriticOptions(spec="local"))
    if how == "hf":
        critic.load_hf(source)
    else:
        critic.load_megatron(source)
    return gather_values(critic, critic_batch().batch)


def from_actor_worker(root: str, kind: str, tp: int, pp: int) -> torch.Tensor:
    """A randomly initialised critic that takes the trunk of an actor holding the HF weights, with
    the test head: its values must be the HF token-classification model's."""
    from hpt_megatron.convert import load_hf_model
    from tests.dist.actor_workers import _actor

    actor = _actor(root, kind, tp, pp)
    load_hf_model(Path(root) / kind, actor.model, actor.ctx, actor.arch)
    critic = MegatronCritic(actor.arch, actor.ctx, OPTIM, total_steps=10, options=CriticOptions(spec="local"))
    critic.copy_trunk_from(actor.model)
    if actor.ctx.is_last_stage:
        w, b = head_init(actor.arch.hidden_size)
        with torch.no_grad():
            critic.model.output_layer.score.weight.copy_(w)
            critic.model.output_layer.score.bias.copy_(b)
    return gather_values(critic, critic_batch().batch)


def learnable_worker(root: str, kind: str, steps: int) -> list[float]:
    """Targets that depend on the prompt (1 if its first token is below VOCAB / 2, else 0): the
    critic must learn to tell the rows apart. Returns the explained variance before each step."""
    from hpt_megatron.algo.value import explained_variance

    critic = make_critic(root, kind, 1, 1, budget=10**6)
    cb = critic_batch(seed=3)
    target_B = (cb.batch.tokens_BL[:, 0] < VOCAB // 2).float()
    cb.returns_BT = target_B[:, None] * cb.mask_BT
    history = []
    for _ in range(steps):
        values = gather_values(critic, cb.batch)
        history.append(explained_variance(values, cb.returns_BT, cb.mask_BT))
        cb.old_values_BT = values
        critic.train_step(cb, float(cb.mask_BT.sum()))
    return history
