"""Read ``torch.distributed.checkpoint`` metadata without arbitrary pickle.

A ``torch_dist`` checkpoint (what ``megatron.core.dist_checkpointing`` writes) keeps its global index
in ``.metadata``, which torch's ``FileSystemReader.read_metadata`` reads with a plain
``pickle.load``: a crafted file could run any code at load time. Tensor items are read with
``torch.load(weights_only=True)`` already, and ``common.pt`` with torch's default (weights_only), so
the metadata file is the one place of a tensor-only checkpoint where pickle can resolve arbitrary
globals.

:func:`restricted_dcp_metadata` (a context manager, scoped to one load) swaps the ``pickle`` module
that ``torch.distributed.checkpoint.filesystem`` uses for one whose ``load`` resolves only the
classes that metadata is made of: the dataclasses and enums of ``torch.distributed.checkpoint``
(``metadata``, ``planner``, ``filesystem._StorageInfo``), ``torch.Size``, torch dtypes / layouts /
memory formats, ``collections.OrderedDict`` and megatron-core's two empty marker classes kept for old
checkpoints. Anything else raises :class:`pickle.UnpicklingError` naming the global. ``dump`` and
every other attribute are the real pickle's, so saving is unaffected.

Checked against torch 2.13 (``FileSystemReader.read_metadata`` calls ``pickle.load(file)``).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import types
from collections.abc import Iterator

import torch

_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
)
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to the torch.layout object
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals DCP metadata is made of (see the module docstring)."""

    def find_class(self, module: str, name: str):
        obj = super().find_class(module, name) if _allowed(module, name) else None
        if obj is None:
            raise pickle.UnpicklingError(
                f"checkpoint metadata refers to {module}.{name}, which is not part of "
                "torch.distributed.checkpoint metadata; refusing to load it (the file may be corrupt "
                "or crafted)"
            )
        return obj


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED:
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype | torch.layout | torch.memory_format)
    return module in _DCP_MODULES and not name.startswith("__")


def restricted_load(file, **_kwargs):
    return RestrictedUnpickler(file).load()


def restricted_loads(data: bytes):
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _shim() -> types.ModuleType:
    shim = types.ModuleType("pickle")
    shim.__dict__.update(pickle.__dict__)
    shim.load, shim.loads, shim.Unpickler = restricted_load, restricted_loads, RestrictedUnpickler
    return shim


@contextlib.contextmanager
def restricted_dcp_metadata() -> Iterator[None]:
    """Within the block, DCP metadata files load through :class:`RestrictedUnpickler`."""
    from torch.distributed.checkpoint import filesystem

    original = filesystem.pickle
    assert original is pickle or isinstance(original, types.ModuleType), original
    filesystem.pickle = _shim()
    try:
        yield
    finally:
        filesystem.pickle = original


__all__ = ["RestrictedUnpickler", "restricted_dcp_metadata"]
