"""The sharded checkpoint format: resharding on load, atomic writes, errors. Single process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hpt_megatron.convert.sharded import (
    ShardLayout,
    atomic_directory,
    load_sharded,
    read_layout,
    save_sharded,
    shard_file,
    write_layout,
)

PADDED = {1: 384, 2: 512, 4: 512}  # vocab 300 padded to a multiple of 128 * tp
RULES = {
    "col": "column",
    "row": "row",
    "glu": "glu",
    "emb": "vocab",
    "norm": "replicated",
    "step": "replicated",
}


def _full_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.cat([torch.randn(300, 8, generator=g), torch.zeros(84, 8)])  # vocab 300 padded to 384
    return {
        "col": torch.randn(16, 8, generator=g),
        "row": torch.randn(8, 16, generator=g),
        "glu": torch.randn(32, 8, generator=g),
        "emb": emb,
        "norm": torch.randn(8, generator=g),
        "step": torch.tensor(3.0),
    }


def _save(directory: Path, full: dict, tp: int, padded: int) -> None:
    """Save ``full`` as ``tp`` ranks would, each holding its own slice (sliced by hand here)."""
    write_layout(directory, ShardLayout(tp=tp, pp=1, vocab_size=300, padded_vocab_size=padded))
    emb = torch.cat([full["emb"][:300], torch.zeros(padded - 300, 8)])
    for r in range(tp):
        gate, up = full["glu"].chunk(2)
        local = {
            "col": full["col"].chunk(tp)[r],
            "row": full["row"].chunk(tp, dim=1)[r],
            "glu": torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]),
            "emb": emb.chunk(tp)[r],
            "norm": full["norm"],
            "step": full["step"],
        }
        save_sharded(directory, local, RULES, tp_rank=r, pp_rank=0, prefix="optim/exp_avg")


def _load_full(directory: Path, tp: int, padded: int) -> dict:
    ranks = [load_sharded(directory, RULES, tp, r, "optim/exp_avg", padded) for r in range(tp)]
    gates = [rk["glu"].chunk(2) for rk in ranks]
    return {
        "col": torch.cat([rk["col"] for rk in ranks]),
        "row": torch.cat([rk["row"] for rk in ranks], dim=1),
        "glu": torch.cat([g[0] for g in gates] + [g[1] for g in gates]),
        "emb": torch.cat([rk["emb"] for rk in ranks]),
        "norm": ranks[-1]["norm"],
        "step": ranks[-1]["step"],
    }


@pytest.mark.parametrize("src_tp,dst_tp", [(2, 1), (1, 2), (2, 4), (4, 2), (2, 2)])
def test_load_at_another_tp(tmp_path, src_tp, dst_tp):
    full = _full_tensors()
    _save(tmp_path, full, src_tp, PADDED[src_tp])
    dst_padded = PADDED[dst_tp]
    got = _load_full(tmp_path, dst_tp, dst_padded)
    for name in ("col", "row", "glu", "norm", "step"):
        assert torch.equal(got[name], full[name]), name
    assert got["emb"].shape == (dst_padded, 8)
    assert torch.equal(got["emb"][:300], full["emb"][:300]) and not got["emb"][300:].any()


def test_files_are_safetensors_and_json_with_rules(tmp_path):
    _save(tmp_path, _full_tensors(), 2, 512)
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert layout["format"] == "hpt_megatron.sharded" and layout["tp"] == 2
    with safe_open(str(shard_file(tmp_path, "optim/exp_avg", 1, 0)), framework="pt") as f:
        assert json.loads(f.metadata()["rules"]) == RULES
    suffixes = {p.suffix for p in tmp_path.rglob("*") if p.is_file()}
    assert suffixes == {".json", ".safetensors"}


def test_missing_tensor_is_named(tmp_path):
    _save(tmp_path, _full_tensors(), 1, 384)
    with pytest.raises(ValueError, match=r"missing tensors \['nope'\]"):
        load_sharded(tmp_path, ["col", "nope"], 1, 0, "optim/exp_avg")
    got = load_sharded(tmp_path, ["alias"], 1, 0, "optim/exp_avg", aliases={"alias": "col"})
    assert torch.equal(got["alias"], _full_tensors()["col"])


def test_save_needs_a_rule_for_every_tensor(tmp_path):
    with pytest.raises(ValueError, match="no split rule for tensors \\['x'\\]"):
        save_sharded(tmp_path, {"x": torch.ones(1)}, {}, 0, 0)


def _checkpoint(final: Path, seed: int, overwrite: bool = False, fail_after_first: bool = False) -> None:
    full = _full_tensors(seed)
    with atomic_directory(final, overwrite=overwrite) as tmp:
        write_layout(tmp, ShardLayout(tp=2, pp=1, vocab_size=300, padded_vocab_size=512))
        save_sharded(tmp, {"col": full["col"][:8]}, RULES, 0, 0)
        if fail_after_first:
            raise RuntimeError("killed mid-write")
        save_sharded(tmp, {"col": full["col"][8:]}, RULES, 1, 0)


def test_exception_mid_write_keeps_previous_checkpoint(tmp_path):
    final = tmp_path / "ckpt"
    _checkpoint(final, seed=0)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        _checkpoint(final, seed=1, overwrite=True, fail_after_first=True)
    assert torch.equal(load_sharded(final, ["col"], 1, 0)["col"], _full_tensors(0)["col"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    _checkpoint(final, seed=1, overwrite=True)
    assert torch.equal(load_sharded(final, ["col"], 1, 0)["col"], _full_tensors(1)["col"])


def test_killed_process_mid_write_keeps_previous_checkpoint(tmp_path):
    """A hard kill (os._exit, no cleanup) after the first rank file: the old checkpoint still loads."""
    final = tmp_path / "ckpt"
    _checkpoint(final, seed=0)
    script = textwrap.dedent(
        f"""
        import os
        from hpt_megatron.convert.safetensors_stream import StreamingSafetensorsWriter
        real = StreamingSafetensorsWriter.close
        def dying(self):
            real(self)
            os._exit(9)
        StreamingSafetensorsWriter.close = dying
        from tests.unit.test_sharded_checkpoint import _checkpoint
        from pathlib import Path
        _checkpoint(Path({str(final)!r}), seed=1, overwrite=True)
        """
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=_env(root), capture_output=True, text=True
    )
    assert proc.returncode == 9, proc.stderr
    assert (tmp_path / ".ckpt.partial").exists()  # the half-written attempt
    assert torch.equal(load_sharded(final, ["col"], 1, 0)["col"], _full_tensors(0)["col"])
    _checkpoint(final, seed=2, overwrite=True)  # the next save cleans up and succeeds
    assert torch.equal(load_sharded(final, ["col"], 1, 0)["col"], _full_tensors(2)["col"])
    assert not (tmp_path / ".ckpt.partial").exists()


def _env(root: Path) -> dict:
    import os

    return {**os.environ, "PYTHONPATH": f"{root}:{os.environ.get('PYTHONPATH', '')}"}


def test_existing_directory_needs_overwrite(tmp_path):
    final = tmp_path / "ckpt"
    _checkpoint(final, seed=0)
    with pytest.raises(ValueError, match="already exists; pass overwrite"):
        _checkpoint(final, seed=1)


def test_layout_file_is_required(tmp_path):
    with pytest.raises(ValueError, match=r"layout\.json: missing"):
        read_layout(tmp_path)


def test_interrupted_overwrite_points_to_the_previous_checkpoint(tmp_path):
    """A crash between the two renames of an overwrite leaves the old copy aside; say where."""
    final = tmp_path / "ckpt"
    _checkpoint(final, seed=0)
    final.rename(tmp_path / ".ckpt.old")
    with pytest.raises(
        ValueError, match=r"overwrite was interrupted: the previous checkpoint is in .*\.ckpt\.old"
    ):
        read_layout(final)
