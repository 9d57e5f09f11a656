"""The Megatron CPU patch: version gate, scoping to megatron callers, idempotence, and no effect on
other libraries' numerics (transformers' RoPE buffers and logits, torch device contexts, TorchScript)."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------
# Other libraries' numerics in a patched process: transformers' RoPE buffers and logits
# ----------------------------------------------------------------------------------------------
#
# The patch replaces torch's factories with Python wrappers. torch's device context recognises its
# factories by identity in a lazily built set; built after the patch it held only the wrappers, so
# ``with torch.device("meta")`` stopped reaching factory calls and transformers' ``from_pretrained``
# left RoPE ``inv_freq`` uninitialised. That set is built on the first device context of a process, so
# both sides run in fresh interpreters: the patched one applies the patch before anything else.

ROOT = Path(__file__).resolve().parents[2]
HEAD_DIM = 16
SEQ = 48  # past original_max_position_embeddings (32), so llama3 scaling is exercised
ROPES = {
    "llama": ("llama", {"rope_type": "default", "rope_theta": 1e5}),
    "llama_linear": ("llama", {"rope_type": "linear", "rope_theta": 1e5, "factor": 2.0}),
    "llama3": (
        "llama",
        {
            "rope_type": "llama3",
            "rope_theta": 1e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "qwen2": ("qwen2", {"rope_type": "default", "rope_theta": 1e6}),
}

# Run as `python -c SCRIPT MODE WORKDIR ROPES_JSON`; MODE is "oracle" (no patch; saves the
# checkpoints) or "patched" (patch first, then load them). Writes WORKDIR/MODE.pt.
_SCRIPT = r"""
import json, sys, warnings
from pathlib import Path

import torch

mode, work, ropes = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
warnings.filterwarnings("ignore")
if mode == "patched":
    from patches import apply_megatron_cpu_patch

    assert apply_megatron_cpu_patch(force=True)

from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

def config(family, rope):
    cls = LlamaConfig if family == "llama" else Qwen2Config
    return cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
               tie_word_embeddings=False, rope_parameters=dict(rope))

tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))

def record(model):
    model = model.float().eval()
    rotary = model.model.rotary_emb
    with torch.no_grad():
        logits = model(tokens).logits
    return {"inv_freq": rotary.inv_freq.clone(), "device": str(rotary.inv_freq.device),
            "original_inv_freq": rotary.original_inv_freq.clone(),
            "attention_scaling": float(rotary.attention_scaling), "logits": logits}

out = {}
for kind, (family, rope) in ropes.items():
    cfg = config(family, rope)
    torch.manual_seed(0)
    from_config = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    out[kind, "from_config"] = record(from_config)
    if mode == "oracle":
        with torch.no_grad():  # random norms and biases too, so a dropped tensor shows in the logits
            for p in from_config.parameters():
                p.normal_(1.0 if p.dim() == 1 else 0.0, 0.1)
        from_config.save_pretrained(work / kind)
    loaded = AutoModelForCausalLM.from_pretrained(work / kind, attn_implementation="eager")
    out[kind, "from_pretrained"] = record(loaded)

with torch.device("meta"):
    out["meta"] = [torch.empty(1).device.type, torch.arange(2).device.type,
                   torch.tensor([1.0]).device.type, torch.nn.Linear(2, 2).weight.device.type]
torch.save(out, work / f"{mode}.pt")
"""


def _run(mode: str, work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode, str(work), json.dumps(ROPES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(work / f"{mode}.pt")


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    """(oracle, patched): the same tiny models loaded in a fresh unpatched and a fresh patched process."""
    work = tmp_path_factory.mktemp("hf_rope")
    oracle = _run("oracle", work)
    return oracle, _run("patched", work)


def _closed_form_inv_freq(rope: dict) -> torch.Tensor:
    """inv_freq_i = 1 / theta^(2i/d), then the rope type's scaling, in float64."""
    i = torch.arange(HEAD_DIM // 2, dtype=torch.float64)
    inv = 1.0 / rope["rope_theta"] ** (2 * i / HEAD_DIM)
    if rope["rope_type"] == "linear":
        return inv / rope["factor"]
    if rope["rope_type"] == "llama3":
        old = rope["original_max_position_embeddings"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        # long wavelengths (smooth 0) are divided by the factor, short ones (smooth 1) are kept
        return (1 - smooth) * inv / rope["factor"] + smooth * inv
    return inv


def test_device_context_still_reaches_factories_after_patch(hf_runs):
    """`with torch.device("meta")` in a process patched before its first device context."""
    oracle, patched = hf_runs
    assert oracle["meta"] == patched["meta"] == ["meta"] * 4


@pytest.mark.parametrize("load", ["from_pretrained", "from_config"])
@pytest.mark.parametrize("kind", list(ROPES))
def test_patch_keeps_hf_rope_and_logits(hf_runs, kind, load):
    oracle, patched = (run[kind, load] for run in hf_runs)
    expected = _closed_form_inv_freq(ROPES[kind][1])
    for run in (oracle, patched):
        assert run["device"] == "cpu"
        assert torch.isfinite(run["inv_freq"]).all() and torch.isfinite(run["logits"]).all()
        torch.testing.assert_close(run["inv_freq"].double(), expected, rtol=1e-5, atol=0)
    for key in ("inv_freq", "original_inv_freq", "logits"):
        torch.testing.assert_close(patched[key], oracle[key], rtol=1e-6, atol=1e-6, msg=key)
    assert patched["attention_scaling"] == oracle["attention_scaling"]


@cpu_only
def test_device_context_in_process():
    """In this process too (whichever came first, the patch or the first device context)."""
    apply_megatron_cpu_patch()
    with torch.device("meta"):
        assert torch.empty(2).is_meta and torch.zeros(2).is_meta and torch.arange(3).is_meta
        assert torch.tensor([1.0]).is_meta and torch.nn.Linear(2, 2).weight.is_meta
        # megatron's explicit CUDA device still lands on the CPU, not on the context's device
        assert _as_megatron("torch.zeros(2, device='cuda')").device.type == "cpu"
    torch.set_default_device("meta")
    try:
        assert torch.ones(1).is_meta
    finally:
        torch.set_default_device(None)
    assert torch.ones(1).device.type == "cpu"


@cpu_only
def test_torchscript_still_compiles_factories():
    apply_megatron_cpu_patch()

    def f(x: torch.Tensor) -> torch.Tensor:
        return x + torch.zeros(3) + torch.arange(3) + torch.full((3,), 2.0)

    scripted = torch.jit.script(f)
    assert torch.equal(scripted(torch.ones(3)), f(torch.ones(3)))


def test_refuses_and_undoes_when_device_context_would_break(monkeypatch):
    """A torch whose device-constructor set is rebuilt from the current attributes (not cached)
    would see only the wrappers: the factory patch must raise and leave torch as it was."""
    from torch.utils import _device

    from patches import megatron_cpu

    names = megatron_cpu._FACTORY_FUNCTIONS
    monkeypatch.setattr(_device, "_device_constructors", lambda: {getattr(torch, n) for n in names})
    before = {n: getattr(torch, n) for n in names}
    with pytest.raises(
        RuntimeError, match=r"device context.*no longer holds.*torch\.empty,.*nothing was patched"
    ):
        megatron_cpu._patch_factories()
    assert all(getattr(torch, n) is before[n] for n in names)
