"""Training checkpoints with ``megatron.core.dist_checkpointing`` (torch_dist) in Megatron-LM's layout.

    <save dir>/
      latest_checkpointed_iteration.txt   the iteration of the newest complete checkpoint
      iter_0000010/                       one dist_checkpointing directory per saved iteration
        metadata.json                     backend names (written by megatron-core)
        .metadata, __R_T.distcp           torch.distributed.checkpoint index and shards
        common.pt                         the non-sharded state (rank 0; loads with weights_only)

What a checkpoint holds, under Megatron-LM's state-dict keys where Megatron-LM has one:

- ``model``: the GPTModel's ``sharded_state_dict()`` (global keys such as
  ``decoder.layers.self_attention.linear_qkv.weight`` with the layer axis in front), so it reshards
  to any TP/PP/DP layout on load;
- ``optimizer``: megatron-core's optimizer ``sharded_state_dict`` (Adam moments and, under bf16, the
  fp32 master weights, keyed ``optimizer.state.exp_avg.<model key>``: they reshard like the model);
  the distributed optimizer (``optim.distributed``) gathers its 1/DP shards into the same
  per-parameter form (``fully_reshardable``) and resumes at any TP/PP/DP layout, but only into a
  distributed optimizer (``hpt.distributed_optimizer`` records which kind saved);
- ``opt_param_scheduler``, ``iteration``, ``checkpoint_version`` (common state);
- ``hpt_rng_state``: per-rank RNG states as uint8 ShardedTensors over the (pp, tp, dp) grid, no pickle
  (Megatron-LM keeps ``rng_state`` as a pickled ShardedObject); restored when the layout is the same;
- ``hpt``: this project's state: the caller's metadata (step, data-sampler position, bad-step count),
  the saved layout, the model's Hugging Face config (so ``hpt-convert`` needs nothing else).

Atomic: every rank writes into ``.iter_XXXXXXX.partial`` (a sibling), rank 0 fsyncs and renames it into
place; then the tracker file is replaced (write a temporary file, fsync, ``os.replace``). A save killed
at any moment leaves the tracker naming the previous complete checkpoint. The layer-spec's
``_extra_state`` objects (pickled by torch on load) are kept only for FP8 models, whose scaling state
they hold; otherwise they are empty and left out, so loading these checkpoints unpickles nothing but
the restricted DCP metadata (``patches.dcp_safe_metadata``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hpt_megatron.convert.torch_dist import (
    apply_model_state,
    check_complete,
    model_sharded_state,
    safe_torch_load,
)
from hpt_megatron.train.optim import init_distributed_state, is_distributed

FORMAT_NAME = "torch_dist"
FORMAT_VERSION = 1
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version
RNG_KEY = "hpt_rng_state"


@dataclass(frozen=True)
class SavedLayout:
    tp: int
    pp: int
    dp: int

    @classmethod
    def of(cls, ctx) -> SavedLayout:
        return cls(ctx.tp_size, ctx.pp_size, ctx.dp_size)


# ---- building the sharded state -----------------------------------------------------------------


def _rng_states() -> dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    states.update({f"tracker.{k}": v for k, v in get_cuda_rng_tracker().get_states().items()})
    return {k: v.detach().cpu().contiguous() for k, v in states.items()}


def _rng_sharded(states: dict[str, torch.Tensor], ctx) -> dict:
    """One uint8 ShardedTensor per generator; every rank owns its cell of the (pp, tp, dp) grid."""
    from megatron.core.dist_checkpointing import ShardedTensor

    grid = ((0, ctx.pp_rank, ctx.pp_size), (1, ctx.tp_rank, ctx.tp_size), (2, ctx.dp_rank, ctx.dp_size))
    return {
        name: ShardedTensor.from_rank_offsets(f"{RNG_KEY}.{name}", t, *grid, replica_id=0, prepend_axis_num=3)
        for name, t in states.items()
    }


def _restore_rng(states: dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])
    tracker = {k.removeprefix("tracker."): v for k, v in states.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)


def _leaf_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def optimizer_has_state(optimizer) -> bool:
    """Whether Adam has taken a step (its moments exist); before that there is nothing to save."""
    return any(len(opt.optimizer.state) > 0 for opt in _leaf_optimizers(optimizer))


# The distributed optimizer's checkpoint form: its shards gathered into per-parameter tensors keyed
# like the replicated optimizer's, so a checkpoint reshards to any TP/PP/DP layout (its param groups
# still differ from the replicated optimizer's: see _check_optimizer_kind). megatron-core 0.16's
# parallel form ('fully_sharded_model_space') builds flattened-range ShardedTensors that its own
# dist_checkpointing rejects; 'dp_reshardable' would tie the checkpoint to the saved TP/PP layout.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _keep_extra_state(actor) -> bool:
    return bool(getattr(actor.model.config, "fp8", None))


def _save_state(actor, meta: dict) -> dict:
    ctx = actor.ctx
    model = model_sharded_state(actor.model, _keep_extra_state(actor))
    with_optim = optimizer_has_state(actor.optimizer)
    state = {
        "model": model,
        "iteration": int(meta.get("step", 0)),
        "checkpoint_version": CHECKPOINT_VERSION,
        "opt_param_scheduler": actor.scheduler.state_dict(),
        RNG_KEY: _rng_sharded(_rng_states(), ctx),
        "hpt": {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "layout": asdict(SavedLayout.of(ctx)),
            "optimizer_state": with_optim,
            "distributed_optimizer": is_distributed(actor.optimizer),
            "hf_config": actor.arch.hf_config,
            "meta": meta,
        },
    }
    if with_optim:
        state["optimizer"] = actor.optimizer.sharded_state_dict(model, metadata=OPTIMIZER_METADATA)
    return state


def _save_strategy():
    """torch_dist with megatron-core's defaults on GPU; one writer process per rank on CPU (each
    extra writer is a fork of a rank that holds gloo threads)."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=2 if torch.cuda.is_available() else 1)


# ---- save / load ----------------------------------------------------------------------------------


def save_dist_checkpoint(actor, directory: str | Path, meta: dict, overwrite: bool = True) -> None:
    """Collective: every rank calls it. ``directory`` is the final ``iter_XXXXXXX`` path; ``meta``
    (JSON-able, the same on every rank) is stored in the common state. The caller updates the
    tracker afterwards (:func:`write_tracker`), so the tracker only ever names complete directories."""
    from megatron.core import dist_checkpointing

    from hpt_megatron.convert import atomic_directory
    from patches.dcp_sync_save import use_in_process_results_queue

    use_in_process_results_queue()  # no Manager process that could outlive this rank
    state = _save_state(actor, meta)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy())


def load_common(directory: str | Path) -> dict:
    """``common.pt`` with ``torch.load(weights_only=True)``: ours holds plain containers and tensors;
    a Megatron-LM one (``args`` Namespace ...) loads with inert stand-ins, so it can be recognised."""

    check_complete(directory)
    return safe_torch_load(Path(directory) / "common.pt", mmap=False)


def load_dist_checkpoint(actor, directory: str | Path) -> dict:
    """Restore model, optimizer, scheduler (any TP/PP/DP layout) and, at the saved layout, the RNG
    states; returns the saved metadata."""
    directory = Path(directory)
    common = load_common(directory)
    hpt = common.get("hpt")
    if not isinstance(hpt, dict) or hpt.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{directory}: a torch_dist checkpoint without this project's training state (common.pt has "
            "no 'hpt' entry), e.g. one written by Megatron-LM: start from its weights with "
            f"model.megatron_checkpoint={directory} instead of trainer.resume"
        )
    _check_optimizer_kind(directory, hpt, actor.optimizer)
    same_layout = SavedLayout(**hpt["layout"]) == SavedLayout.of(actor.ctx)
    loaded = _load_sharded(actor, directory, hpt["optimizer_state"], same_layout)
    apply_model_state(actor.model, loaded["model"], directory)
    if hpt["optimizer_state"]:
        from patches.dist_optimizer_state import keep_adam_step_on_load

        keep_adam_step_on_load()
        actor.optimizer.load_state_dict(loaded["optimizer"])
    actor.scheduler.load_state_dict(common["opt_param_scheduler"])
    if same_layout:
        _restore_rng(loaded[RNG_KEY])
    else:
        warnings.warn(
            f"{directory}: saved at {hpt['layout']}, loading at {asdict(SavedLayout.of(actor.ctx))}: RNG "
            "states are not restored (runs reseed per step, so results do not depend on them)",
            stacklevel=2,
        )
    return hpt["meta"]


def _check_optimizer_kind(directory: Path, hpt: dict, optimizer) -> None:
    """The two optimizers' states differ in megatron-core's form (param groups, step), so a
    checkpoint with optimizer state resumes only into the kind of optimizer that wrote it."""
    saved = bool(hpt.get("distributed_optimizer", False))
    if hpt["optimizer_state"] and saved != is_distributed(optimizer):
        raise ValueError(
            f"{directory}: saved with optim.distributed={str(saved).lower()}, resuming with "
            f"optim.distributed={str(not saved).lower()}: set optim.distributed={str(saved).lower()} to "
            "resume (the distributed optimizer's state reshards to any TP/PP/DP layout, but not into the "
            "replicated optimizer or back)"
        )


def _load_sharded(actor, directory: Path, with_optim: bool, same_layout: bool) -> dict:
    from megatron.core import dist_checkpointing

    from patches.dcp_safe_metadata import restricted_dcp_metadata

    model = model_sharded_state(actor.model, _keep_extra_state(actor))
    request = {"model": model}
    if with_optim:
        init_distributed_state(actor.optimizer)
        request["optimizer"] = actor.optimizer.sharded_state_dict(
            model, is_loading=True, metadata=OPTIMIZER_METADATA
        )
    if same_layout:
        request[RNG_KEY] = _rng_sharded(_rng_states(), actor.ctx)
    with restricted_dcp_metadata():
        return dist_checkpointing.load(request, str(directory))
