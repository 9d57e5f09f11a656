"""Worker functions for the actor tests (run by ``hpt_megatron.distributed.launch``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from hpt_megatron.algo import ScoredRows, count_rows, get_preset, plan_rows
from hpt_megatron.config import OptimConfig
from hpt_megatron.convert import export_hf_weights, load_model
from hpt_megatron.distributed import init_parallel
from hpt_megatron.models import arch_config_from_hf
from hpt_megatron.train.actor import ActorOptions, MegatronActor
from hpt_megatron.train.batching import TrainBatch, build_train_batch
from hpt_megatron.train.checkpoint import load_checkpoint, save_checkpoint

VOCAB = 300
# Adam's update is g / (sqrt(v) + eps): with eps far below |g|, fp32 rounding noise in a gradient that
# is mathematically zero (Qwen2's key bias: softmax ignores a per-query shift) would become a full
# +-lr step. eps = 1e-5 keeps such noise negligible while real gradients (>= 1e-4 here) dominate it.
OPTIM = OptimConfig(lr=1e-3, eps=1e-5, weight_decay=0.01, grad_clip=1.0, betas=(0.9, 0.999))


def hpt_batch(algo_name: str = "hpt", seed: int = 0) -> TrainBatch:
    """Prompts routed by the preset's gate: all-wrong prompts become SFT rows, the others RL rows."""
    algo = get_preset(algo_name).build()
    g = torch.Generator().manual_seed(seed)
    n = 4
    rewards = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float64)
    plan = plan_rows(algo.gate.route(rewards), n)
    rows, reward = [], []
    for p, j in zip(plan.prompt, plan.rollout):
        prompt_len = 3 + (p * 2) % 5
        resp_len = int(torch.randint(2, 9, (1,), generator=g))
        rows.append((torch.randint(0, VOCAB, (prompt_len + resp_len,), generator=g).tolist(), prompt_len))
        reward.append(1.0 if j < 0 else float(rewards[p, j]))
    batch = build_train_batch(rows, [int(s) for s in plan.source], plan.coef)
    scored = ScoredRows(
        rewards_B=torch.tensor(reward, dtype=torch.float64),
        group_B=torch.tensor(plan.prompt),
        mask_BT=batch.loss_mask_BT,
        source_B=batch.source_B,
    )
    batch.advantages = algo.advantages(scored)
    return batch


def _gather_logprobs(report: dict | None, batch: TrainBatch) -> torch.Tensor:
    """Every rank gets the whole batch's log-probs from the reporting ranks."""
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    out = torch.zeros_like(batch.loss_mask_BT)
    for r in reports:
        if r is not None and r["rows"]:
            out[r["rows"]] = r["logp_BT"].to(out.dtype)
    return out


def _actor(
    root: str, kind: str, tp: int, pp: int, packed: bool = False, budget: int = 40, **options
) -> MegatronActor:
    ctx = init_parallel(tp, pp)
    arch = arch_config_from_hf(Path(root) / kind)
    options.setdefault("spec", "sdpa" if packed else "local")  # packed rows need sdpa (or te)
    opts = ActorOptions(micro_batch_tokens=budget, packed=packed, **options)
    return MegatronActor(arch, ctx, OPTIM, total_steps=10, options=opts)


def _train(actor: MegatronActor, batch: TrainBatch, steps: int) -> list[dict]:
    algo = get_preset("hpt").build()
    counts = count_rows(algo, batch.source_B, batch.loss_mask_BT)
    history = []
    for _ in range(steps):
        batch.old_logp_BT = _gather_logprobs(actor.compute_logprobs(batch), batch)
        out = actor.train_step(batch, algo, counts)
        metrics = [None] * dist.get_world_size()
        dist.all_gather_object(metrics, out["metrics"] or None)
        total = {}
        for m in metrics:
            for k, v in (m or {}).items():
                total[k] = max(total.get(k, v), v) if k.endswith("_max") else total.get(k, 0.0) + v
        history.append({"metrics": total, "grad_norm": out["grad_norm"], "skipped": out["skipped"]})
    return history


def _hf_weights(actor: MegatronActor) -> dict | None:
    pairs = [p for bucket in actor.export_weights(1 << 20) for p in bucket]
    return {n: t.clone() for n, t in pairs} if actor.ctx.rank == 0 else None


def train_worker(
    root: str,
    kinds: tuple[str, ...],
    tp: int,
    pp: int,
    steps: int,
    packed: bool = False,
    budget: int = 40,
    options: dict | None = None,
) -> dict:
    out = {}
    for kind in kinds:
        actor = _actor(root, kind, tp, pp, packed, budget, **(options or {}))
        load_model(Path(root) / f"{kind}-mg", actor.model, actor.ctx, actor.arch)
        batch = hpt_batch()
        out[kind] = {"history": _train(actor, batch, steps), "weights": _hf_weights(actor)}
    return out


def logprob_worker(root: str, kind: str, tp: int, pp: int, packed: bool) -> dict | None:
    actor = _actor(root, kind, tp, pp, packed)
    load_model(Path(root) / f"{kind}-mg", actor.model, actor.ctx, actor.arch)
    batch = hpt_batch()
    report = actor.compute_logprobs(batch, with_entropy=True)
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    return {
        "reports": [r for r in reports if r is not None],
        "tokens": batch.tokens_BL,
        "mask": batch.loss_mask_BT,
    }


def save_worker(root: str, kind: str, tp: int, pp: int, ckpt: str) -> dict:
    actor = _actor(root, kind, tp, pp)
    load_model(Path(root) / f"{kind}-mg", actor.model, actor.ctx, actor.arch)
    history = _train(actor, hpt_batch(), 1)
    save_checkpoint(actor, ckpt, {"step": 1})
    return {"history": history}


def resume_worker(root: str, kind: str, tp: int, pp: int, ckpt: str) -> dict:
    actor = _actor(root, kind, tp, pp)
    meta = load_checkpoint(actor, ckpt)
    history = _train(actor, hpt_batch(), 1)
    return {"meta_step": meta["step"], "history": history, "weights": _hf_weights(actor)}


def skip_worker(root: str, kind: str, skip_above: float | None, poison: bool) -> dict:
    """One step that must be skipped: grad norm above ``skip_above``, or NaN advantages (``poison``)."""
    import dataclasses

    ctx = init_parallel(1, 1)
    arch = arch_config_from_hf(Path(root) / kind)
    optim = dataclasses.replace(OPTIM, skip_grad_norm_above=skip_above)
    actor = MegatronActor(arch, ctx, optim, total_steps=10, options=ActorOptions(spec="local"))
    load_model(Path(root) / f"{kind}-mg", actor.model, actor.ctx, actor.arch)
    before = {n: p.detach().clone() for n, p in actor.model.named_parameters()}
    batch = hpt_batch()
    if poison:
        batch.advantages = {k: torch.full_like(v, float("nan")) for k, v in batch.advantages.items()}
    algo = get_preset("hpt").build()
    batch.old_logp_BT = actor.compute_logprobs(batch)["logp_BT"]
    out = actor.train_step(batch, algo, count_rows(algo, batch.source_B, batch.loss_mask_BT))
    unchanged = all(torch.equal(before[n], p.detach()) for n, p in actor.model.named_parameters())
    return {"skipped": out["skipped"], "reason": out["reason"], "unchanged": unchanged, "lr": out["lr"]}


def interrupted_save_worker(root: str, kind: str, ckpt: str) -> dict:
    """Save, train a step, then a second save into the same directory dies halfway: the first
    checkpoint must still load, with the first step's weights."""
    import hpt_megatron.train.checkpoint as ckpt_mod

    actor = _actor(root, kind, 1, 1)
    load_model(Path(root) / f"{kind}-mg", actor.model, actor.ctx, actor.arch)
    save_checkpoint(actor, ckpt, {"step": 0})
    saved = {n: p.detach().clone() for n, p in actor.model.named_parameters()}
    _train(actor, hpt_batch(), 1)
    real_save_state, calls = ckpt_mod.save_state, []

    def dying_save_state(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save_state(*args, **kwargs)

    ckpt_mod.save_state = dying_save_state
    try:
        save_checkpoint(actor, ckpt + "-next", {"step": 1})
    except OSError:
        pass
    finally:
        ckpt_mod.save_state = real_save_state
    fresh = _actor(root, kind, 1, 1)
    meta = load_checkpoint(fresh, ckpt)
    same = all(torch.equal(saved[n], p.detach()) for n, p in fresh.model.named_parameters())
    return {"meta_step": meta["step"], "restored": same, "next_exists": Path(ckpt + "-next").exists()}
