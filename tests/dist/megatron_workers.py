"""Worker functions run by ``hpt_megatron.distributed.launch`` in the multi-process tests.

They import no transformers: the HF oracle lives in the test process, workers return tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from hpt_megatron.convert import (
    atomic_directory,
    canonical_names,
    export_hf_weights,
    hf_manifest,
    load_model,
    load_state,
    save_model,
    save_state,
    verify_weights,
)
from hpt_megatron.distributed import init_parallel
from hpt_megatron.models import arch_config_from_hf, build_gpt_model


def megatron_dir(root: str | Path, kind: str, tp: int, pp: int) -> Path:
    return Path(root) / f"{kind}-tp{tp}pp{pp}"


def _coords(ctx) -> dict:
    return {"tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "tp": ctx.tp_size, "pp": ctx.pp_size}


def run_schedule(model, ctx, tokens: torch.Tensor, vocab: int, forward_only: bool) -> list[dict]:
    """Megatron's (pipeline) schedule over micro-batches of one sequence each.

    The loss is the token-mean cross entropy over the true vocab, so its gradients equal HF's.
    Returns the per-micro-batch dicts (logits, loss) on the last stage, [] elsewhere.
    """
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    tokens = tokens.to(ctx.device)
    micro_batches = iter([tokens[i : i + 1] for i in range(batch)])

    def forward_step(data_iterator, model):
        x = next(data_iterator)
        out = model(x, torch.arange(seq, device=x.device).unsqueeze(0), None)

        def loss_func(output):
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(output)[..., :vocab]
            loss = F.cross_entropy(logits[0, :-1], x[0, 1:])
            # The schedule divides the returned loss in place: keep a copy.
            return loss, {"logits": logits.detach()[0].float().cpu(), "loss": loss.detach().clone().cpu()}

        return out, loss_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=micro_batches,
        model=[model],
        num_microbatches=batch,
        seq_length=seq,
        micro_batch_size=1,
        forward_only=forward_only,
    )


def _logits(model, ctx, tokens, vocab: int) -> torch.Tensor | None:
    model.eval()
    with torch.no_grad():
        outs = run_schedule(model, ctx, tokens, vocab, forward_only=True)
    return torch.stack([o["logits"] for o in outs]) if outs else None


def _grads(model, ctx, tokens, vocab: int) -> dict:
    model.train()
    model.zero_grad()
    outs = run_schedule(model, ctx, tokens, vocab, forward_only=False)
    names = canonical_names(model)
    grads = {names[n]: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss = torch.stack([o["loss"] for o in outs]).mean() if outs else None
    return {"grads": grads, "loss": loss}


def parity_worker(root: str, tp: int, pp: int, tokens: torch.Tensor, kinds: tuple[str, ...]) -> dict:
    """Per model kind: logits (local and SDPA specs), loss + gradients and the streamed HF export."""
    ctx = init_parallel(tp, pp)
    out = {"coords": _coords(ctx)}
    for kind in kinds:
        arch = arch_config_from_hf(Path(root) / kind)
        res = {}
        for spec in ("local", "sdpa"):
            model = build_gpt_model(arch, ctx, spec=spec)
            load_model(megatron_dir(root, kind, tp, pp), model, ctx, arch)
            res[f"logits_{spec}"] = _logits(model, ctx, tokens, arch.vocab_size)
        res.update(_grads(model, ctx, tokens, arch.vocab_size))
        received = [pair for bucket in export_hf_weights(model, ctx, arch, bucket_bytes=64 * 1024) for pair in bucket]
        verify_weights(hf_manifest(arch, torch.float32), received)
        res["export"] = dict(received) if ctx.rank == ctx.world_size - 1 else None
        res["export_buckets"] = sum(1 for _ in export_hf_weights(model, ctx, arch, bucket_bytes=64 * 1024))
        out[kind] = res
    return out


def save_worker(root: str, ckpt: str, kind: str, tp: int, pp: int) -> None:
    """Load the converted model, then save it with fake Adam moments (2 * param, param ** 2)."""
    ctx = init_parallel(tp, pp)
    arch = arch_config_from_hf(Path(root) / kind)
    model = build_gpt_model(arch, ctx, spec="local")
    load_model(megatron_dir(root, kind, tp, pp), model, ctx, arch)
    params = dict(model.named_parameters())
    with atomic_directory(ckpt) as tmp:
        save_model(tmp, model, ctx, arch)
        save_state(tmp, {n: 2 * p.detach() for n, p in params.items()}, model, ctx, arch, "optim/exp_avg")
        save_state(tmp, {n: p.detach() ** 2 for n, p in params.items()}, model, ctx, arch, "optim/exp_avg_sq")


def load_worker(root: str, ckpt: str, kind: str, tp: int, pp: int, tokens: torch.Tensor) -> dict:
    """Load a checkpoint saved at another layout; return logits and whether the moments match."""
    ctx = init_parallel(tp, pp)
    arch = arch_config_from_hf(Path(root) / kind)
    model = build_gpt_model(arch, ctx, spec="local")
    load_model(ckpt, model, ctx, arch)
    params = dict(model.named_parameters())
    exp_avg = load_state(ckpt, model, ctx, arch, "optim/exp_avg")
    exp_avg_sq = load_state(ckpt, model, ctx, arch, "optim/exp_avg_sq")
    moments_ok = all(
        torch.equal(exp_avg[n], 2 * p.detach()) and torch.equal(exp_avg_sq[n], p.detach() ** 2)
        for n, p in params.items()
    )
    return {"logits": _logits(model, ctx, tokens, arch.vocab_size), "moments_ok": moments_ok, "n": len(params)}


def context_worker(tp: int, pp: int) -> dict:
    """The ParallelContext fields of this rank."""
    ctx = init_parallel(tp, pp)
    fields = ("rank", "tp_rank", "pp_rank", "dp_rank", "tp_size", "pp_size", "dp_size", "tp_ranks", "pp_ranks")
    return {f: getattr(ctx, f) for f in fields}


def train_step_worker(
    root: str, kind: str, tp: int, pp: int, tokens: torch.Tensor, lr: float, eps: float
) -> dict:
    """One Adam step through Megatron's DDP (grad buffers), distributed optimizer and schedule.

    The batch is split over data-parallel ranks; returns the updated local parameters.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ctx = init_parallel(tp, pp)
    arch = arch_config_from_hf(Path(root) / kind)
    model = build_gpt_model(arch, ctx, spec="local")
    load_model(megatron_dir(root, kind, tp, pp), model, ctx, arch)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True
    )
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    opt_config = OptimizerConfig(
        optimizer="adam", lr=lr, adam_eps=eps, weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=True
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    local_batch = tokens.chunk(ctx.dp_size)[ctx.dp_rank]
    run_schedule(ddp, ctx, local_batch, arch.vocab_size, forward_only=False)
    ok, _, _ = optimizer.step()
    names = canonical_names(model)
    params = {names[n]: p.detach().clone() for n, p in model.named_parameters()}
    return {"coords": _coords(ctx), "ok": ok, "params": params}


def attention_worker(hf_config: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> dict:
    """Megatron's local DotProductAttention and SDPACoreAttention on the same inputs."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from hpt_megatron.models.attention import SDPACoreAttention
    from hpt_megatron.models.gpt import transformer_config

    init_parallel(1, 1)
    config = transformer_config(arch_config_from_hf(hf_config), 1, 1, torch.float32, "local")
    args = (config, 1, AttnMaskType.causal, "self")
    with torch.no_grad():
        return {"local": DotProductAttention(*args)(q, k, v, mask), "sdpa": SDPACoreAttention(*args)(q, k, v, mask)}


def gpu_logits_worker(root: str, kind: str, tokens: torch.Tensor) -> dict:
    """bf16 logits of the local and SDPA specs on one GPU (NCCL), from the fp32 checkpoint."""
    ctx = init_parallel(1, 1)
    arch = arch_config_from_hf(Path(root) / kind)
    out = {}
    for spec in ("local", "sdpa"):
        model = build_gpt_model(arch, ctx, spec=spec)
        load_model(megatron_dir(root, kind, 1, 1), model, ctx, arch)
        out[spec] = _logits(model, ctx, tokens, arch.vocab_size)
    return out
