"""Process groups for tensor / pipeline / data parallelism, passed around explicitly.

``init_parallel`` initialises ``torch.distributed`` (if needed) and Megatron-Core's ``parallel_state``
and returns a frozen :class:`ParallelContext`; library code takes that context as an argument instead
of reading megatron's globals. ``launch`` runs a function in N local processes (gloo on CPU) and is
what the multi-process tests use.

Rank layout is Megatron's default order ``tp-cp-ep-dp-pp``: TP ranks are adjacent, PP is outermost.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class ParallelContext:
    """Ranks, sizes and process groups of one process.

    ``tp_ranks`` / ``pp_ranks`` are the global ranks of this process's TP and PP groups, in group
    order (``pp_ranks[s]`` is the global rank holding stage ``s`` with the same TP/DP coordinates).
    """

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    tp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]
    backend: str
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``nccl`` with CUDA, ``gloo`` otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def init_parallel(tp: int = 1, pp: int = 1, backend: str = "auto", seed: int = 1234) -> ParallelContext:
    """Initialise torch.distributed and megatron's model-parallel state; return the context.

    Reads the usual ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` environment (torchrun,
    srun wrappers, :func:`launch`); without it, starts a single-process group. On a machine without
    CUDA it applies the Megatron CPU patch. ``seed`` seeds megatron's model-parallel RNG tracker.

    Raises:
        ValueError: ``tp * pp`` does not divide the world size, or megatron is already initialised
            with different sizes.
    """
    from megatron.core import parallel_state, tensor_parallel

    backend = resolve_backend(backend)
    if not torch.cuda.is_available():
        from patches import apply_megatron_cpu_patch

        apply_megatron_cpu_patch()
    _init_process_group(backend)
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp) != 0:
        raise ValueError(
            f"tp={tp} x pp={pp} must divide the world size {world}; choose tp and pp whose product "
            f"divides the number of processes"
        )
    if parallel_state.model_parallel_is_initialized():
        _check_existing(parallel_state, tp, pp)
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return _context(parallel_state, backend)


def destroy_parallel() -> None:
    """Tear down megatron's parallel state and the default process group (if initialised)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _init_process_group(backend: str) -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))


def _check_existing(parallel_state, tp: int, pp: int) -> None:
    have = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if have != (tp, pp):
        raise ValueError(
            f"megatron is already initialised with (tp, pp)={have}, asked for {(tp, pp)}; "
            f"call destroy_parallel() first"
        )


def _group_ranks(group) -> tuple[int, ...]:
    return tuple(dist.get_global_rank(group, r) for r in range(dist.get_world_size(group)))


def _context(ps, backend: str) -> ParallelContext:
    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_group=tp_group,
        pp_group=pp_group,
        dp_group=ps.get_data_parallel_group(),
        tp_ranks=_group_ranks(tp_group),
        pp_ranks=_group_ranks(pp_group),
        backend=backend,
        device=device,
    )


# ----------------------------------------------------------------------------------------------
# Local multi-process launcher (tests, CPU runs)
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = 300.0,
    threads_per_process: int = 1,
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` local processes; return their results ordered by rank.

    Each process gets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` so ``fn`` can call
    :func:`init_parallel`. ``fn`` must be importable (module level) and its result picklable.
    Processes are forked from a fork server (a clean single-threaded process that has imported torch
    and megatron once), which keeps start-up cheap and avoids forking a multi-threaded parent.

    Raises:
        RuntimeError: a process raised (its traceback is included), died, or ran past ``timeout_s``.
    """
    ctx = _forkserver_context()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world_size)}
    queue = ctx.SimpleQueue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, args, {**env, "RANK": str(r), "LOCAL_RANK": str(r)}, threads_per_process, queue),
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        results = _collect(queue, procs, timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    return [results[r] for r in range(world_size)]


_FORKSERVER_PRELOAD = ["torch", "megatron.core.models.gpt", "megatron.core.pipeline_parallel"]


def _forkserver_context():
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ctx


def _worker(fn, args, env, threads, queue) -> None:
    os.environ.update(env)
    torch.set_num_threads(threads)
    rank = int(env["RANK"])
    try:
        # Plain pickle copies tensors; torch's queue reducers would share them through file
        # descriptors that die with this process.
        payload = pickle.dumps(fn(*args))
        queue.put((rank, True, payload))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            destroy_parallel()


def _collect(queue, procs, timeout_s: float) -> dict[int, Any]:
    deadline = time.monotonic() + timeout_s
    results: dict[int, Any] = {}
    while len(results) < len(procs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"launch: timed out after {timeout_s:.0f}s; finished ranks {sorted(results)}")
        if queue.empty():
            dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in results]
            if dead and queue.empty():
                time.sleep(0.2)
                if queue.empty():
                    codes = {i: procs[i].exitcode for i in dead}
                    raise RuntimeError(f"launch: ranks {dead} exited without a result (exit codes {codes})")
            time.sleep(0.05)
            continue
        rank, ok, value = queue.get()
        if not ok:
            raise RuntimeError(f"launch: rank {rank} failed:\n{value}")
        results[rank] = pickle.loads(value)
    return results
