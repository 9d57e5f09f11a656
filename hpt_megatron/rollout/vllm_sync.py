"""Weight sync into vLLM workers: the wire format and the worker-side extension.

The driver side (vllm_engine.py) packs each export bucket into ONE flat uint8 buffer plus a manifest
of plain lists ``[name, shape, dtype, byte offset]``. The buffer is a file in shared memory
(``/dev/shm``) that the worker maps: vLLM's RPC serializer decodes the arguments of a utility call
without their types, so a tensor argument arrives as a bare ``[dtype, shape, buffer index]`` list
whose buffer is already gone (the "'list' object has no attribute 'dtype'" failure), and pickling
(``VLLM_ALLOW_INSECURE_SERIALIZATION``) is not an option. Only strings, ints and lists cross the RPC.
The worker side is :class:`WeightSyncExtension`, which vLLM mixes into every worker when the engine
is built with ``worker_extension_cls``; the driver calls its methods by name through
``LLM.collective_rpc``:

    hpt_begin_weight_sync()                    vLLM's layer-wise reload: layers back to checkpoint format
    hpt_load_bucket(path, nbytes, entries) x N map the buffer, unpack (views) -> model.load_weights
    hpt_finish_weight_sync()            every layer's post-load processing runs again

Re-running the post-load processing is what makes CPU work: vLLM-CPU repacks each linear layer's
weight into a oneDNN/SGL handle after loading and empties the ``weight`` Parameter, so writing into
the Parameters (``load_weights`` alone, or copying tensors) changes nothing the kernels read. The
layer-wise reload restores each layer's checkpoint-format Parameters, loads, and re-runs
``process_weights_after_loading``, which builds new handles; on CUDA the same calls load in place.
Whatever the platform, only the probe that follows each sync (the engine's log-probs against the
actor's, in cluster/worker.py) proves the engine serves the new weights.

This module is imported inside vLLM's worker processes: keep its imports to torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid

import torch
from torch import Tensor

Entry = list  # [name, shape (list[int]), dtype name ("float32"), byte offset]
_ALIGN = 64  # byte alignment of each tensor in the flat buffer


def bucket_layout(bucket: list[tuple[str, Tensor]]) -> tuple[int, list[Entry]]:
    """Total bytes and the manifest of a bucket packed with 64-byte aligned tensors."""
    entries: list[Entry] = []
    offset = 0
    for name, t in bucket:
        entries.append([name, list(t.shape), str(t.dtype).removeprefix("torch."), offset])
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return offset, entries


def pack_bucket(bucket: list[tuple[str, Tensor]], out: Tensor | None = None) -> tuple[Tensor, list[Entry]]:
    """One flat uint8 tensor (``out``, or a new CPU tensor) holding every tensor of ``bucket``, and
    its manifest."""
    nbytes, entries = bucket_layout(bucket)
    flat = torch.empty(nbytes, dtype=torch.uint8) if out is None else out
    if flat.numel() < nbytes:
        raise ValueError(f"weight sync: a buffer of {flat.numel()} bytes cannot hold a bucket of {nbytes}")
    for (_, t), (_, _, _, start) in zip(bucket, entries):
        n = t.numel() * t.element_size()
        flat[start : start + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return flat, entries


def shared_dir(nbytes: int) -> str:
    """Shared memory (/dev/shm) when it has room for ``nbytes`` (containers often give it 64 MiB),
    else the temporary directory."""
    shm = "/dev/shm"
    if os.path.isdir(shm):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 2 * nbytes:
            return shm
    return tempfile.gettempdir()


class SharedBucket:
    """A packed bucket in a file the vLLM workers map (``with``: the file is removed afterwards)."""

    def __init__(self, bucket: list[tuple[str, Tensor]]):
        self.nbytes, self.entries = bucket_layout(bucket)
        self.path = os.path.join(shared_dir(self.nbytes), f"hpt-weights-{os.getpid()}-{uuid.uuid4().hex}.bin")
        flat = torch.from_file(self.path, shared=True, size=max(self.nbytes, 1), dtype=torch.uint8)
        pack_bucket(bucket, out=flat)
        del flat

    def __enter__(self) -> SharedBucket:
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def map_bucket(path: str, nbytes: int) -> Tensor:
    """The flat buffer of a SharedBucket, mapped copy-on-write (read without copying)."""
    if not os.path.isfile(path) or os.path.getsize(path) < nbytes:
        raise ValueError(f"weight sync: bucket file {path} is missing or shorter than {nbytes} bytes")
    return torch.from_file(path, shared=False, size=max(nbytes, 1), dtype=torch.uint8)[:nbytes]


def unpack_bucket(flat: Tensor, entries: list[Entry]) -> list[tuple[str, Tensor]]:
    """The (name, tensor) views of a packed bucket; raises on a manifest that does not fit ``flat``."""
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError(f"weight sync: a packed bucket is a 1-D uint8 tensor, got {flat.dtype} {list(flat.shape)}")
    out = []
    for name, shape, dtype_name, start in entries:
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"weight sync: tensor {name!r} has unknown dtype {dtype_name!r}")
        numel = 1
        for s in shape:
            numel *= int(s)
        n = numel * torch.empty((), dtype=dtype).element_size()
        if start < 0 or start + n > flat.numel():
            raise ValueError(
                f"weight sync: tensor {name!r} ({n} bytes at offset {start}) overruns its bucket of "
                f"{flat.numel()} bytes"
            )
        out.append((name, flat[start : start + n].view(dtype).view(tuple(int(d) for d in shape))))
    return out


class WeightSyncExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``); ``self`` is the worker."""

    def hpt_begin_weight_sync(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        model = self.model_runner.get_model()
        # the reload warns "<Layer>: Failed to load weights" for layers that have no checkpoint
        # tensor (rotary embeddings, a tied LM head) on every sync; they are expected, and the probe
        # is what proves the sync, so only errors are kept
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        initialize_layerwise_reload(model)
        self._hpt_sync_names = set()

    def hpt_load_bucket(self, path: str, nbytes: int, entries: list[Entry]) -> int:
        """Load one packed bucket (a SharedBucket file); returns how many tensors it held."""
        if getattr(self, "_hpt_sync_names", None) is None:
            raise RuntimeError("weight sync: hpt_load_bucket called before hpt_begin_weight_sync")
        model = self.model_runner.get_model()
        weights = unpack_bucket(map_bucket(path, nbytes), entries)
        model.load_weights(weights=weights)
        self._hpt_sync_names.update(name for name, _ in weights)
        return len(weights)

    def hpt_finish_weight_sync(self) -> int:
        """Run the post-load processing of every layer; returns the number of tensors loaded."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        names = getattr(self, "_hpt_sync_names", None)
        if names is None:
            raise RuntimeError("weight sync: hpt_finish_weight_sync called before hpt_begin_weight_sync")
        model = self.model_runner.get_model()
        finalize_layerwise_reload(model, self.model_config)
        _refresh_cpu_gemm_handles(model)
        self._hpt_sync_names = None
        return len(names)


def _refresh_cpu_gemm_handles(model) -> None:
    """vLLM-CPU: rebuild the prepacked GEMM handle of every layer that kept its weight (embeddings,
    and the LM head that a tied model shares with them). The layer-wise reload re-processes layers
    whose own weights arrived; a tied LM head receives none (``lm_head.weight`` is not in the
    checkpoint), so its handle would still multiply by the old embedding - measured: log-probs off
    by up to 0.037 after one perturbed sync of a tied Qwen2."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.numel() and method is not None:
            method.process_weights_after_loading(module)
