"""Worker functions for the torch_dist checkpoint tests (run by ``hpt_megatron.distributed.launch``)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from hpt_megatron.convert import load_model
from hpt_megatron.convert.torch_dist import write_tracker
from hpt_megatron.train.dist_checkpoint import load_dist_checkpoint, save_dist_checkpoint
from tests.dist import actor_workers as W


def _weights(actor) -> dict | None:
    return W._hf_weights(actor)


def save_worker(root: str, kind: str, tp: int, pp: int, ckpt: str) -> dict:
    """One HPT step at (tp, pp) from the converted HF weights, then a torch_dist save."""
    actor = W._actor(root, kind, tp, pp)
    load_model(Path(root) / f"{kind}-mg", actor.model, actor.ctx, actor.arch)
    history = W._train(actor, W.hpt_batch(), 1)
    save_dist_checkpoint(actor, ckpt, {"step": 1, "sampler": {"epoch": 0, "pos": 16}})
    import multiprocessing as mp

    children = [p.name for p in mp.active_children()]  # e.g. a Manager server left behind
    return {
        "history": history,
        "rng": torch.get_rng_state(),
        "weights": _weights(actor),
        "children": children,
    }


def resume_worker(root: str, kind: str, tp: int, pp: int, ckpt: str) -> dict:
    actor = W._actor(root, kind, tp, pp)
    meta = load_dist_checkpoint(actor, ckpt)
    rng = torch.get_rng_state()
    history = W._train(actor, W.hpt_batch(), 1)
    return {"meta": meta, "history": history, "weights": _weights(actor), "rng": rng}


# Points at which interrupted_save_worker dies (os._exit: no cleanup, like kill -9).
KILL_POINTS = ("sharded_write", "before_common", "before_rename", "before_tracker")


def interrupted_save_worker(root: str, kind: str, save_dir: str, point: str) -> dict:
    """Save iteration 1 (tracker -> 1), train a step, then die at ``point`` while saving iteration 2.
    Returns nothing: the process is gone; the test inspects the directory."""
    import megatron.core.dist_checkpointing.serialization as ser

    import hpt_megatron.convert.sharded as sharded
    from hpt_megatron.convert.torch_dist import iteration_dir

    actor = W._actor(root, kind, 1, 1)
    load_model(Path(root) / f"{kind}-mg", actor.model, actor.ctx, actor.arch)
    W._train(actor, W.hpt_batch(), 1)
    save_dist_checkpoint(actor, iteration_dir(save_dir, 1), {"step": 1})
    write_tracker(save_dir, 1)
    torch.save({n: p.detach().clone() for n, p in actor.model.named_parameters()}, f"{save_dir}/expected.pt")
    W._train(actor, W.hpt_batch(), 1)
    die = _die_at(point, ser, sharded)
    save_dist_checkpoint(actor, iteration_dir(save_dir, 2), {"step": 2})
    die("before_tracker")
    write_tracker(save_dir, 2)
    return {"survived": True}


def _die_at(point: str, ser, sharded):
    def die(here: str) -> None:
        if here == point:
            os._exit(9)

    if point == "sharded_write":
        import signal

        import megatron.core.dist_checkpointing.strategies.filesystem_async as fa

        real, rank_pid = fa._write_item, os.getpid()

        @functools.wraps(real)  # the writer inspects its signature
        def dying_write(*args, **kwargs):
            result = real(*args, **kwargs)
            # the shard files are written by a forked writer: kill the rank itself (and the writer)
            # after the first tensor, leaving a half-written shard file
            os.kill(rank_pid, signal.SIGKILL)
            os._exit(9)
            return result

        fa._write_item = dying_write
    if point == "before_common":
        real_save_config = ser.save_config

        def dying_save_config(*args, **kwargs):
            os._exit(9)

        ser.save_config = dying_save_config
        del real_save_config
    if point == "before_rename":
        sharded._commit = lambda tmp, final: os._exit(9)
    return die


def check_worker(root: str, kind: str, save_dir: str) -> dict:
    """Resume from what the tracker names: complete, loadable, the first save's weights."""
    from hpt_megatron.convert.torch_dist import tracked_checkpoint

    path = tracked_checkpoint(save_dir)
    actor = W._actor(root, kind, 1, 1)
    meta = load_dist_checkpoint(actor, path)
    expected = torch.load(f"{save_dir}/expected.pt", weights_only=True)
    same = all(torch.equal(expected[n], p.detach()) for n, p in actor.model.named_parameters())
    return {"path": str(path), "meta": meta, "restored": same}


# ---- kill -9 at a random moment: a process that saves in a loop --------------------------------


def fill_pattern(model, iteration: int) -> None:
    """Every parameter becomes a function of the iteration, so a loaded checkpoint tells which
    iteration's save it holds, element by element."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).view_as(p) * 1e-3 + iteration + i * 1e-1)


def pattern_iteration(model) -> int | None:
    """The iteration whose pattern ``model`` holds exactly, or None when it holds none."""
    first = next(model.parameters())
    k = round(float(first.detach().flatten()[0]))
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    fill_pattern(model, k)
    same = all(torch.equal(expected[n], p.detach()) for n, p in model.named_parameters())
    return k if same else None


def save_loop(root: str, kind: str, save_dir: str) -> None:
    """Save iterations last+1, last+2, ... forever (the test kills it), tracker after each."""
    from hpt_megatron.convert.torch_dist import iteration_dir, tracked_checkpoint

    actor = W._actor(root, kind, 1, 1)
    last = tracked_checkpoint(save_dir)
    k = int(last.name.split("_")[1]) if last is not None else 0
    while True:
        k += 1
        fill_pattern(actor.model, k)
        save_dist_checkpoint(actor, iteration_dir(save_dir, k), {"step": k})
        write_tracker(save_dir, k)


def verify_worker(root: str, kind: str, save_dir: str) -> dict:
    """Load what the tracker names; report its iteration and the pattern's."""
    from hpt_megatron.convert.torch_dist import tracked_checkpoint

    path = tracked_checkpoint(save_dir)
    actor = W._actor(root, kind, 1, 1)
    meta = load_dist_checkpoint(actor, path)
    return {
        "tracked": int(path.name.split("_")[1]),
        "meta_step": meta["step"],
        "pattern": pattern_iteration(actor.model),
    }


if __name__ == "__main__":
    import sys

    save_loop(*sys.argv[1:4])  # a single-process group: init_parallel starts one


# ---- checkpoints in Megatron-LM's structure, written with megatron-core's own APIs ---------------

ITERATION = 100


def _megatron_lm_args(arch, tp: int, pp: int, fmt: str):
    """A slice of the argparse.Namespace Megatron-LM stores as ``args`` (pickled with the file)."""
    import argparse

    return argparse.Namespace(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        params_dtype=torch.float32,
        ckpt_format=fmt,
        iteration=ITERATION,
    )


def _rng_state() -> dict:
    """Megatron-LM's per-rank RNG entry: python, numpy (an ndarray: not weights_only-safe) and torch."""
    import random

    import numpy as np

    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
    }


def megatron_lm_save_worker(root: str, kind: str, tp: int, pp: int, save_dir: str, fmt: str) -> None:
    """A GPTModel with the HF model's weights, saved the way Megatron-LM saves: ``iter_0000100/``
    (torch_dist via dist_checkpointing.save, or legacy mp_rank_XX[_YYY]/model_optim_rng.pt via
    torch.save of state_dict_for_save_checkpoint()), args and RNG included; tracker last."""
    import torch.distributed as dist

    from hpt_megatron.convert import load_hf_model
    from hpt_megatron.distributed import init_parallel
    from hpt_megatron.models import arch_config_from_hf, build_gpt_model

    ctx = init_parallel(tp, pp)
    arch = arch_config_from_hf(Path(root) / kind)
    model = build_gpt_model(arch, ctx, spec="local")
    load_hf_model(Path(root) / kind, model, ctx, arch)
    it_dir = Path(save_dir) / f"iter_{ITERATION:07d}"
    common = {"args": _megatron_lm_args(arch, tp, pp, fmt), "iteration": ITERATION, "checkpoint_version": 3.0}
    if fmt == "torch_dist":
        _save_torch_dist(model, ctx, it_dir, common)
    else:
        rank_dir = it_dir / (f"mp_rank_{ctx.tp_rank:02d}" + (f"_{ctx.pp_rank:03d}" if pp > 1 else ""))
        rank_dir.mkdir(parents=True, exist_ok=True)
        state = {"model": model.state_dict_for_save_checkpoint(), "rng_state": [_rng_state()], **common}
        torch.save(state, rank_dir / "model_optim_rng.pt")
    dist.barrier()
    if ctx.rank == 0:
        (Path(save_dir) / TRACKER_NAME).write_text(str(ITERATION))


TRACKER_NAME = "latest_checkpointed_iteration.txt"


def _save_torch_dist(model, ctx, it_dir: Path, common: dict) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject

    from patches.dcp_sync_save import use_in_process_results_queue

    if ctx.rank == 0:
        it_dir.mkdir(parents=True)
    dist.barrier()
    rng = ShardedObject(
        "rng_state",
        [_rng_state()],
        (ctx.pp_size, ctx.tp_size),
        (ctx.pp_rank, ctx.tp_rank),
        replica_id=ctx.dp_rank,
    )
    state = {"model": model.sharded_state_dict(), "rng_state": rng, **common}
    # megatron-core's default strategy, as Megatron-LM calls it; the in-process results queue only
    # spares the Manager process that would outlive this os._exit-ing worker (same files on disk)
    use_in_process_results_queue()
    dist_checkpointing.save(state, str(it_dir))


def start_from_worker(root: str, kind: str, tp: int, pp: int, path: str) -> dict | None:
    """``model.megatron_checkpoint``: load any Megatron checkpoint into a fresh (randomly initialised)
    model at (tp, pp); return its HF export on rank 0."""
    from hpt_megatron.convert import export_hf_weights
    from hpt_megatron.convert.megatron_lm import load_megatron_weights
    from hpt_megatron.distributed import init_parallel
    from hpt_megatron.models import arch_config_from_hf, build_gpt_model

    ctx = init_parallel(tp, pp)
    arch = arch_config_from_hf(Path(root) / kind)
    model = build_gpt_model(arch, ctx, spec="local")
    found = load_megatron_weights(path, model, ctx, arch)
    pairs = [p for bucket in export_hf_weights(model, ctx, arch, bucket_bytes=1 << 20) for p in bucket]
    return {"kind": found.kind, "weights": {n: t.clone() for n, t in pairs}} if ctx.rank == 0 else None


def resume_error_worker(root: str, kind: str, path: str) -> str:
    """The ValueError of trying to *resume* (full training state) from ``path``."""
    actor = W._actor(root, kind, 1, 1)
    try:
        load_dist_checkpoint(actor, path)
    except ValueError as err:
        return str(err)
    return ""
