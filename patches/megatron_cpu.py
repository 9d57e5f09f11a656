"""Run Megatron-Core on CPU with the gloo backend.

Megatron-Core assumes CUDA in a few hundred places: ``torch.cuda.current_device()`` as a device
argument, ``tensor.cuda()``, ``device="cuda"`` in factory calls, the CUDA RNG tracker and
``torch.cuda.synchronize()``. Patching module by module would not survive a version bump, so this
patch works at the torch level and is *scoped*: every replacement first looks at the module of its
caller and only redirects calls made from code inside the ``megatron`` package. Code outside megatron
keeps torch's normal behaviour (``x.cuda()`` in user code still raises on a CPU build).

Apply it once, before building a model, with :func:`apply_megatron_cpu_patch`. It does nothing when
CUDA is available, and refuses (:class:`UnsupportedMegatronVersionError`) a megatron-core whose
internals it has not been checked against.

Patched symbols and why:

- ``torch.cuda.current_device``: used as a device argument (rotary ``inv_freq``, pipeline buffers,
  ...); returns the CPU device to megatron callers.
- ``torch.Tensor.cuda``: megatron moves tensors with ``.cuda()`` (e.g. the tied embedding copy on the
  last pipeline stage); returns the tensor itself for megatron callers.
- ``torch.Tensor.type``: the optimizer and grad clipping compare ``tensor.type()`` with CUDA names
  (``'torch.cuda.FloatTensor'``); called without arguments from megatron on a CPU tensor it answers
  with the CUDA name of the same dtype.
- ``torch.empty``, ``zeros``, ``ones``, ``full``, ``tensor``, ``as_tensor``, ``arange``,
  ``empty_like``, ``zeros_like``, ``ones_like``, ``full_like``, ``rand``, ``randn``, ``randint``:
  megatron allocates with ``device="cuda"`` (pipeline token counters, the default causal mask); a
  CUDA device from a megatron caller becomes the CPU. The replacements are Python functions, i.e. new
  objects, and torch recognises its factories by identity in two tables, which the patch keeps valid:

  - ``torch.utils._device._device_constructors()`` (not replaced, only built early): the set of
    factories to which a device context (``with torch.device("meta")``, ``torch.set_default_device``)
    gives its device. It is built lazily, once, and the dispatcher hands the context torch's original
    builtins; built after the replacement it would hold only the wrappers and every factory call
    would ignore the context. (Symptom: transformers' ``from_pretrained`` builds on the CPU instead
    of ``meta``, sees no meta context, initialises at construction and then leaves the
    non-persistent RoPE ``inv_freq`` as the uninitialised ``torch.empty_like`` it swaps in after
    loading: zeros, garbage or NaN.) The patch builds it from the originals before replacing them,
    then checks that ``with torch.device("meta")`` still gives meta tensors, and else undoes the
    factory patch and raises.
  - TorchScript's builtin table (``torch.jit._builtins``, keyed by ``id``): each wrapper is added
    under its original's aten op, so ``torch.jit.script`` still compiles code that calls a factory
    (it would otherwise try, and fail, to script the wrapper).
- ``torch.cuda.synchronize``: called around communication and timers; nothing to wait for on CPU.
- ``torch.cuda.current_stream/default_stream``: the DDP grad buffers (0.19) order their collectives
  against the compute stream; CPU work is synchronous, so a stream whose waits are no-ops is enough.
- ``torch.cuda.get_rng_state/set_rng_state/manual_seed``: the model-parallel RNG tracker seeds and
  swaps CUDA generator states; on CPU the CPU generator is the one that dropout draws from.
- ``megatron.core.tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state``: the tracker's
  private accessors of the CUDA generator (``_set`` is lazily queued on a CPU build, i.e. silently
  dropped); they read and write the CPU generator instead.
- The tracker's "CPU RNG state changed within GPU RNG context" warning is filtered: with the tracker
  mapped onto the CPU generator, that change is the intended behaviour.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

SUPPORTED_MEGATRON_SERIES = ("0.16", "0.19")

_MEGATRON_PACKAGE = "megatron"
_RNG_LOGGER = "megatron.core.tensor_parallel.random"
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"

# torch factory functions that megatron calls with device="cuda".
_FACTORY_FUNCTIONS = (
    "empty",
    "zeros",
    "ones",
    "full",
    "tensor",
    "as_tensor",
    "arange",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "rand",
    "randn",
    "randint",
)

# Megatron-internal symbols the patch replaces or relies on: (module, attribute).
_MEGATRON_SYMBOLS = (
    ("megatron.core.package_info", "__version__"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker"),
    ("megatron.core.tensor_parallel.random", "model_parallel_cuda_manual_seed"),
)

_CPU = torch.device("cpu")
_applied = False


class UnsupportedMegatronVersionError(RuntimeError):
    """The installed megatron-core is not one the CPU patch has been checked against."""


class _CpuStream:
    """Stands in for a CUDA stream: CPU work is synchronous, so every wait is already satisfied."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def record_event(self, event=None):
        return event


_CPU_STREAM = _CpuStream()


class _DropTrackerWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_WARNING not in record.getMessage()


def is_megatron_cpu_patch_applied() -> bool:
    """Whether :func:`apply_megatron_cpu_patch` has patched this process."""
    return _applied


def check_megatron_version() -> str:
    """Return the megatron-core version, or raise if the patch does not recognise it.

    Raises:
        UnsupportedMegatronVersionError: the version is not in ``SUPPORTED_MEGATRON_SERIES`` or one of
            the internal symbols the patch replaces is missing.
    """
    info = importlib.import_module("megatron.core.package_info")
    version = str(info.__version__)
    series = ".".join(version.split(".")[:2])
    if series not in SUPPORTED_MEGATRON_SERIES:
        supported = ", ".join(f"{s}.x" for s in SUPPORTED_MEGATRON_SERIES)
        raise UnsupportedMegatronVersionError(
            f"megatron-core {version} is not supported by the CPU patch (patches/megatron_cpu.py); "
            f"supported: {supported}. Install a supported version (0.16.x on Python 3.11, 0.19.x on 3.12), "
            f"or check the patched symbols against the new version and add its series."
        )
    missing = [f"{mod}.{attr}" for mod, attr in _MEGATRON_SYMBOLS if not _has_symbol(mod, attr)]
    if missing:
        raise UnsupportedMegatronVersionError(
            f"megatron-core {version} lacks symbols the CPU patch replaces: {', '.join(missing)}. "
            f"Supported series: {', '.join(SUPPORTED_MEGATRON_SERIES)}."
        )
    return version


def apply_megatron_cpu_patch(force: bool = False) -> bool:
    """Patch torch so Megatron-Core runs on CPU; idempotent.

    Args:
        force: patch even if CUDA is available (tests only).

    Returns:
        True if the patch is active in this process, False if CUDA is available and it was skipped.
    """
    global _applied
    if torch.cuda.is_available() and not force:
        return False
    check_megatron_version()
    if _applied:
        return True
    _patch_factories()  # first: it checks itself and undoes itself on failure
    _patch_torch_cuda()
    _patch_tensor_cuda()
    _patch_tensor_type()
    _patch_megatron_rng()
    logging.getLogger(_RNG_LOGGER).addFilter(_DropTrackerWarning())
    _applied = True
    return True


def _has_symbol(module: str, attr: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


def _called_from_megatron(depth: int) -> bool:
    """Whether the frame ``depth`` levels above the caller belongs to a megatron module."""
    name = sys._getframe(depth + 1).f_globals.get("__name__", "")
    return name == _MEGATRON_PACKAGE or name.startswith(_MEGATRON_PACKAGE + ".")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


def _scoped(original: Callable, replacement: Callable) -> Callable:
    """Call ``replacement`` for megatron callers and ``original`` for everyone else."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if _called_from_megatron(1):
            return replacement(*args, **kwargs)
        return original(*args, **kwargs)

    return wrapper


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = _scoped(cuda.current_device, lambda: _CPU)
    cuda.synchronize = _scoped(cuda.synchronize, lambda device=None: None)
    cuda.current_stream = _scoped(cuda.current_stream, lambda device=None: _CPU_STREAM)
    cuda.default_stream = _scoped(cuda.default_stream, lambda device=None: _CPU_STREAM)
    cuda.get_rng_state = _scoped(cuda.get_rng_state, lambda device="cuda": torch.get_rng_state())
    cuda.set_rng_state = _scoped(
        cuda.set_rng_state, lambda new_state, device="cuda": torch.set_rng_state(new_state)
    )
    cuda.manual_seed = _scoped(cuda.manual_seed, lambda seed: torch.manual_seed(seed))


def _patch_tensor_cuda() -> None:
    original = torch.Tensor.cuda

    @functools.wraps(original)
    def cuda(self, *args, **kwargs):
        if _called_from_megatron(1):
            return self
        return original(self, *args, **kwargs)

    torch.Tensor.cuda = cuda


def _patch_tensor_type() -> None:
    original = torch.Tensor.type

    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu" or not _called_from_megatron(1):
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_


def _redirect_factory(original: Callable) -> Callable:
    @functools.wraps(original)
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")) and _called_from_megatron(1):
            kwargs["device"] = _CPU
            kwargs.pop("pin_memory", None)  # pinned host memory needs CUDA
        return original(*args, **kwargs)

    return factory


def _patch_factories() -> None:
    originals = {name: getattr(torch, name) for name in _FACTORY_FUNCTIONS}
    # Build torch's cached set of device-context factories now, from the originals: built after the
    # replacement it would hold the wrappers, never the builtins the dispatcher hands the context.
    device_constructors = _device_constructors()
    wrappers = {name: _redirect_factory(original) for name, original in originals.items()}
    for name, wrapper in wrappers.items():
        setattr(torch, name, wrapper)
    try:
        _check_device_context(device_constructors, originals)
    except RuntimeError:
        for name, original in originals.items():
            setattr(torch, name, original)
        raise
    for name, wrapper in wrappers.items():
        _register_script_builtin(wrapper, originals[name])


def _device_constructors() -> set:
    from torch.utils import _device

    return _device._device_constructors()


def _register_script_builtin(wrapper: Callable, original: Callable) -> None:
    """Let TorchScript compile ``wrapper`` as ``original``'s aten op (it looks builtins up by id)."""
    from torch.jit import _builtins

    op = _builtins._find_builtin(original)
    if op is not None:
        _builtins._register_builtin(wrapper, op)


def _check_device_context(device_constructors: set, originals: dict[str, Callable]) -> None:
    """Fail loudly if a device context no longer reaches factory calls (silent garbage otherwise)."""
    lost = sorted(
        name
        for name, original in originals.items()
        if original in device_constructors and original not in _device_constructors()
    )
    with torch.device("meta"):
        probe = torch.empty(0)
    if lost or not probe.is_meta:
        detail = (
            f"torch.utils._device._device_constructors() no longer holds torch.{', torch.'.join(lost)}"
            if lost
            else "torch.empty(0) under torch.device('meta') was not a meta tensor"
        )
        raise RuntimeError(
            "the Megatron CPU patch would break torch's device context (with torch.device(...), "
            f"torch.set_default_device): {detail}. Check patches/megatron_cpu.py against torch "
            f"{torch.__version__}; nothing was patched."
        )


def _patch_megatron_rng() -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state
