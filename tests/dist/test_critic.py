"""The Megatron critic: values and the clipped value loss's gradient equal a Hugging Face
``...ForTokenClassification`` model's (num_labels = 1, the independent oracle); TP/PP/DP layouts
train identically to TP = PP = DP = 1 in one micro-batch; a critic checkpoint resumes at another
layout; the Hugging Face export reproduces the values and loads back.

Tolerances as in test_actor.py: fp32 runs that differ only in reduction order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpt_megatron.convert import hf_to_megatron
from hpt_megatron.distributed import launch
from hpt_megatron.train.critic import CRITIC_DIR, export_critic_hf
from tests import hf_tiny
from tests.dist import critic_workers as W

pytestmark = pytest.mark.dist
KINDS = ("qwen2_tied", "llama3")
STEPS = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("critic")
    for kind in KINDS:
        hf_tiny.save_tiny(kind, root / kind)
    hf_to_megatron(root / "qwen2_tied", root / "qwen2_tied-mg", tp=1, pp=1, progress=False)
    return root


@pytest.fixture(scope="module")
def reference(root) -> dict:
    """TP = PP = DP = 1, the whole mini-batch in one micro-batch."""
    return {kind: launch(W.train_worker, 1, args=(str(root), kind, 1, 1, STEPS, 10**6))[0] for kind in KINDS}


def hf_oracle(model_dir: Path, head: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """Values, clipped value loss and its gradient norm from the HF token-classification model."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32, attn_implementation="eager"
    )
    if head is not None:
        with torch.no_grad():
            model.score.weight.copy_(head[0])
            model.score.bias.copy_(head[1])
    cb = W.critic_batch()
    values = torch.zeros_like(cb.mask_BT)
    for i, n in enumerate(cb.batch.lengths_B.tolist()):
        out = model(cb.batch.tokens_BL[i : i + 1, :n]).logits[0, : n - 1, 0]
        values = values.index_put((torch.tensor([i]), torch.arange(n - 1)), out)
    # the loss written out directly (not through ValueLoss): 0.5 * max of the two squared errors
    clipped = torch.minimum(torch.maximum(values, cb.old_values_BT - W.CLIP), cb.old_values_BT + W.CLIP)
    per_token = torch.maximum((values - cb.returns_BT) ** 2, (clipped - cb.returns_BT) ** 2)
    loss = 0.5 * (per_token * cb.mask_BT).sum() / cb.mask_BT.sum()
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return {"values": values.detach(), "loss": loss.item(), "grad_norm": float(norm)}


def assert_values(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor, atol: float) -> None:
    sel = W.critic_batch().batch.loss_mask_BT > 0 if mask is None else mask > 0
    torch.testing.assert_close(got[sel], want[sel], atol=atol, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_first_step_matches_hf_token_classification(root, reference, kind):
    want = hf_oracle(root / kind, W.head_init(64))
    first = reference[kind]["history"][0]
    assert_values(first["values"], want["values"], None, atol=1e-5)
    assert first["metrics"]["critic/value_loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert first["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert 0 < first["metrics"]["critic/value_clip_frac"] < 1  # both branches of the clip are exercised


def test_updates_move_the_values(reference):
    """The optimizer steps change the critic (so the layout comparisons below compare trained
    weights, not the initial ones)."""
    mask = W.critic_batch().batch.loss_mask_BT > 0
    for kind in KINDS:
        moved = reference[kind]["final_values"] - reference[kind]["history"][0]["values"]
        assert float(moved[mask].abs().max()) > 1e-2


def assert_same_training(got: dict, ref: dict) -> float:
    """Per-step metrics and grad norm, and the values after training; returns the max value diff."""
    mask = W.critic_batch().batch.loss_mask_BT
    for step, (g, r) in enumerate(zip(got["history"], ref["history"])):
        for key in ("critic/value_loss", "critic/value_clip_frac", "critic/values_mean"):
            assert g["metrics"][key] == pytest.approx(r["metrics"][key], rel=1e-5, abs=1e-7), (step, key)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5), step
        assert_values(g["values"], r["values"], mask, atol=1e-5)
    assert_values(got["final_values"], ref["final_values"], mask, atol=1e-5)
    return float((got["final_values"] - ref["final_values"])[mask > 0].abs().max())


@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 2, 2), (2, 2, 4), (1, 1, 2)])
def test_layouts_train_identically(root, reference, tp, pp, world):
    for kind in KINDS:
        got = launch(W.train_worker, world, args=(str(root), kind, tp, pp, STEPS, 40))[0]
        diff = assert_same_training(got, reference[kind])
        print(f"critic {kind} tp={tp} pp={pp} world={world}: max |value diff| vs TP=1 {diff:.2e}")


def test_resume_at_another_layout_and_export_to_hf(root, reference, tmp_path):
    """Saved at TP=2/PP=2 after one step, resumed at TP=1: the second step equals the uninterrupted
    run's. The HF export of the saved critic gives the values the critic had, and loads back."""
    kind = "qwen2_tied"
    ckpt = tmp_path / "step_1"
    ckpt.mkdir()
    launch(W.save_worker, 4, args=(str(root), kind, 2, 2, str(ckpt)))
    resumed = launch(W.resume_worker, 1, args=(str(root), kind, 1, 1, str(ckpt)))[0]
    ref = reference[kind]
    assert_same_training(
        {"history": resumed["history"], "final_values": resumed["final_values"]},
        {"history": ref["history"][1:], "final_values": ref["final_values"]},
    )
    hf_dir = export_critic_hf(ckpt / CRITIC_DIR, tmp_path / "critic-hf")
    want = hf_oracle(hf_dir, head=None)  # the exported head, as transformers loads it
    mask = W.critic_batch().batch.loss_mask_BT
    assert_values(want["values"], ref["history"][1]["values"], mask, atol=1e-5)
    back = launch(W.values_worker, 2, args=(str(root), kind, 2, 1, str(hf_dir), "hf"))[0]
    assert_values(back, ref["history"][1]["values"], mask, atol=1e-5)


def test_init_from_an_actor_checkpoint_loads_the_trunk(root):
    """An actor checkpoint gives the trunk; the head starts at zero, so every value is exactly 0;
    a missing critic in a checkpoint names the fix."""
    values = launch(
        W.values_worker, 2, args=(str(root), "qwen2_tied", 1, 2, str(root / "qwen2_tied-mg"), "mg")
    )[0]
    assert float(values.abs().max()) == 0.0
    with pytest.raises(RuntimeError, match=r"critic\.enabled=false"):
        launch(W.resume_worker, 1, args=(str(root), "qwen2_tied", 1, 1, str(root / "qwen2_tied-mg")))


@pytest.mark.parametrize("kind", KINDS)
def test_trunk_copied_from_the_actor_gives_the_hf_values(root, kind):
    """critic.init = actor at TP=2 x PP=2: the critic's trunk is the actor's (tied and untied heads)."""
    want = hf_oracle(root / kind, W.head_init(64))["values"]
    got = launch(W.from_actor_worker, 4, args=(str(root), kind, 2, 2))[0]
    assert_values(got, want, W.critic_batch().batch.loss_mask_BT, atol=1e-5)


def test_critic_learns_prompt_dependent_values(root):
    """Targets 1 or 0 by prompt: training drives the explained variance from below 0 to above 0.5
    (values at the right positions, gradients reaching the trunk and the head)."""
    ev = launch(W.learnable_worker, 1, args=(str(root), "qwen2_tied", 25))[0]
    assert ev[0] < 0 and min(ev[-5:]) > 0.5, ev
