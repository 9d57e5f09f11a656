"""The torch_dist checkpoint format as Megatron-LM lays it out, shared by the trainer's checkpoints
(``train.dist_checkpoint``) and the readers of Megatron-LM checkpoints (``convert.megatron_lm``): the
``iter_XXXXXXX`` directories and their tracker file, the completeness check, the model's sharded
state, and loading torch files without arbitrary pickle.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

TRACKER = "latest_checkpointed_iteration.txt"
REQUIRED_FILES = ("metadata.json", ".metadata", "common.pt")


# ---- the Megatron-LM directory layout -----------------------------------------------------------


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def write_tracker(save_dir: str | Path, iteration: int) -> None:
    """Point ``latest_checkpointed_iteration.txt`` at ``iteration`` atomically."""
    save_dir = Path(save_dir)
    tmp = save_dir / f".{TRACKER}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, save_dir / TRACKER)
    fd = os.open(save_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tracked_checkpoint(save_dir: str | Path) -> Path | None:
    """The directory ``latest_checkpointed_iteration.txt`` names (``release`` included), or None."""
    tracker = Path(save_dir) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return Path(save_dir) / "release"
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
    return iteration_dir(save_dir, int(text))


def is_dist_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / "metadata.json").is_file()


def check_complete(directory: str | Path) -> None:
    """Raise ValueError naming the missing files (and the complete checkpoint to use instead)."""
    directory = Path(directory)
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if not missing:
        return
    latest = tracked_checkpoint(directory.parent) if directory.parent.is_dir() else None
    hint = (
        f"; the newest complete checkpoint is {latest} (from {directory.parent / TRACKER})"
        if latest is not None and latest != directory
        else ""
    )
    raise ValueError(
        f"{directory}: incomplete torch_dist checkpoint (missing {', '.join(missing)}): a save was "
        f"interrupted or the directory is not a checkpoint{hint}"
    )


# ---- the model's sharded state ----------------------------------------------------------------


def model_sharded_state(model, keep_extra_state: bool) -> dict:
    """The model's sharded state dict; ``_extra_state`` entries only when asked for (FP8)."""
    state = model.sharded_state_dict()
    if keep_extra_state:
        return state
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def apply_model_state(model, state: dict, directory: Path) -> None:
    """``load_state_dict`` that tolerates only the ``_extra_state`` entries we chose not to store."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{directory}: model state does not match the model: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )


# ---- safe loading -------------------------------------------------------------------------------


class InertGlobal:
    """Stands in for a class or function a pickle names but weights_only loading does not allow:
    construction and state are accepted and dropped; nothing of the original runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        pass


def _stand_in(name: str) -> tuple[type, str]:
    return type(name.rpartition(".")[2], (InertGlobal,), {"__module__": __name__}), name


def safe_torch_load(path: str | Path, mmap: bool = True) -> dict:
    """``torch.load(weights_only=True)`` of a Megatron-LM file: ``argparse.Namespace`` allowed, any
    other non-allow-listed global replaced by an inert stand-in (see the module docstring)."""
    path = Path(path)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    allowed = [argparse.Namespace, *(_stand_in(g) for g in unsafe if g != "argparse.Namespace")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
