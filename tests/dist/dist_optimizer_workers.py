"""Worker functions for the distributed-optimizer tests (run by ``hpt_megatron.distributed.launch``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from hpt_megatron.convert import load_model
from hpt_megatron.distributed import init_parallel
from hpt_megatron.models import arch_config_from_hf
from hpt_megatron.train.actor import ActorOptions, MegatronActor
from hpt_megatron.train.dist_checkpoint import load_dist_checkpoint, save_dist_checkpoint
from hpt_megatron.train.optim import leaf_optimizers
from tests.dist import actor_workers as W


def _actor(root: str, kind: str, tp: int, distributed: bool, bf16: bool = False) -> MegatronActor:
    ctx = init_parallel(tp, 1)
    arch = arch_config_from_hf(Path(root) / kind)
    optim = dataclasses.replace(W.OPTIM, distributed=distributed)
    opts = ActorOptions(spec="local", micro_batch_tokens=40, dtype=torch.bfloat16 if bf16 else None)
    return MegatronActor(arch, ctx, optim, total_steps=10, options=opts)


def _state_numel(actor: MegatronActor) -> dict:
    """Elements of Adam's state this rank holds (exp_avg), and of the model parameters it holds."""
    held = sum(
        int(s["exp_avg"].numel())
        for opt in leaf_optimizers(actor.optimizer)
        for s in opt.optimizer.state.values()
    )
    return {"exp_avg": held, "params": sum(p.numel() for p in actor.model.parameters())}


def _all(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def train_worker(root: str, kind: str, tp: int, distributed: bool, steps: int, bf16: bool = False) -> dict:
    """``steps`` HPT steps from the converted HF weights; the history, the HF-named weights (rank 0)
    and every rank's share of the optimizer state."""
    actor = _actor(root, kind, tp, distributed, bf16)
    load_model(Path(root) / f"{kind}-mg", actor.model, actor.ctx, actor.arch)
    history = W._train(actor, W.hpt_batch(), steps)
    return {
        "history": history,
        "weights": W._hf_weights(actor),
        "state": _all(_state_numel(actor)),
        "optimizers": [type(o).__name__ for o in leaf_optimizers(actor.optimizer)],
        "param_dtypes": sorted({str(p.dtype) for p in actor.model.parameters()}),
    }


def save_worker(root: str, kind: str, tp: int, ckpt: str, bf16: bool = False) -> dict:
    """One step with the distributed optimizer, then a torch_dist save."""
    actor = _actor(root, kind, tp, True, bf16)
    load_model(Path(root) / f"{kind}-mg", actor.model, actor.ctx, actor.arch)
    history = W._train(actor, W.hpt_batch(), 1)
    save_dist_checkpoint(actor, ckpt, {"step": 1})
    return {"history": history}


def resume_worker(
    root: str, kind: str, tp: int, ckpt: str, distributed: bool = True, bf16: bool = False
) -> dict:
    """Load ``ckpt`` into a fresh actor, then one more step."""
    actor = _actor(root, kind, tp, distributed, bf16)
    meta = load_dist_checkpoint(actor, ckpt)
    history = W._train(actor, W.hpt_batch(), 1)
    return {"meta": meta, "history": history, "weights": W._hf_weights(actor)}


def error_worker(root: str, kind: str, tp: int, ckpt: str, distributed: bool, fmt: str) -> str:
    """The ValueError of saving (``ckpt`` absent) or loading ``ckpt`` in format ``fmt``."""
    from hpt_megatron.train.checkpoint import load_training_checkpoint, save_training_checkpoint

    actor = _actor(root, kind, tp, distributed)
    try:
        if Path(ckpt).exists():
            load_training_checkpoint(actor, ckpt)
        else:
            W._train(actor, W.hpt_batch(), 1)
            save_training_checkpoint(actor, ckpt, {"step": 1}, fmt)
    except ValueError as err:
        return str(err)
    return ""
