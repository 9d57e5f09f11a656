"""Actor checkpoints in two formats (``trainer.checkpoint_format``), loaded by detection:

- ``torch_dist`` (the default): megatron-core ``dist_checkpointing`` in Megatron-LM's layout, see
  ``hpt_megatron.train.dist_checkpoint``;
- ``safetensors``: this module, below.

Both hold model, optimizer moments (and fp32 master weights under bf16), LR scheduler, RNG states and
the caller's metadata, load at any TP/PP layout and convert to Hugging Face with ``hpt-convert``.

The safetensors format (the sharded format of ``hpt_megatron.convert``):

    step_dir/
      layout.json                 tp, pp, architecture (written by rank 0)
      model/tpXX-ppYY.safetensors parameters
      optim/exp_avg/..., optim/exp_avg_sq/..., optim/main_param/... (bf16 runs only)
      rng/rank00000.safetensors   per-rank RNG states (restored when the layout is the same)
      meta.json                   step, optimizer step, scheduler state, caller's metadata

Written atomically (a temporary sibling renamed into place): a save killed halfway leaves the
previous checkpoint untouched. No pickle anywhere.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hpt_megatron.convert import atomic_directory, load_model, load_state, read_layout, save_model, save_state
from hpt_megatron.train.optim import MOMENTS, is_distributed, load_optimizer_state, optimizer_state_by_name

META = "meta.json"
FORMATS = ("torch_dist", "safetensors")


def detect_format(directory: str | Path) -> str:
    """``torch_dist`` or ``safetensors``; ValueError naming the directory when it is neither."""
    from hpt_megatron.convert.torch_dist import is_dist_checkpoint

    directory = Path(directory)
    if is_dist_checkpoint(directory):
        return "torch_dist"
    if (directory / META).is_file():
        return "safetensors"
    raise ValueError(
        f"{directory}: not a checkpoint (no metadata.json of a torch_dist checkpoint, no {META} of a "
        "safetensors one); pass an iter_XXXXXXX / step_XXXXXXXX directory, or trainer.resume=auto"
    )


def save_training_checkpoint(actor, directory: str | Path, meta: dict, fmt: str) -> None:
    """Collective save in format ``fmt`` (one of FORMATS)."""
    if fmt == "torch_dist":
        from hpt_megatron.train.dist_checkpoint import save_dist_checkpoint

        save_dist_checkpoint(actor, directory, meta)
    elif fmt == "safetensors":
        save_checkpoint(actor, directory, meta, overwrite=True)
    else:
        raise ValueError(f"trainer.checkpoint_format={fmt!r} is not one of {FORMATS}")


def load_training_checkpoint(actor, directory: str | Path) -> dict:
    """Collective load of a checkpoint of either format; returns the saved metadata."""
    if detect_format(directory) == "torch_dist":
        from hpt_megatron.train.dist_checkpoint import load_dist_checkpoint

        return load_dist_checkpoint(actor, directory)
    return load_checkpoint(actor, directory)


def _refuse_distributed_optimizer(actor, directory: Path) -> None:
    """This format stores whole moments by parameter name; the distributed optimizer holds 1/DP
    shards of flattened buffers, which only torch_dist saves and reshards."""
    if is_distributed(actor.optimizer):
        raise ValueError(
            f"{directory}: the safetensors checkpoint format does not hold the distributed optimizer's "
            "state (optim.distributed=true): set trainer.checkpoint_format=torch_dist, or "
            "optim.distributed=false"
        )


def save_checkpoint(actor, directory: str | Path, meta: dict, overwrite: bool = False) -> None:
    """Every rank calls this (collective); ``meta`` (JSON-able) is written by rank 0."""
    _refuse_distributed_optimizer(actor, Path(directory))
    ctx, arch, model = actor.ctx, actor.arch, actor.model
    state, opt_step = optimizer_state_by_name(actor.optimizer, model)
    params = dict(model.named_parameters())
    # fp32 master weights are worth saving only when they are separate copies (bf16/fp16 params)
    needs_main = any(state["main_param"][n].data_ptr() != p.data_ptr() for n, p in params.items())
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_model(tmp, model, ctx, arch)
        for key in (*MOMENTS, "main_param") if needs_main else MOMENTS:
            save_state(tmp, state[key], model, ctx, arch, f"optim/{key}")
        _save_rng(tmp, ctx)
        if ctx.rank == 0:
            record = {"optimizer_step": opt_step, "scheduler": actor.scheduler.state_dict(), **meta}
            (tmp / META).write_text(json.dumps(record, indent=1))


def load_checkpoint(actor, directory: str | Path) -> dict:
    """Restore model, optimizer and scheduler (any layout); returns the saved metadata."""
    directory = Path(directory)
    _refuse_distributed_optimizer(actor, directory)
    ctx, arch, model = actor.ctx, actor.arch, actor.model
    meta = json.loads((directory / META).read_text())
    load_model(directory, model, ctx, arch)
    state = {k: load_state(directory, model, ctx, arch, f"optim/{k}") for k in MOMENTS}
    if (directory / "optim" / "main_param").is_dir():
        state["main_param"] = load_state(directory, model, ctx, arch, "optim/main_param")
    else:
        state["main_param"] = {n: p.detach().float() for n, p in model.named_parameters()}
    load_optimizer_state(actor.optimizer, model, state, int(meta["optimizer_step"]))
    actor.scheduler.load_state_dict(meta["scheduler"])
    _load_rng(directory, ctx)
    return meta


def _rng_path(directory: Path, rank: int) -> Path:
    return directory / "rng" / f"rank{rank:05d}.safetensors"


def _save_rng(directory: Path, ctx) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    for name, st in get_cuda_rng_tracker().get_states().items():
        states[f"tracker/{name}"] = st
    path = _rng_path(directory, ctx.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in states.items()}, str(path))


def _load_rng(directory: Path, ctx) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    layout = read_layout(directory)
    path = _rng_path(directory, ctx.rank)
    if (layout.tp, layout.pp) != (ctx.tp_size, ctx.pp_size) or not path.exists():
        warnings.warn(
            f"{directory}: saved at tp={layout.tp} pp={layout.pp}, loading at tp={ctx.tp_size} pp={ctx.pp_size}: "
            "RNG states are not restored (runs reseed per step, so results do not depend on them)",
            stacklevel=2,
        )
        return
    states = load_file(str(path))
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])
    tracker = {k.removeprefix("tracker/"): v for k, v in states.items() if k.startswith("tracker/")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
