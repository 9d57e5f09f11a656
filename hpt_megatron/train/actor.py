"""The Megatron actor: one rank's pipeline stage of the policy, its optimizer, and the UPGE loss
plugged into Megatron-Core's forward/backward schedules.

Every rank of the job holds one ``MegatronActor`` and receives the same whole mini-batch; it trains on
its data-parallel share (token-balanced rows), split into micro-batches by a token budget. Losses are
already divided by GLOBAL counts computed from the whole mini-batch, so micro-batch and data-parallel
gradients must be summed, not averaged: the model is built with ``calculate_per_token_loss`` (the
schedule then neither divides by the number of micro-batches nor DDP by the data-parallel size) and
Megatron's token-count rescaling is switched off. (The ``released_*`` reductions instead normalise
each micro-batch by itself and divide by the data-parallel size, ``LossInputs.dp_size``, which
reproduces the released code's per-micro-batch means and FSDP gradient averaging.)

Results (log-probs, metrics) come back on the ranks that ``reports`` (last pipeline stage, tensor
rank 0: one per data-parallel group); other ranks return None.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from hpt_megatron.algo import AlgoConfig, Counts, LossInputs, merge_metrics, upge_loss
from hpt_megatron.algo.loss import rollout_mismatch
from hpt_megatron.config import OptimConfig
from hpt_megatron.models import ArchConfig, build_gpt_model, resolve_spec_name
from hpt_megatron.observability.timing import nvtx_range, peak_memory_gib, reset_peak_memory
from hpt_megatron.train.batching import (
    Packed,
    TrainBatch,
    micro_batches,
    pack,
    split_for_data_parallel,
    unpack_targets,
)
from hpt_megatron.train.logprobs import vocab_parallel_logprobs
from hpt_megatron.train.optim import StepResult, build_optimizer, ddp_config, optimizer_step


@dataclass
class MicroBatch:
    rows: list[int]  # indices into the mini-batch
    batch: TrainBatch
    packed: Packed | None = None  # the rows as one sequence (padding-free mode), built once


@dataclass
class ActorOptions:
    spec: str = "auto"
    dtype: torch.dtype | None = None
    fp8: object = None
    micro_batch_tokens: int = 32768
    packed: bool = False
    temperature: float = 1.0  # sampling temperature: log-probs are of logits / temperature
    logprob_chunk: int | None = None  # tokens per chunk; default: ~256 MiB of fp32 logits per chunk
    log_entropy: bool = True  # compute the policy entropy every step even when the loss does not use it
    recompute: bool = False  # full activation recomputation, one layer at a time (memory for compute)
    sequence_parallel: bool = False  # split norms/dropout activations along the sequence over TP ranks


def _finalize_without_token_scaling(model, num_tokens=None, **kwargs):
    """Megatron's finalize (DP reduction, tied-embedding and layer-norm grads) without its division
    by the token count: our loss is normalised by global counts already."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, num_tokens=None, **kwargs)


class MegatronActor:
    def __init__(self, arch: ArchConfig, ctx, optim: OptimConfig, total_steps: int, options: ActorOptions):
        from megatron.core.distributed import DistributedDataParallel

        self.arch, self.ctx, self.opts = arch, ctx, options
        if options.packed and resolve_spec_name(options.spec) == "local":
            raise ValueError(
                "packed micro-batches (trainer.packed) need a layer spec whose attention follows the "
                "row boundaries: set model.layer_spec to 'sdpa' or 'auto' (or 'te'), or trainer.packed=false"
            )
        overrides = {"calculate_per_token_loss": True}
        if options.recompute:
            overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if options.sequence_parallel:
            overrides["sequence_parallel"] = True  # needs TE layers: transformer_config checks
        if ctx.pp_size > 1:
            # micro-batches have different lengths, so stages exchange shapes first; Megatron's config
            # check for this also covers the MoE dispatcher, unused by dense models
            overrides.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
        self.model = build_gpt_model(
            arch, ctx, spec=options.spec, dtype=options.dtype, fp8=options.fp8, overrides=overrides
        )
        self.dtype = self.model.config.params_dtype
        self.ddp = DistributedDataParallel(self.model.config, ddp_config(optim), self.model)
        self.model.config.finalize_model_grads_func = _finalize_without_token_scaling
        self.model.config.no_sync_func = self.ddp.no_sync
        self.optimizer, self.scheduler = build_optimizer(self.ddp, optim, self.dtype, total_steps)
        self.optim_cfg = optim
        self.vocab_shard = arch.padded_vocab_size(ctx.tp_size) // ctx.tp_size

    @property
    def reports(self) -> bool:
        return self.ctx.is_last_stage and self.ctx.tp_rank == 0

    # ---- micro-batches ------------------------------------------------------------------------------

    def _micro_batches(self, batch: TrainBatch) -> list[MicroBatch]:
        """This data-parallel rank's rows, grouped by the token budget. A rank left without rows
        gets one fully masked row so it still joins every collective (it adds zero gradient)."""
        lengths = batch.lengths_B.tolist()
        mine = split_for_data_parallel(lengths, self.ctx.dp_size)[self.ctx.dp_rank]
        if not mine:
            empty = batch.select([0])
            empty.loss_mask_BT = torch.zeros_like(empty.loss_mask_BT)
            empty.coef_B = torch.zeros_like(empty.coef_B)
            return [MicroBatch([], empty)]
        groups = micro_batches([lengths[i] for i in mine], self.opts.micro_batch_tokens, self.opts.packed)
        selected = [batch.select([mine[j] for j in g]) for g in groups]
        return [
            MicroBatch([mine[j] for j in g], b, pack(b) if self.opts.packed else None)
            for g, b in zip(groups, selected)
        ]

    def _forward(self, model, mb: MicroBatch):
        with nvtx_range("actor/forward"):
            return self._forward_impl(model, mb)

    def _forward_impl(self, model, mb: MicroBatch):
        b = mb.batch
        if mb.packed is not None:
            p = mb.packed
            return model(
                p.tokens_1N.to(self.ctx.device),
                p.position_ids_1N.to(self.ctx.device),
                None,
                packed_seq_params=packed_seq_params(p, self.ctx.device),
            )
        tokens = b.tokens_BL.to(self.ctx.device)
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
        # right padding: under the causal mask no real token attends to padding
        return model(tokens, positions, None)

    def _logprobs(
        self, logits: Tensor, mb: MicroBatch, with_entropy: bool, temperature: float | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """[B, T] log-probs (and entropy) of each row's next tokens, from this rank's vocab shard, at
        the sampling temperature (or ``temperature``)."""
        b = mb.batch
        tokens = mb.packed.tokens_1N if mb.packed is not None else b.tokens_BL
        # every position's next token (the last one's is a dummy 0): a view of the logits, no copy
        targets = torch.nn.functional.pad(tokens[:, 1:], (0, 1)).reshape(-1)
        logp, ent = vocab_parallel_logprobs(
            logits.view(-1, logits.shape[-1]),
            targets.to(logits.device),
            vocab_start=self.ctx.tp_rank * self.vocab_shard,
            vocab_size=self.arch.vocab_size,
            group=self.ctx.tp_group if self.ctx.tp_size > 1 else None,
            temperature=self.opts.temperature if temperature is None else temperature,
            chunk=self.opts.logprob_chunk,
            with_entropy=with_entropy,
        )
        width = b.loss_mask_BT.shape[1]
        if mb.packed is not None:
            return tuple(
                None if t is None else unpack_targets(t[None], mb.packed, width) for t in (logp, ent)
            )
        return tuple(None if t is None else t.view(tokens.shape)[:, :width] for t in (logp, ent))

    def _run(self, mbs: list[MicroBatch], forward_step, forward_only: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(mbs),
            model=[self.ddp],
            num_microbatches=len(mbs),
            seq_length=max(int(mb.batch.tokens_BL.shape[1]) for mb in mbs),
            micro_batch_size=max(mb.batch.num_rows for mb in mbs),
            forward_only=forward_only,
        )

    # ---- log-probs ----------------------------------------------------------------------------------

    @torch.no_grad()
    def compute_logprobs(
        self, batch: TrainBatch, with_entropy: bool = False, temperature: float | None = None
    ) -> dict | None:
        """Log-probs (and entropy) of every row under the current weights, e.g. pi_old before an
        update, at the sampling temperature (or ``temperature``: 1.0 for the engines' probe).
        Returns ``{"rows", "logp_BT", "entropy_BT"}`` for this DP rank's rows on reporting ranks,
        None elsewhere."""
        self.ddp.eval()
        mbs = self._micro_batches(batch)

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            out = self._forward(model, mb)

            def loss_func(logits):
                logp, ent = self._logprobs(logits, mb, with_entropy, temperature)
                return logits.sum() * 0.0, torch.tensor(1), {"mb": mb, "logp": logp.cpu(), "entropy": ent}

            return out, loss_func

        with nvtx_range("actor/logprob_pass"):
            outs = self._run(mbs, forward_step, forward_only=True)
        if not self.reports:
            return None
        return _assemble(outs, batch.loss_mask_BT.shape[1])

    # ---- training -----------------------------------------------------------------------------------

    def train_step(self, batch: TrainBatch, algo: AlgoConfig, counts: Counts) -> dict:
        """One optimizer step on a mini-batch: forward/backward of this rank's share, then the
        global grad norm, skip-or-clip, AdamW. Returns metrics on reporting ranks (additive
        over data-parallel groups) plus the step result on every rank."""
        self.ddp.train()
        reset_peak_memory()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        mbs = self._micro_batches(batch)
        loss_func = functools.partial(self._loss, algo=algo, counts=counts)

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            return self._forward(model, mb), functools.partial(loss_func, mb)

        # backward runs inside the schedule: its time is forward_backward minus the forward ranges
        with nvtx_range("actor/forward_backward"):
            outs = self._run(mbs, forward_step, forward_only=False)
        with nvtx_range("actor/optimizer"):
            step: StepResult = optimizer_step(
                self.optimizer, self.scheduler, self.optim_cfg.grad_clip, self.optim_cfg.skip_grad_norm_above
            )
        metrics = merge_metrics(outs) if self.reports else {}
        return {
            "metrics": metrics,
            "grad_norm": step.grad_norm,
            "skipped": step.skipped,
            "reason": step.reason,
            "lr": step.lr,
            "peak_memory_gib": peak_memory_gib(self.ctx.device),
        }

    def _loss(self, mb: MicroBatch, logits: Tensor, algo: AlgoConfig, counts: Counts):
        with nvtx_range("actor/loss"):
            return self._loss_impl(mb, logits, algo, counts)

    def _loss_impl(self, mb: MicroBatch, logits: Tensor, algo: AlgoConfig, counts: Counts):
        b = mb.batch
        logp, ent = self._logprobs(logits, mb, algo.needs_entropy or self.opts.log_entropy)
        dtype = logp.dtype

        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(logits.device, dtype)

        # Without a recomputed pi_old (one update per step), pi_old IS the current policy; so it is
        # where a given pi_old is NaN (behaviour pi_old: the rows no engine sampled)
        old = logp.detach()
        if b.old_logp_BT is not None:
            given = cast(b.old_logp_BT)
            old = torch.where(given.isnan(), old, given)
        x = LossInputs(
            logp_BT=logp,
            mask_BT=cast(b.loss_mask_BT),
            source_B=b.source_B.to(logits.device),
            advantages={k: cast(v) for k, v in b.advantages.items()},
            coef_B=cast(b.coef_B),
            old_logp_BT=old,
            ref_logp_BT=cast(b.ref_logp_BT),
            entropy_BT=ent,
            rollout_logp_BT=cast(b.rollout_logp_BT),
            dp_size=self.ctx.dp_size,  # for the released_* reductions (they average over DP ranks)
        )
        loss, metrics = upge_loss(algo, x, counts)
        if x.rollout_logp_BT is not None:
            # engine vs pi_old; with a behaviour pi_old (equal to the engine's), vs the current policy
            reference = logp.detach() if b.old_is_behaviour else old
            metrics.update(rollout_mismatch(reference, x.rollout_logp_BT, x, counts))
        return loss, torch.tensor(1), {k: v.detach().clone().cpu() for k, v in metrics.items()}

    # ---- weights ------------------------------------------------------------------------------------

    def export_weights(self, bucket_bytes: int, dtype: torch.dtype | None = None):
        """HF-named (name, tensor) buckets of the whole model on every rank (collective)."""
        from hpt_megatron.convert import export_hf_weights

        return export_hf_weights(self.model, self.ctx, self.arch, bucket_bytes=bucket_bytes, dtype=dtype)


def packed_seq_params(p: Packed, device):
    """Megatron's description of a packed micro-batch (``thd``: the row boundaries, no mask)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = p.cu_seqlens.to(device)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=p.max_length,
        max_seqlen_kv=p.max_length,
    )


def _assemble(outs: list[dict], width: int) -> dict:
    """Concatenate micro-batch results (each trimmed to its own longest row) in row order."""
    done = [o for o in outs if o["mb"].rows]
    rows = [r for o in done for r in o["mb"].rows]

    def cat(key: str) -> Tensor | None:
        if not done or done[0][key] is None:
            return None if done else torch.zeros(0, width)
        return torch.cat([_pad(o[key].cpu(), width) for o in done])

    return {"rows": rows, "logp_BT": cat("logp"), "entropy_BT": cat("entropy")}


def _pad(t: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1])) if t.shape[1] < width else t
