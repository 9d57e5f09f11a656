"""Megatron's distributed optimizer (``optim.distributed``): at DP=2 (and TP=2 x DP=2) it trains
exactly like the replicated optimizer, holds 1/DP of the Adam state per rank, and its torch_dist
checkpoints resume (same layout: bit for bit) and reshard to another TP/DP layout.

Oracles: the first step's loss and pre-clip grad norm against the Hugging Face model under autograd
(test_actor.hf_step_oracle); all three steps against the replicated optimizer at the same layout and
at TP=PP=DP=1 with the whole mini-batch in one micro-batch (test_actor's reference, itself checked
against HF). The runs are fp32 and differ only in reduction order (a reduce-scatter of the gradient
buffer instead of an all-reduce, the grad norm summed over shards): measured differences are ~1e-7
relative in grad norms and <= 1.2e-7 absolute in weights after three AdamW steps (one step moves
weights by ~1e-3). Asserted: losses and grad norms to rtol 1e-6, weights to atol 1e-6 (rtol 1e-5 and
atol 2e-6 against the single-micro-batch DP=1 run, test_actor's tolerances).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpt_megatron.config import ConfigError, load_config
from hpt_megatron.convert import hf_to_megatron
from hpt_megatron.distributed import launch
from tests import hf_tiny
from tests.dist import actor_workers as AW
from tests.dist import dist_optimizer_workers as W
from tests.dist.test_actor import hf_step_oracle

pytestmark = pytest.mark.dist
KINDS = ("qwen2_tied", "llama3")
STEPS = 3
TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist_optim")
    for kind in KINDS:
        hf_tiny.save_tiny(kind, root / kind)
        hf_to_megatron(root / kind, root / f"{kind}-mg", tp=1, pp=1, progress=False)
    return root


def _run(root: Path, kind: str, tp: int, world: int, distributed: bool, steps: int = STEPS) -> dict:
    return launch(W.train_worker, world, args=(str(root), kind, tp, distributed, steps))[0]


def _assert_same_training(got: dict, want: dict, rtol: float, atol: float) -> None:
    assert len(got["history"]) == len(want["history"])
    for g, w in zip(got["history"], want["history"]):
        assert not g["skipped"] and not w["skipped"]
        assert g["metrics"]["loss/total"] == pytest.approx(w["metrics"]["loss/total"], rel=rtol, abs=0)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=rtol, abs=0)
    assert got["weights"].keys() == want["weights"].keys()
    for name, t in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], t, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_dp2_distributed_optimizer_equals_replicated_adam(root, kind):
    dist = _run(root, kind, 1, 2, True)
    repl = _run(root, kind, 1, 2, False)
    single = launch(AW.train_worker, 1, args=(str(root), (kind,), 1, 1, STEPS, False, 10**6))[0][kind]
    assert dist["optimizers"] == ["DistributedOptimizer"] and repl["optimizers"] != dist["optimizers"]
    loss, norm = hf_step_oracle(root, kind)
    assert dist["history"][0]["metrics"]["loss/total"] == pytest.approx(loss, rel=1e-5)
    assert dist["history"][0]["grad_norm"] == pytest.approx(norm, rel=1e-5)
    _assert_same_training(dist, repl, rtol=1e-6, atol=1e-6)
    _assert_same_training(dist, single, rtol=1e-5, atol=2e-6)


def test_dp2_shards_the_adam_state(root):
    """Each DP rank holds the moments of its own half of the parameters; together exactly all of
    them. The replicated optimizer holds all of them on every rank."""
    dist = _run(root, "qwen2_tied", 1, 2, True, steps=1)
    repl = _run(root, "qwen2_tied", 1, 2, False, steps=1)
    params = repl["state"][0]["params"]
    assert [s["exp_avg"] for s in repl["state"]] == [params, params]
    held = [s["exp_avg"] for s in dist["state"]]
    assert sum(held) == params
    assert all(abs(h - params / 2) <= 0.01 * params for h in held), held


def test_tp2_dp2_distributed_optimizer_equals_replicated_adam(root):
    """4 ranks: the shards are of each TP rank's slices, over its DP group of 2."""
    dist = _run(root, "qwen2_tied", 2, 4, True)
    repl = _run(root, "qwen2_tied", 2, 4, False)
    _assert_same_training(dist, repl, rtol=1e-6, atol=1e-6)
    tp_params = repl["state"][0]["params"]
    # ranks are ordered tp-fastest: (tp0, dp0), (tp1, dp0), (tp0, dp1), (tp1, dp1)
    assert dist["state"][0]["exp_avg"] + dist["state"][2]["exp_avg"] == tp_params


# ---- torch_dist checkpoints -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(root, tmp_path_factory) -> Path:
    """One step at DP=2 with the distributed optimizer, saved."""
    ckpt = tmp_path_factory.mktemp("dist_optim_ckpt") / "iter_0000001"
    launch(W.save_worker, 2, args=(str(root), "qwen2_tied", 1, str(ckpt)))
    return ckpt


@pytest.fixture(scope="module")
def uninterrupted(root) -> dict:
    return _run(root, "qwen2_tied", 1, 2, True, steps=2)


def _resume(root: Path, ckpt: Path, tp: int, world: int, distributed: bool = True) -> dict:
    return launch(W.resume_worker, world, args=(str(root), "qwen2_tied", tp, str(ckpt), distributed))[0]


def test_same_layout_resume_is_exact(root, saved, uninterrupted):
    resumed = _resume(root, saved, 1, 2)
    assert resumed["meta"] == {"step": 1}
    last, want = resumed["history"][0], uninterrupted["history"][1]
    assert last["metrics"]["loss/total"] == want["metrics"]["loss/total"]
    assert last["grad_norm"] == want["grad_norm"]
    for name, t in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], t), name


@pytest.mark.parametrize(("tp", "world"), [(1, 1), (2, 2)], ids=["dp1", "tp2"])
def test_resume_reshards_to_another_layout(root, saved, uninterrupted, tp, world):
    """Saved at DP=2, resumed at DP=1 (one rank holds the whole state) or TP=2 x DP=1: the second
    step equals the uninterrupted DP=2 run up to reduction order."""
    resumed = _resume(root, saved, tp, world)
    last, want = resumed["history"][0], uninterrupted["history"][1]
    assert last["metrics"]["loss/total"] == pytest.approx(want["metrics"]["loss/total"], rel=1e-6, abs=0)
    assert last["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6, abs=0)
    for name, t in uninterrupted["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], t, rtol=0, atol=1e-6, msg=name)


def test_bf16_with_fp32_norms_trains_and_resumes_exactly(root, tmp_path):
    """bf16 weights with fp32 master copies, and the local spec's RMSNorm weights in fp32: one torch
    param group mixes both kinds (patches/dist_optimizer_state.py). Two steps equal the replicated
    optimizer's bit for bit (measured: the fp32 differences vanish in the bf16 weights); saved after
    one step at DP=2 and resumed there, the second step is bit-identical too (the fp32 master weights
    and moments come back, not a copy of the bf16 weights)."""
    kind = "qwen2_tied"
    args = (str(root), kind, 1)
    dist = launch(W.train_worker, 2, args=(*args, True, 2, True))[0]
    repl = launch(W.train_worker, 2, args=(*args, False, 2, True))[0]
    assert dist["param_dtypes"] == ["torch.bfloat16", "torch.float32"]
    for name, t in repl["weights"].items():
        assert torch.equal(dist["weights"][name], t), name
    ckpt = tmp_path / "iter_0000001"
    launch(W.save_worker, 2, args=(*args, str(ckpt), True))
    resumed = launch(W.resume_worker, 2, args=(*args, str(ckpt), True, True))[0]
    assert resumed["history"][0]["grad_norm"] == dist["history"][1]["grad_norm"]
    for name, t in dist["weights"].items():
        assert torch.equal(resumed["weights"][name], t), name


def test_resume_into_the_other_optimizer_names_the_key(root, saved, tmp_path):
    message = launch(W.error_worker, 2, args=(str(root), "qwen2_tied", 1, str(saved), False, "torch_dist"))[0]
    assert "saved with optim.distributed=true" in message and "set optim.distributed=true" in message
    replicated = tmp_path / "iter_0000001"
    assert (
        launch(W.error_worker, 2, args=(str(root), "qwen2_tied", 1, str(replicated), False, "torch_dist"))[0]
        == ""
    )
    message = launch(
        W.error_worker, 2, args=(str(root), "qwen2_tied", 1, str(replicated), True, "torch_dist")
    )[0]
    assert "saved with optim.distributed=false" in message and "set optim.distributed=false" in message


def test_safetensors_format_refuses_the_distributed_optimizer(root, tmp_path):
    ckpt = tmp_path / "step_00000001"
    message = launch(W.error_worker, 2, args=(str(root), "qwen2_tied", 1, str(ckpt), True, "safetensors"))[0]
    assert "trainer.checkpoint_format=torch_dist" in message
    assert not ckpt.exists()


# ---- config ---------------------------------------------------------------------------------------


def test_config_rejects_distributed_optimizer_with_safetensors():
    with pytest.raises(ConfigError, match="trainer.checkpoint_format=torch_dist"):
        load_config(
            TINY,
            ["optim.distributed=true", "trainer.checkpoint_format=safetensors", "cluster.devices_per_node=2"],
        )


def test_config_warns_that_dp1_has_nothing_to_shard():
    with pytest.warns(UserWarning, match="optim.distributed=true has no effect"):
        cfg = load_config(TINY, ["optim.distributed=true", "cluster.devices_per_node=1"])
    assert cfg.optim.distributed
