"""Synchronous ``dist_checkpointing`` saves without a multiprocessing Manager process.

megatron-core's ``FileSystemWriterAsync`` (the torch_dist writer; checked in megatron-core 0.16.1) passes
the per-rank write results through a module-global queue that it creates on first use as
``multiprocessing.get_context("spawn").Manager().Queue()``: a spawned server process per rank, made
for asynchronous saves whose writer runs in another process. A synchronous save produces and
consumes those results in the rank's own process, so the server is pure cost (a process start at the
first save) and, worse, it outlives its rank whenever the rank ends without running multiprocessing's
exit handlers (``kill -9``, ``os._exit`` in forked workers, Ray actor teardown): an orphan that
serves an empty queue forever.

:func:`use_in_process_results_queue` sets that global to a ``queue.Queue`` when it is still unset;
the writer only calls ``put`` and ``get_nowait`` on it. Only for synchronous saves: a process that
also saves asynchronously must not call it (a ``queue.Queue`` cannot cross processes). Applied on CPU
and GPU alike, before each save of ``hpt_megatron.train.dist_checkpoint``.
"""

from __future__ import annotations

import queue

_MODULE = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_GLOBAL = "_results_queue"


def use_in_process_results_queue() -> None:
    """Idempotent; raises RuntimeError on a megatron-core without the expected global."""
    import importlib

    module = importlib.import_module(_MODULE)
    if not hasattr(module, _GLOBAL):
        raise RuntimeError(
            f"{_MODULE} has no {_GLOBAL}: this megatron-core differs from the one patches/dcp_sync_save.py "
            "was checked against (0.16.1); review the patch"
        )
    if getattr(module, _GLOBAL) is None:
        setattr(module, _GLOBAL, queue.Queue())
