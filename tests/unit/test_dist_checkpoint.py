"""The Megatron-LM directory layout, completeness checks and the pickle-free loaders (no process group;
the multi-process save/load/reshard/kill tests are in tests/dist/test_dist_checkpoint.py)."""

from __future__ import annotations

import argparse
import enum
import io
import os
import pickle

import numpy as np
import pytest
import torch

from hpt_megatron.convert.megatron_lm import find_checkpoint
from hpt_megatron.convert.torch_dist import (
    TRACKER,
    InertGlobal,
    check_complete,
    iteration_dir,
    safe_torch_load,
    tracked_checkpoint,
    write_tracker,
)
from hpt_megatron.train.checkpoint import detect_format
from hpt_megatron.trainer import latest_checkpoint
from patches.dcp_safe_metadata import restricted_dcp_metadata


def _fake_dist_checkpoint(directory, files=("metadata.json", ".metadata", "common.pt")):
    directory.mkdir(parents=True)
    for f in files:
        (directory / f).write_text("{}")
    return directory


def test_iteration_dirs_and_tracker_follow_megatron_lm(tmp_path):
    assert iteration_dir(tmp_path, 10).name == "iter_0000010"
    assert tracked_checkpoint(tmp_path) is None
    write_tracker(tmp_path, 10)
    assert (tmp_path / TRACKER).read_text() == "10\n"
    assert tracked_checkpoint(tmp_path) == tmp_path / "iter_0000010"
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed over the tracker
    (tmp_path / TRACKER).write_text("release")
    assert tracked_checkpoint(tmp_path) == tmp_path / "release"
    (tmp_path / TRACKER).write_text("ten")
    with pytest.raises(ValueError, match=f"{TRACKER}: expected an iteration number"):
        tracked_checkpoint(tmp_path)


def test_an_incomplete_directory_is_refused_naming_the_complete_one(tmp_path):
    _fake_dist_checkpoint(tmp_path / "iter_0000001")
    write_tracker(tmp_path, 1)
    broken = _fake_dist_checkpoint(tmp_path / "iter_0000002", files=("metadata.json",))
    with pytest.raises(ValueError) as err:
        check_complete(broken)
    message = str(err.value)
    assert "iter_0000002: incomplete torch_dist checkpoint (missing .metadata, common.pt)" in message
    assert "newest complete checkpoint is" in message and "iter_0000001" in message
    check_complete(tmp_path / "iter_0000001")  # complete: no error


def test_latest_checkpoint_takes_the_newest_of_either_format(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) is None
    _fake_dist_checkpoint(root / "iter_0000004")
    write_tracker(root, 4)
    (root / "step_00000006").mkdir()
    (root / "latest").write_text("step_00000006\n")
    assert latest_checkpoint(tmp_path) == root / "step_00000006"
    _fake_dist_checkpoint(root / "iter_0000008")
    write_tracker(root, 8)
    assert latest_checkpoint(tmp_path) == root / "iter_0000008"
    # a partial save is never a candidate, whatever its number
    _fake_dist_checkpoint(root / ".iter_0000009.partial")
    assert latest_checkpoint(tmp_path) == root / "iter_0000008"


def test_formats_are_detected_and_unknown_directories_named(tmp_path):
    assert detect_format(_fake_dist_checkpoint(tmp_path / "a")) == "torch_dist"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "meta.json").write_text("{}")
    assert detect_format(tmp_path / "b") == "safetensors"
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match=r"c: not a checkpoint \(no metadata.json"):
        detect_format(tmp_path / "c")
    with pytest.raises(ValueError, match=r"c: not a Megatron checkpoint: expected layout\.json"):
        find_checkpoint(tmp_path / "c")
    legacy = tmp_path / "save" / "iter_0000005"
    (legacy / "mp_rank_00").mkdir(parents=True)
    write_tracker(tmp_path / "save", 5)
    found = find_checkpoint(tmp_path / "save")  # a save directory: its tracker picks the iteration
    assert (found.kind, found.directory) == ("legacy", legacy)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


def test_dcp_metadata_with_a_foreign_global_is_refused(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with restricted_dcp_metadata(), pytest.raises(pickle.UnpicklingError, match=r"refers to posix\.system"):
        FileSystemReader(str(tmp_path)).read_metadata()
    # outside the block torch's reader is untouched
    from torch.distributed.checkpoint import filesystem

    assert filesystem.pickle is pickle


class Mode(enum.Enum):
    TRAIN = 1


def test_legacy_files_load_weights_only_with_inert_stand_ins(tmp_path):
    """What Megatron-LM's model_optim_rng.pt holds besides tensors: args (Namespace), numpy RNG
    state, enums, BytesIO extra state. Tensors and Namespace come back; the rest is inert."""
    path = tmp_path / "model_optim_rng.pt"
    weight = torch.randn(3, 4)
    torch.save(
        {
            "model": {"decoder.final_layernorm.weight": weight, "x._extra_state": io.BytesIO(b"te")},
            "args": argparse.Namespace(tensor_model_parallel_size=2, mode=Mode.TRAIN),
            "rng_state": [{"np_rng_state": np.random.get_state()}],
            "iteration": 7,
        },
        path,
    )
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # torch's default refuses these globals
    state = safe_torch_load(path)
    assert torch.equal(state["model"]["decoder.final_layernorm.weight"], weight)
    assert state["args"].tensor_model_parallel_size == 2 and state["iteration"] == 7
    assert isinstance(state["args"].mode, InertGlobal)
    extra = state["model"]["x._extra_state"]
    if any(name.endswith(".BytesIO") for name in unsafe):
        assert isinstance(extra, InertGlobal)
    else:  # megatron-core adds BytesIO to torch's allow-list when imported (megatron.core.safe_globals)
        assert isinstance(extra, io.BytesIO) and extra.getvalue() == b"te"
