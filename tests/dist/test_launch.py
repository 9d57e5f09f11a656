"""The local multi-process launcher: results by rank, errors with the failing rank's traceback."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hpt_megatron.distributed import launch

pytestmark = pytest.mark.dist


def _all_reduce_rank() -> tuple[int, float]:
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_rank_one() -> None:
    import os

    if os.environ["RANK"] == "1":
        raise KeyError("boom on rank one")


def test_results_are_ordered_by_rank():
    assert launch(_all_reduce_rank, 3) == [(0, 6.0), (1, 6.0), (2, 6.0)]


def test_failure_reports_rank_and_traceback():
    with pytest.raises(RuntimeError, match="rank 1 failed:(.|\n)*KeyError: 'boom on rank one'"):
        launch(_fail_on_rank_one, 2)


def test_parallel_context_ranks_and_groups():
    from tests.dist.megatron_workers import context_worker

    results = launch(context_worker, 4, args=(2, 2))
    for r, ctx in enumerate(results):
        assert (ctx["rank"], ctx["tp_rank"], ctx["pp_rank"], ctx["dp_rank"]) == (r, r % 2, r // 2, 0)
        assert ctx["tp_ranks"] == (r - r % 2, r - r % 2 + 1) and ctx["pp_ranks"] == (r % 2, r % 2 + 2)


def test_layout_not_dividing_world_size():
    from tests.dist.megatron_workers import context_worker

    with pytest.raises(RuntimeError, match="tp=2 x pp=2 must divide the world size 2"):
        launch(context_worker, 2, args=(2, 2))
