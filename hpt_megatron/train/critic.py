"""The Megatron critic (value model) for PPO: one rank's pipeline stage of a GPTModel whose output
layer is a scalar head, its optimizer, the clipped value loss through Megatron-Core's
forward/backward schedules, and its checkpoints.

The critic has the actor's architecture and TP/PP layout and lives on the same workers. The trunk
(embedding, decoder layers, final norm) has the actor's parameter names; the head replaces the LM
head on the last stage: ``output_layer.score`` (weight ``[1, hidden]`` and bias ``[1]``, replicated
on every TP rank). Its input, the final hidden state, is the same on every TP rank, so the replicated
head gets identical gradients there and needs no reduction of its own; the head starts at zero, so
the first values are 0 (GAE then starts from Monte-Carlo returns) and all ranks agree bit for bit.

Values: ``values_BT[b, t]`` is the head applied to the hidden state of token t, i.e. the value of the
state before the target token t + 1 is emitted - the same positions as the actor's ``logp_BT``.

Checkpoint (``<step_dir>/critic/``, written atomically next to the actor's files)::

    critic/layout.json                      the actor's layout (tp, pp, architecture)
    critic/model/tpXX-ppYY.safetensors      trunk (canonical actor names) + value_head.weight/.bias
    critic/optim/exp_avg/..., exp_avg_sq/..., main_param/... (bf16 runs)
    critic/meta.json                        optimizer step and LR scheduler state

Conversion: :func:`export_critic_hf` writes a Hugging Face ``<Arch>ForTokenClassification``
(``num_labels = 1``; the head becomes ``score.weight`` / ``score.bias``), which
:meth:`MegatronCritic.load_hf` (``critic.init = <that directory>``) reads back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hpt_megatron.algo import merge_metrics
from hpt_megatron.algo.value import ValueLoss
from hpt_megatron.config import OptimConfig
from hpt_megatron.convert import atomic_directory, checkpoint_layout, load_sharded, save_sharded, write_layout
from hpt_megatron.convert.mapping import canonical_names, split_rules
from hpt_megatron.models import ArchConfig, build_gpt_model
from hpt_megatron.observability.timing import nvtx_range
from hpt_megatron.train.batching import TrainBatch, micro_batches, split_for_data_parallel
from hpt_megatron.train.optim import (
    MOMENTS,
    build_optimizer,
    load_optimizer_state,
    optimizer_state_by_name,
    optimizer_step,
)

CRITIC_DIR = "critic"
META = "meta.json"
HEAD = "output_layer.score."  # local (and in-model canonical) prefix of the head's parameters
HEAD_CANONICAL = "value_head."  # its name in the critic checkpoint
HF_HEAD = "score."  # its name in a Hugging Face ...ForTokenClassification checkpoint


@dataclass
class CriticOptions:
    spec: str = "auto"
    dtype: torch.dtype | None = None
    micro_batch_tokens: int = 32768
    recompute: bool = False
    clip: float | None = 0.5  # value clip range around the rollout-time values (None: no clipping)


@dataclass
class CriticBatch:
    """A mini-batch for the critic: the actor's token rows plus the value targets."""

    batch: TrainBatch
    old_values_BT: Tensor  # the critic's values at rollout time (centre of the value clip)
    returns_BT: Tensor  # GAE targets
    mask_BT: Tensor  # tokens the critic trains on (rollout rows' responses)

    def select(self, rows: list[int]) -> CriticBatch:
        sub = self.batch.select(rows)
        width = sub.loss_mask_BT.shape[1]
        idx = torch.as_tensor(rows, dtype=torch.long)
        return CriticBatch(
            sub,
            *(t[idx, :width] for t in (self.old_values_BT, self.returns_BT, self.mask_BT)),
        )


class ValueHead(torch.nn.Module):
    """Stands in for GPTModel's output layer: hidden ``[s, b, h]`` -> values ``[s, b, 1]``."""

    sequence_parallel = False  # read by GPTModel in inference mode only

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1, bias=True, dtype=dtype)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def forward(self, hidden, weight=None, runtime_gather_output=None, **_):
        return self.score(hidden), None


def trunk_arch(arch: ArchConfig) -> ArchConfig:
    """The critic trunk's tensors are those of the tied model (no LM head)."""
    return dataclasses.replace(arch, tie_embeddings=True)


def build_value_model(arch: ArchConfig, ctx, spec: str, dtype, overrides: dict):
    """The actor's GPTModel stage (untied, so no stage shares the LM head) with the scalar head."""
    model = build_gpt_model(
        dataclasses.replace(arch, tie_embeddings=False), ctx, spec=spec, dtype=dtype, overrides=overrides
    )
    if ctx.is_last_stage:
        model.output_layer = ValueHead(arch.hidden_size, model.config.params_dtype)
    return model


def critic_names(model) -> dict[str, str]:
    """Local parameter name -> checkpoint name (the actor's canonical names; ``value_head.*``)."""
    return {
        local: HEAD_CANONICAL + c.removeprefix(HEAD) if c.startswith(HEAD) else c
        for local, c in canonical_names(model).items()
    }


def _finalize_without_token_scaling(model, num_tokens=None, **kwargs):
    """Megatron's finalize (DP reduction, layer-norm grads) without its division by the token
    count: the value loss is normalised by the global token count already."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, num_tokens=None, **kwargs)


def _overrides(ctx, recompute: bool) -> dict:
    out: dict = {"calculate_per_token_loss": True}
    if recompute:
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if ctx.pp_size > 1:
        out.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    return out


class MegatronCritic:
    def __init__(self, arch: ArchConfig, ctx, optim: OptimConfig, total_steps: int, options: CriticOptions):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        self.arch, self.ctx, self.opts = arch, ctx, options
        self.model = build_value_model(
            arch, ctx, options.spec, options.dtype, _overrides(ctx, options.recompute)
        )
        self.dtype = self.model.config.params_dtype
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
        self.ddp = DistributedDataParallel(self.model.config, ddp_config, self.model)
        self.model.config.finalize_model_grads_func = _finalize_without_token_scaling
        self.model.config.no_sync_func = self.ddp.no_sync
        self.optimizer, self.scheduler = build_optimizer(self.ddp, optim, self.dtype, total_steps)
        self.optim_cfg = optim
        self.loss_fn = ValueLoss(clip=options.clip)

    @property
    def reports(self) -> bool:
        return self.ctx.is_last_stage and self.ctx.tp_rank == 0

    # ---- initial weights ----------------------------------------------------------------------------

    @torch.no_grad()
    def copy_trunk_from(self, actor_model) -> None:
        """Copy the actor's trunk (same layout) into the critic; the head is left as it is."""
        actor = {canonical_names(actor_model)[n]: p for n, p in actor_model.named_parameters()}
        names = critic_names(self.model)
        for local, p in self.model.named_parameters():
            name = names[local]
            if not name.startswith(HEAD_CANONICAL):
                p.copy_(actor[name])

    @torch.no_grad()
    def load_megatron(self, directory: str | Path, prefix: str = "model") -> None:
        """Load a sharded checkpoint at any layout: an actor's (the trunk; the head stays at zero)
        or a critic's (``.../critic``: trunk and head)."""
        from hpt_megatron.convert import ShardedReader

        names = critic_names(self.model)
        has_head = any(n.startswith(HEAD_CANONICAL) for n in ShardedReader(directory, prefix).names())
        wanted = [c for c in names.values() if has_head or not c.startswith(HEAD_CANONICAL)]
        loaded = self._read(directory, prefix, wanted)
        params = dict(self.model.named_parameters())
        for local, name in names.items():
            if name in loaded:
                params[local].copy_(loaded[name])

    @torch.no_grad()
    def load_hf(self, hf_dir: str | Path) -> None:
        """Trunk from a Hugging Face checkpoint; the head too when it has one (``score.*``)."""
        from hpt_megatron.convert import load_hf_model
        from hpt_megatron.convert.hf_io import HFReader

        load_hf_model(hf_dir, self.model, self.ctx, trunk_arch(self.arch))
        reader = HFReader(hf_dir)
        if self.ctx.is_last_stage and HF_HEAD + "weight" in reader.names():
            head = self.model.output_layer.score
            head.weight.copy_(reader.get(HF_HEAD + "weight").reshape(head.weight.shape))
            head.bias.copy_(reader.get(HF_HEAD + "bias").reshape(head.bias.shape))

    def _read(self, directory, prefix: str, names: list[str]) -> dict[str, Tensor]:
        return load_sharded(
            directory,
            names,
            self.ctx.tp_size,
            self.ctx.tp_rank,
            prefix=prefix,
            padded_vocab_size=self.arch.padded_vocab_size(self.ctx.tp_size),
        )

    # ---- forward ------------------------------------------------------------------------------------

    def _micro_batches(self, lengths: list[int]) -> list[list[int]]:
        """This data-parallel rank's rows grouped by the token budget ([[]]: a rank without rows
        still joins every collective, with one fully masked row)."""
        mine = split_for_data_parallel(lengths, self.ctx.dp_size)[self.ctx.dp_rank]
        if not mine:
            return [[]]
        groups = micro_batches([lengths[i] for i in mine], self.opts.micro_batch_tokens, False)
        return [[mine[j] for j in g] for g in groups]

    def _forward(self, model, batch: TrainBatch):
        tokens = batch.tokens_BL.to(self.ctx.device)
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
        with nvtx_range("critic/forward"):
            return model(tokens, positions, None)  # right padding under the causal mask

    def _run(self, items: list, batches: list[TrainBatch], forward_step, forward_only: bool) -> list:
        """Megatron's schedule over ``items`` (one per micro-batch; ``batches`` give the shapes)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(items),
            model=[self.ddp],
            num_microbatches=len(items),
            seq_length=max(int(b.tokens_BL.shape[1]) for b in batches),
            micro_batch_size=max(b.num_rows for b in batches),
            forward_only=forward_only,
        )

    @staticmethod
    def _values(output: Tensor, width: int) -> Tensor:
        """[B, L, 1] head outputs -> [B, T] values at the target positions, in fp32."""
        return output[:, :width, 0].float()

    @torch.no_grad()
    def compute_values(self, batch: TrainBatch) -> dict | None:
        """Values of every row under the current weights. Returns ``{"rows", "values_BT"}`` for this
        DP rank's rows on reporting ranks, None elsewhere."""
        self.ddp.eval()
        groups = self._micro_batches(batch.lengths_B.tolist())
        items = [(g, batch.select(g or [0])) for g in groups]

        def forward_step(data_iterator, model):
            rows, b = next(data_iterator)
            out = self._forward(model, b)

            def loss_func(output):
                values = self._values(output, b.loss_mask_BT.shape[1])
                return output.sum() * 0.0, torch.tensor(1), {"rows": rows, "values": values.cpu()}

            return out, loss_func

        with nvtx_range("critic/value_pass"):
            outs = self._run(items, [b for _, b in items], forward_step, forward_only=True)
        if not self.reports:
            return None
        width = batch.loss_mask_BT.shape[1]
        done = [o for o in outs if o["rows"]]
        values = [torch.nn.functional.pad(o["values"], (0, width - o["values"].shape[1])) for o in done]
        return {
            "rows": [r for o in done for r in o["rows"]],
            "values_BT": torch.cat(values) if values else torch.zeros(0, width),
        }

    # ---- training -----------------------------------------------------------------------------------

    def train_step(self, cb: CriticBatch, num_tokens: float) -> dict:
        """One optimizer step of the clipped value loss over a mini-batch (``num_tokens``: the
        mini-batch's critic tokens over all ranks). Metrics on reporting ranks are additive over
        data-parallel groups."""
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        items = []
        for g in self._micro_batches(cb.batch.lengths_B.tolist()):
            sub = cb.select(g or [0])
            if not g:
                sub.mask_BT = torch.zeros_like(sub.mask_BT)
            items.append((g, sub))

        def forward_step(data_iterator, model):
            _, sub = next(data_iterator)
            return self._forward(model, sub.batch), functools.partial(self._loss, sub, num_tokens)

        with nvtx_range("critic/forward_backward"):
            outs = self._run(items, [s.batch for _, s in items], forward_step, forward_only=False)
        with nvtx_range("critic/optimizer"):
            step = optimizer_step(
                self.optimizer, self.scheduler, self.optim_cfg.grad_clip, self.optim_cfg.skip_grad_norm_above
            )
        return {
            "metrics": merge_metrics(outs) if self.reports else {},
            "grad_norm": step.grad_norm,
            "skipped": step.skipped,
            "lr": step.lr,
        }

    def _loss(self, sub: CriticBatch, num_tokens: float, output: Tensor):
        dev = output.device
        values = self._values(output, sub.mask_BT.shape[1])
        loss, metrics = self.loss_fn(
            values,
            sub.old_values_BT.to(dev, values.dtype),
            sub.returns_BT.to(dev, values.dtype),
            sub.mask_BT.to(dev, values.dtype),
            num_tokens,
        )
        return loss, torch.tensor(1), {k: v.detach().clone().cpu() for k, v in metrics.items()}


# ---- construction from the run config -------------------------------------------------------------


def critic_optim(cfg) -> OptimConfig:
    """``optim`` with ``critic.lr`` (``min_lr`` scaled by the same factor)."""
    lr = cfg.critic.lr or cfg.optim.lr
    return dataclasses.replace(cfg.optim, lr=lr, min_lr=cfg.optim.min_lr * lr / cfg.optim.lr)


def build_critic(cfg, ctx, arch: ArchConfig, dtype: torch.dtype) -> MegatronCritic:
    """The run's critic (``critic.*``), with its initial weights when ``critic.init`` is a directory
    (``"actor"`` is applied later, by :meth:`MegatronCritic.copy_trunk_from`)."""
    options = CriticOptions(
        spec=cfg.model.layer_spec,
        dtype=dtype,
        micro_batch_tokens=cfg.trainer.micro_batch_tokens,
        recompute=cfg.model.recompute_activations,
        clip=cfg.critic.clip,
    )
    total = cfg.trainer.run_steps * cfg.trainer.updates_per_step
    critic = MegatronCritic(arch, ctx, critic_optim(cfg), total, options)
    if cfg.critic.init != "actor":
        load_initial_weights(critic, Path(cfg.critic.init))
    return critic


def load_initial_weights(critic: MegatronCritic, directory: Path) -> None:
    """A Megatron checkpoint (a critic's, or an actor's trunk) or a Hugging Face directory."""
    if (directory / CRITIC_DIR / "layout.json").is_file():
        directory = directory / CRITIC_DIR  # a training checkpoint's step directory
    if (directory / "layout.json").is_file():
        critic.load_megatron(directory)
    elif (directory / "config.json").is_file():
        critic.load_hf(directory)
    else:
        raise ValueError(
            f"critic.init: {directory} holds neither a sharded checkpoint (layout.json) nor a Hugging "
            "Face model (config.json); point it at one, or use 'actor'"
        )


# ---- checkpoints ------------------------------------------------------------------------------------


def _rules(critic: MegatronCritic) -> dict[str, str]:
    rules = split_rules(trunk_arch(critic.arch), critic.ctx.pp_size)
    return {**rules, HEAD_CANONICAL + "weight": "replicated", HEAD_CANONICAL + "bias": "replicated"}


def _save_tensors(critic: MegatronCritic, directory: Path, by_local: dict[str, Tensor], prefix: str) -> None:
    if critic.ctx.dp_rank != 0:
        return
    names = critic_names(critic.model)
    tensors = {names[n]: t for n, t in by_local.items()}
    save_sharded(directory, tensors, _rules(critic), critic.ctx.tp_rank, critic.ctx.pp_rank, prefix)


def save_critic(critic: MegatronCritic, step_dir: str | Path) -> None:
    """Write ``step_dir/critic`` (collective: every rank calls it)."""
    ctx = critic.ctx
    state, opt_step = optimizer_state_by_name(critic.optimizer, critic.model)
    params = dict(critic.model.named_parameters())
    needs_main = any(state["main_param"][n] is not p for n, p in params.items())
    with atomic_directory(Path(step_dir) / CRITIC_DIR, overwrite=True) as tmp:
        if ctx.rank == 0:
            write_layout(tmp, checkpoint_layout(trunk_arch(critic.arch), ctx.tp_size, ctx.pp_size))
        _save_tensors(critic, tmp, {n: p.detach() for n, p in params.items()}, "model")
        for key in (*MOMENTS, "main_param") if needs_main else MOMENTS:
            _save_tensors(critic, tmp, state[key], f"optim/{key}")
        if ctx.rank == 0:
            record = {"optimizer_step": opt_step, "scheduler": critic.scheduler.state_dict()}
            (tmp / META).write_text(json.dumps(record, indent=1))


def load_critic(critic: MegatronCritic, step_dir: str | Path) -> None:
    """Restore the critic's weights, optimizer and scheduler from ``step_dir/critic`` (any layout)."""
    directory = Path(step_dir) / CRITIC_DIR
    if not (directory / META).is_file():
        raise ValueError(
            f"{directory}: no critic checkpoint; this checkpoint was written by a run without a critic. "
            "Resume it with critic.enabled=false, or start the PPO run from it with model.megatron_checkpoint"
        )
    meta = json.loads((directory / META).read_text())
    critic.load_megatron(directory)
    names = critic_names(critic.model)
    state = {}
    for key in MOMENTS:
        loaded = critic._read(directory, f"optim/{key}", list(names.values()))
        state[key] = {local: loaded[c] for local, c in names.items()}
    if (directory / "optim" / "main_param").is_dir():
        loaded = critic._read(directory, "optim/main_param", list(names.values()))
        state["main_param"] = {local: loaded[c] for local, c in names.items()}
    else:
        state["main_param"] = {n: p.detach().float() for n, p in critic.model.named_parameters()}
    load_optimizer_state(critic.optimizer, critic.model, state, int(meta["optimizer_step"]))
    critic.scheduler.load_state_dict(meta["scheduler"])


# ---- conversion -------------------------------------------------------------------------------------


def export_critic_hf(critic_dir: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """A critic checkpoint (``.../critic``, any layout) -> a Hugging Face
    ``<Arch>ForTokenClassification`` directory with ``num_labels = 1`` (one process, no group)."""
    from safetensors.torch import save_file

    from hpt_megatron.convert import ShardedReader, read_layout
    from hpt_megatron.convert.hf_io import write_config
    from hpt_megatron.convert.mapping import iter_tensors
    from hpt_megatron.convert.offline import arch_from_layout

    critic_dir, output_dir = Path(critic_dir), Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ValueError(
            f"{output_dir} already exists; pass --overwrite (overwrite=True) or choose another directory"
        )
    arch = trunk_arch(arch_from_layout(read_layout(critic_dir), critic_dir))
    reader = ShardedReader(critic_dir, "model")
    tensors = {}
    for bound in iter_tensors(arch):
        for name, t in bound.to_hf(reader.full(bound.megatron), arch):
            tensors[name] = t.contiguous()
    tensors[HF_HEAD + "weight"] = reader.full(HEAD_CANONICAL + "weight").contiguous()
    tensors[HF_HEAD + "bias"] = reader.full(HEAD_CANONICAL + "bias").contiguous()
    config = dict(arch.hf_config)
    config["architectures"] = [arch.architecture.replace("ForCausalLM", "ForTokenClassification")]
    config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    with atomic_directory(output_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_config(config, tmp, next(iter(tensors.values())).dtype)
    return output_dir
