"""The Megatron CPU patch: version gate, scoping to megatron callers, idempotence."""

from __future__ import annotations

import importlib

import pytest
import torch

from patches import (
    UnsupportedMegatronVersionError,
    apply_megatron_cpu_patch,
    check_megatron_version,
)

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the patch is a no-op with CUDA")


def _as_megatron(code: str):
    """Evaluate ``code`` as if it were written inside a megatron module."""
    return eval(code, {"__name__": "megatron.core.fake_module", "torch": torch})


@pytest.mark.parametrize("version", ["0.17.0", "0.15.3", "1.0.0"])
def test_refuses_unrecognised_version(monkeypatch, version):
    info = importlib.import_module("megatron.core.package_info")
    monkeypatch.setattr(info, "__version__", version)
    with pytest.raises(
        UnsupportedMegatronVersionError, match=rf"megatron-core {version}.*0\.16\.x, 0\.19\.x"
    ):
        apply_megatron_cpu_patch(force=True)


def test_refuses_version_missing_a_patched_symbol(monkeypatch):
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    monkeypatch.delattr(random, "_get_cuda_rng_state")
    with pytest.raises(UnsupportedMegatronVersionError, match=r"random\._get_cuda_rng_state"):
        check_megatron_version()


def test_accepts_installed_version():
    assert check_megatron_version().split(".")[:2] in (["0", "16"], ["0", "19"])


@cpu_only
def test_idempotent():
    assert apply_megatron_cpu_patch()
    zeros, cuda = torch.zeros, torch.Tensor.cuda
    assert apply_megatron_cpu_patch()
    assert torch.zeros is zeros and torch.Tensor.cuda is cuda


@cpu_only
def test_redirects_megatron_callers_to_cpu():
    apply_megatron_cpu_patch()
    assert _as_megatron("torch.cuda.current_device()") == torch.device("cpu")
    assert _as_megatron("torch.zeros(2, device='cuda')").device.type == "cpu"
    assert _as_megatron("torch.tensor([1.0], device=torch.cuda.current_device())").device.type == "cpu"
    x = torch.ones(2)
    assert _as_megatron("lambda t: t.cuda()")(x) is x
    _as_megatron("torch.cuda.synchronize()")
    _as_megatron("torch.cuda.current_stream()").wait_event(None)
    assert _as_megatron("lambda t: t.type()")(x) == "torch.cuda.FloatTensor"
    assert x.type() == "torch.FloatTensor"  # unchanged outside megatron
    # megatron's own default causal mask (built with device="cuda") lands on the CPU
    mask = importlib.import_module("megatron.core.transformer.utils").get_default_causal_mask(3)
    assert mask.device.type == "cpu" and mask.tolist() == [
        [False, True, True],
        [False, False, True],
        [False] * 3,
    ]


@cpu_only
def test_does_not_leak_into_other_code():
    apply_megatron_cpu_patch()
    for call in (
        lambda: torch.zeros(1, device="cuda"),
        lambda: torch.ones(1).cuda(),
        torch.cuda.current_device,
    ):
        with pytest.raises((AssertionError, RuntimeError)):
            call()


@cpu_only
def test_rng_tracker_forks_the_cpu_generator():
    """model_parallel_cuda_manual_seed + fork(): dropout inside the fork draws a reproducible,
    separate stream and the default stream resumes where it was."""
    apply_megatron_cpu_patch()
    from megatron.core.tensor_parallel import random as mp_random

    def draws():
        mp_random.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
        torch.manual_seed(0)
        before = torch.rand(2)
        with mp_random.get_cuda_rng_tracker().fork():
            inside = torch.rand(2)
        return before, inside, torch.rand(2)

    first, second = draws(), draws()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    plain = torch.rand(4)
    assert torch.equal(torch.cat([first[0], first[2]]), plain)  # the fork did not consume the default stream
    assert not torch.equal(first[1], plain[2:])
