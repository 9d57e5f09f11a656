"""The Megatron actor: TP/PP/DP layouts train identically, log-probs equal the HF model's, and a
checkpoint saved at one layout resumes at another.

Tolerances: all runs are fp32 on CPU and differ only in reduction order (TP all-reduces of partial
sums, vocab-parallel softmax statistics, the DP gradient sum), i.e. relative differences ~1e-7 per
operation. Losses and grad norms are compared at rtol 1e-5; weights after two AdamW steps (lr 1e-3,
eps 1e-5, see actor_workers.OPTIM) at atol 2e-6, far below the 1e-3 scale of one update, so a wrong
gradient anywhere shows up, while reduction-order noise does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpt_megatron.convert import hf_to_megatron
from hpt_megatron.distributed import launch
from tests import hf_tiny
from tests.dist import actor_workers as W

pytestmark = pytest.mark.dist
KINDS = ("qwen2_tied", "llama3")
STEPS = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("actor")
    for kind in KINDS:
        hf_tiny.save_tiny(kind, root / kind)
        hf_to_megatron(root / kind, root / f"{kind}-mg", tp=1, pp=1)
    return root


@pytest.fixture(scope="module")
def reference(root) -> dict:
    """TP=PP=DP=1 with the whole mini-batch in ONE micro-batch; the other layouts use a 40-token
    budget (several micro-batches per rank), so a wrong micro-batch or DP scaling shows up."""
    return launch(W.train_worker, 1, args=(str(root), KINDS, 1, 1, STEPS, False, 10**6))[0]


def hf_step_oracle(root: Path, kind: str) -> tuple[float, float]:
    """Loss and pre-clip grad norm of the first step, from the Hugging Face model with autograd:
    full-vocab log_softmax, the same batch and the same UPGE loss (pi_old = current weights)."""
    from transformers import AutoModelForCausalLM

    from hpt_megatron.algo import LossInputs, count_rows, get_preset, upge_loss

    model = AutoModelForCausalLM.from_pretrained(
        root / kind, dtype=torch.float32, attn_implementation="eager"
    )
    batch = W.hpt_batch()
    logp = torch.zeros_like(batch.loss_mask_BT)
    for i, n in enumerate(batch.lengths_B.tolist()):
        ids = batch.tokens_BL[i : i + 1, :n]
        lp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        logp = logp.index_put((torch.tensor([i]), torch.arange(n - 1)), lp)
    algo = get_preset("hpt").build()
    x = LossInputs(
        logp_BT=logp,
        mask_BT=batch.loss_mask_BT,
        source_B=batch.source_B,
        advantages={k: v.float() for k, v in batch.advantages.items()},
        coef_B=batch.coef_B.float(),
        old_logp_BT=logp.detach(),
    )
    loss, _ = upge_loss(algo, x, count_rows(algo, batch.source_B, batch.loss_mask_BT))
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(loss), float(norm)


@pytest.mark.parametrize("kind", KINDS)
def test_first_step_matches_hf_autograd(root, reference, kind):
    loss, norm = hf_step_oracle(root, kind)
    first = reference[kind]["history"][0]
    assert first["metrics"]["loss/total"] == pytest.approx(loss, rel=1e-5)
    assert first["grad_norm"] == pytest.approx(norm, rel=1e-5)


def assert_same_training(got: dict, ref: dict) -> None:
    for kind in KINDS:
        for step, (g, r) in enumerate(zip(got[kind]["history"], ref[kind]["history"])):
            assert not g["skipped"] and not r["skipped"]
            for key in ("loss/total", "loss/rl", "loss/sft", "actor/entropy"):
                assert g["metrics"][key] == pytest.approx(r["metrics"][key], rel=1e-5, abs=1e-7), (
                    kind,
                    step,
                    key,
                )
            assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5), (kind, step)
        gw, rw = got[kind]["weights"], ref[kind]["weights"]
        assert gw.keys() == rw.keys()
        for name in rw:
            torch.testing.assert_close(gw[name], rw[name], rtol=0, atol=2e-6, msg=f"{kind} {name}")


def test_reference_run_learns_something(reference):
    for kind in KINDS:
        hist = reference[kind]["history"]
        assert hist[0]["metrics"]["loss/sft"] > 0 and hist[0]["grad_norm"] > 0
        # SFT rows and RL rows both present in the mini-batch
        assert hist[0]["metrics"]["loss/rl"] != 0 and hist[0]["metrics"]["loss/sft"] != 0
        # one AdamW step moves the model: the SFT loss of the same batch drops
        assert hist[1]["metrics"]["loss/sft"] < hist[0]["metrics"]["loss/sft"]


@pytest.mark.parametrize(("tp", "pp", "world"), [(2, 1, 2), (1, 2, 2), (1, 1, 2)], ids=["tp2", "pp2", "dp2"])
def test_layouts_train_identically(root, reference, tp, pp, world):
    got = launch(W.train_worker, world, args=(str(root), KINDS, tp, pp, STEPS))[0]
    assert_same_training(got, reference)


@pytest.mark.parametrize(
    ("packed", "tp", "pp", "world", "budget"),
    [
        (False, 1, 1, 1, 1),
        (False, 1, 1, 1, 64),
        (True, 1, 1, 1, 16),
        (True, 1, 1, 1, 50),
        (True, 2, 1, 2, 30),
        (True, 1, 2, 2, 40),
        (True, 1, 1, 2, 40),
    ],
    ids=[
        "padded-1",
        "padded-64",
        "packed-16",
        "packed-50",
        "packed-tp2-30",
        "packed-pp2-40",
        "packed-dp2-40",
    ],
)
def test_micro_batch_grouping_does_not_change_training(root, reference, packed, tp, pp, world, budget):
    """Token budgets from one row per micro-batch to a few rows each, padded or packed (rows of
    5-16 tokens; a budget below a row's length gives it its own micro-batch): losses are divided
    by global counts, so losses, grad norms and weights equal the one-micro-batch reference."""
    got = launch(W.train_worker, world, args=(str(root), KINDS, tp, pp, STEPS, packed, budget))[0]
    assert_same_training(got, reference)


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 1)], ids=["pp2", "tp2"])
def test_activation_recompute_trains_identically(root, reference, tp, pp):
    """Recomputation changes what is stored, not what is computed. (Sequence parallelism needs
    Transformer Engine norms, so it has no CPU test; its config check is in test_config.)"""
    options = {"recompute": True}
    got = launch(W.train_worker, tp * pp, args=(str(root), KINDS, tp, pp, STEPS, False, 40, options))[0]
    assert_same_training(got, reference)


def hf_logprobs(root: Path, kind: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        root / kind, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        logits = model(tokens).logits
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("packed", [False, True], ids=["bucketed", "packed"])
def test_logprobs_match_hf_at_tp2(root, packed):
    kind = "llama3"
    out = launch(W.logprob_worker, 2, args=(str(root), kind, 2, 1, packed))[0]
    tokens, mask = out["tokens"], out["mask"]
    got = torch.zeros_like(mask)
    for r in out["reports"]:
        got[r["rows"]] = r["logp_BT"]
    ref = torch.zeros_like(mask)
    for i in range(tokens.shape[0]):
        n = int(mask[i].nonzero().max()) + 2  # real tokens of the row: up to its last response token
        ref[i, : n - 1] = hf_logprobs(root, kind, tokens[i : i + 1, :n])[0]
    torch.testing.assert_close(got * mask, ref * mask, rtol=1e-5, atol=1e-5)
    entropy = torch.cat([r["entropy_BT"] for r in out["reports"]])
    assert (entropy[mask[[i for r in out["reports"] for i in r["rows"]]].bool()] > 0).all()


def test_resume_at_another_layout(root, tmp_path):
    """1 step at TP=2, save, resume at PP=2 for 1 step == 2 uninterrupted steps at TP=1."""
    kind = "qwen2_tied"
    ckpt = tmp_path / "step1"
    launch(W.save_worker, 2, args=(str(root), kind, 2, 1, str(ckpt)))
    assert (ckpt / "meta.json").is_file() and not (tmp_path / ".step1.partial").exists()
    resumed = launch(W.resume_worker, 2, args=(str(root), kind, 1, 2, str(ckpt)))[0]
    ref = launch(W.train_worker, 1, args=(str(root), (kind,), 1, 1, STEPS))[0][kind]
    assert resumed["meta_step"] == 1
    last, ref_last = resumed["history"][0], ref["history"][1]
    assert last["metrics"]["loss/total"] == pytest.approx(ref_last["metrics"]["loss/total"], rel=1e-5)
    assert last["grad_norm"] == pytest.approx(ref_last["grad_norm"], rel=1e-5)
    for name, t in ref["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], t, rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize(
    ("skip_above", "poison", "reason"), [(1e-12, False, "grad_norm>1e-12"), (None, True, "nonfinite")]
)
def test_bad_steps_are_skipped(root, skip_above, poison, reason):
    out = launch(W.skip_worker, 1, args=(str(root), "qwen2_tied", skip_above, poison))[0]
    assert out["skipped"] and out["reason"] == reason and out["unchanged"]


def test_interrupted_save_keeps_the_previous_checkpoint(root, tmp_path):
    out = launch(W.interrupted_save_worker, 1, args=(str(root), "qwen2_tied", str(tmp_path / "ckpt")))[0]
    assert out == {"meta_step": 0, "restored": True, "next_exists": False}
