"""AdamW through Megatron-Core's optimizer (fp32 master weights under bf16, grad norms and clipping
across TP/PP/DP), the LR schedule, the "skip the step when the grad norm is too large" rule, and
optimizer moments by parameter name for checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hpt_megatron.config import OptimConfig


@dataclass
class StepResult:
    grad_norm: float  # global pre-clip norm (nan when the gradients were not finite)
    skipped: bool
    reason: str = ""  # "nonfinite" or "grad_norm>X" when skipped
    lr: float = 0.0


def ddp_config(cfg: OptimConfig):
    """Megatron's DDP settings for a model trained with ``cfg``: fp32 gradient buffers, reduced
    after the backward pass; with ``optim.distributed`` the buffers are reduce-scattered instead of
    all-reduced, so each data-parallel rank holds the summed gradients of its own shard."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=cfg.distributed
    )


def build_optimizer(ddp_model, cfg: OptimConfig, dtype: torch.dtype, total_steps: int):
    """Megatron optimizer (torch AdamW fallback without TE/apex) and its LR scheduler. With
    ``optim.distributed`` it is Megatron's distributed optimizer: each data-parallel rank keeps
    the Adam moments and fp32 master weights of 1/DP of the parameters, steps them, and all-gathers
    the updated weights. Which one follows ``ddp_model``'s buffers (:func:`ddp_config`)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        adam_eps=cfg.eps,
        clip_grad=cfg.grad_clip,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        # the model's DDP buffers decide: a critic built without them stays replicated
        use_distributed_optimizer=ddp_model.ddp_config.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    if opt_config.use_distributed_optimizer:
        from patches.dist_optimizer_state import index_main_params_by_dtype_order

        index_main_params_by_dtype_order(leaf_optimizers(optimizer))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr if cfg.schedule != "constant" else cfg.lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=max(total_steps, cfg.warmup_steps + 1),
        lr_decay_style=cfg.schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def optimizer_step(optimizer, scheduler, clip: float, skip_above: float | None) -> StepResult:
    """Prepare grads, measure the global pre-clip norm, then skip (non-finite, or above
    ``skip_above``) or clip and step. The LR schedule advances either way (one call per step)."""
    found_inf = optimizer.prepare_grads()
    norm = float("nan") if found_inf else float(optimizer.get_grad_norm())
    lr = current_lr(optimizer)
    if found_inf or not math.isfinite(norm):
        result = StepResult(norm, True, "nonfinite", lr)
    elif skip_above is not None and norm > skip_above:
        result = StepResult(norm, True, f"grad_norm>{skip_above:g}", lr)
    else:
        if clip > 0:
            optimizer.clip_grad_norm(clip)
        optimizer.step_with_ready_grads()
        result = StepResult(norm, False, "", lr)
    scheduler.step(increment=1)
    return result


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


# ---- moments by name ------------------------------------------------------------------------------


def leaf_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _main_params(opt) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model param, main param) pairs: fp32 master copies under bf16/fp16, the params themselves
    in fp32."""
    if hasattr(opt, "fp32_from_float16_groups"):
        pairs = [
            (m, f) for mg, fg in zip(opt.float16_groups, opt.fp32_from_float16_groups) for m, f in zip(mg, fg)
        ]
        pairs += [(p, p) for group in opt.fp32_from_fp32_groups for p in group]
        return pairs
    return [(p, p) for group in opt.optimizer.param_groups for p in group["params"]]


MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_state_by_name(optimizer, model) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """``({"exp_avg": {param name: tensor}, "exp_avg_sq": ..., "main_param": ...}, step)``."""
    assert not is_distributed(optimizer), "the distributed optimizer holds shards, not whole moments"
    names = {p: n for n, p in model.named_parameters()}
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in (*MOMENTS, "main_param")}
    step = 0
    for opt in leaf_optimizers(optimizer):
        for model_param, main in _main_params(opt):
            name = names[model_param]
            state = opt.optimizer.state.get(main, {})
            for k in MOMENTS:
                out[k][name] = (
                    state[k].detach() if k in state else torch.zeros_like(main, dtype=torch.float32)
                )
            out["main_param"][name] = main.detach()
            step = max(step, int(state["step"])) if "step" in state else step
    return out, step


@torch.no_grad()
def load_optimizer_state(optimizer, model, state: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    names = {p: n for n, p in model.named_parameters()}
    for opt in leaf_optimizers(optimizer):
        for model_param, main in _main_params(opt):
            name = names[model_param]
            main.copy_(state["main_param"][name].to(main.dtype))
            if main is not model_param:
                model_param.copy_(main.to(model_param.dtype))
            if step > 0:
                opt.optimizer.state[main] = {
                    "step": torch.tensor(float(step)),
                    **{k: state[k][name].to(main.device, torch.float32).clone() for k in MOMENTS},
                }


def is_distributed(optimizer) -> bool:
    """Whether ``optimizer`` (or the leaves of a chained one) is Megatron's distributed optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(opt, DistributedOptimizer) for opt in leaf_optimizers(optimizer))


@torch.no_grad()
def init_distributed_state(optimizer) -> None:
    """Give a distributed optimizer that has not stepped yet zero Adam state at step 0 (what a first
    step would start from). megatron-core's ``DistributedOptimizer.state_dict``, which its checkpoint
    load calls, reads the step from torch Adam's per-parameter state when TE/apex are absent, and
    asserts that there is one."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in leaf_optimizers(optimizer):
        if not isinstance(opt, DistributedOptimizer):
            continue
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                state = opt.optimizer.state[p]
                if not state:
                    state.update(
                        step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)
                    )
