"""torch_dist training checkpoints (megatron-core dist_checkpointing, Megatron-LM layout) on CPU/gloo.

Resharding: one HPT step at one layout, save, resume at another for one step == two uninterrupted
steps (the oracle: test_actor's reference run, independent of any checkpoint). Same layout: bitwise
equal. Other layouts: the runs differ only in reduction order (fp32 TP all-reduces, DP gradient
sums), so losses and grad norms agree to rtol 1e-5 and weights after the second AdamW step to atol
2e-6 (one update moves weights by ~1e-3), the tolerances of test_actor.

Atomicity: a save killed (os._exit / SIGKILL, no cleanup) at injected points and at random moments
never leaves the tracker naming an incomplete checkpoint; the previous one loads with its weights.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpt_megatron.convert import hf_to_megatron
from hpt_megatron.distributed import launch
from hpt_megatron.convert.torch_dist import TRACKER, tracked_checkpoint
from tests import hf_tiny
from tests.dist import actor_workers as W
from tests.dist import dist_checkpoint_workers as D

pytestmark = pytest.mark.dist
KIND = "qwen2_tied"  # tied embeddings: the output layer is saved once, as the embedding
ROOT_DIR = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist_ckpt")
    hf_tiny.save_tiny(KIND, root / KIND)
    hf_to_megatron(root / KIND, root / f"{KIND}-mg", tp=1, pp=1, progress=False)
    return root


@pytest.fixture(scope="module")
def reference(root) -> dict:
    """Two uninterrupted steps at TP=PP=DP=1."""
    return launch(W.train_worker, 1, args=(str(root), (KIND,), 1, 1, 2))[0][KIND]


@pytest.fixture(scope="module")
def tp2pp2(root, tmp_path_factory) -> dict:
    """One step at TP=2 x PP=2 (4 ranks), saved: the directory and the saved weights (HF names)."""
    ckpt = tmp_path_factory.mktemp("tp2pp2") / "iter_0000001"
    saved = launch(D.save_worker, 4, args=(str(root), KIND, 2, 2, str(ckpt)))
    return {"dir": ckpt, "weights": saved[0]["weights"]}


def _assert_matches(resumed: dict, ref: dict, exact: bool) -> None:
    last, ref_last = resumed["history"][0], ref["history"][1]
    rel, atol = (0, 0) if exact else (1e-5, 2e-6)
    assert last["metrics"]["loss/total"] == pytest.approx(ref_last["metrics"]["loss/total"], rel=rel, abs=0)
    assert last["grad_norm"] == pytest.approx(ref_last["grad_norm"], rel=rel, abs=0)
    assert resumed["weights"].keys() == ref["weights"].keys()
    for name, t in ref["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], t, rtol=0, atol=atol, msg=name)


def test_layout_on_disk(tp2pp2):
    tp2pp2 = tp2pp2["dir"]
    names = {p.name for p in tp2pp2.iterdir()}
    assert {"metadata.json", ".metadata", "common.pt"} <= names
    assert not (tp2pp2.parent / f".{tp2pp2.name}.partial").exists()
    common = torch.load(tp2pp2 / "common.pt", weights_only=True)  # no pickle needed
    assert common["iteration"] == 1 and common["checkpoint_version"] == 3.0
    assert common["hpt"]["layout"] == {"tp": 2, "pp": 2, "dp": 1} and common["hpt"]["optimizer_state"]
    assert "opt_param_scheduler" in common


@pytest.mark.parametrize(("tp", "pp", "world"), [(1, 1, 1), (1, 1, 2)], ids=["tp1", "dp2"])
def test_tp2pp2_resumes_at_another_layout(root, reference, tp2pp2, tp, pp, world):
    resumed = launch(D.resume_worker, world, args=(str(root), KIND, tp, pp, str(tp2pp2["dir"])))[0]
    assert resumed["meta"] == {"step": 1, "sampler": {"epoch": 0, "pos": 16}}
    _assert_matches(resumed, reference, exact=False)


def test_same_layout_resume_is_exact(root, tmp_path):
    """TP=2: save after one step, resume for one == two uninterrupted TP=2 steps, bit for bit; the
    RNG states come back too."""
    ckpt = tmp_path / "iter_0000001"
    saved = launch(D.save_worker, 2, args=(str(root), KIND, 2, 1, str(ckpt)))
    resumed = launch(D.resume_worker, 2, args=(str(root), KIND, 2, 1, str(ckpt)))
    ref = launch(W.train_worker, 2, args=(str(root), (KIND,), 2, 1, 2))[0][KIND]
    _assert_matches(resumed[0], ref, exact=True)
    for s, r in zip(saved, resumed):
        assert torch.equal(s["rng"], r["rng"])
        assert s["children"] == []  # the save left no process behind (patches/dcp_sync_save.py)


@pytest.mark.parametrize("point", D.KILL_POINTS)
def test_save_killed_at_any_point_keeps_the_previous_checkpoint(root, tmp_path, point):
    save_dir = tmp_path / "checkpoints"
    save_dir.mkdir()
    with pytest.raises(RuntimeError, match="exited without a result"):
        launch(D.interrupted_save_worker, 1, args=(str(root), KIND, str(save_dir), point))
    assert (save_dir / TRACKER).read_text().strip() == "1"
    out = launch(D.check_worker, 1, args=(str(root), KIND, str(save_dir)))[0]
    assert out["meta"]["step"] == 1 and out["restored"]
    new = save_dir / "iter_0000002"
    # only a save that got as far as the rename leaves iter_0000002, and then it is complete
    assert new.exists() == (point == "before_tracker")
    assert not new.exists() or ((new / "common.pt").is_file() and (new / ".metadata").is_file())


def test_kill_9_at_random_moments(root, tmp_path):
    """SIGKILL a process that saves in a loop, three times at random moments (seeded), resuming the
    loop in between: the tracker always names a complete checkpoint holding exactly its weights."""
    save_dir = tmp_path / "checkpoints"
    save_dir.mkdir()
    rng = random.Random(13)
    cmd = [sys.executable, "-m", "tests.dist.dist_checkpoint_workers", str(root), KIND, str(save_dir)]
    seen = []
    for _ in range(3):
        before = tracked_checkpoint(save_dir)
        proc = subprocess.Popen(cmd, cwd=ROOT_DIR, start_new_session=True, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while tracked_checkpoint(save_dir) == before and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        import os

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out = launch(D.verify_worker, 1, args=(str(root), KIND, str(save_dir)))[0]
        assert out["tracked"] == out["meta_step"] == out["pattern"], out
        seen.append(out["tracked"])
    assert seen == sorted(seen) and seen[0] >= 1


# ---- Megatron-LM checkpoints: hpt-convert and model.megatron_checkpoint ----------------------------

LM_KIND = "llama3"  # untied output layer, no biases; the tied Qwen2 path is covered above


@pytest.fixture(scope="module")
def hf_oracle(root) -> dict:
    """The Hugging Face model the Megatron-LM checkpoints are made from: their independent oracle."""
    hf_tiny.save_tiny(LM_KIND, root / LM_KIND)
    from safetensors.torch import load_file

    return {n: t for f in sorted((root / LM_KIND).glob("*.safetensors")) for n, t in load_file(f).items()}


@pytest.fixture(scope="module")
def megatron_lm(root, hf_oracle, tmp_path_factory) -> dict:
    """Save directories written like Megatron-LM: torch_dist at TP2 x PP2, legacy at TP2 x PP2
    (mp_rank_XX_YYY) and at TP2 (mp_rank_XX)."""
    out = {}
    for name, fmt, tp, pp in (
        ("dist_tp2pp2", "torch_dist", 2, 2),
        ("legacy_tp2pp2", "legacy", 2, 2),
        ("legacy_tp2", "legacy", 2, 1),
    ):
        save_dir = tmp_path_factory.mktemp(name)
        launch(D.megatron_lm_save_worker, tp * pp, args=(str(root), LM_KIND, tp, pp, str(save_dir), fmt))
        out[name] = save_dir
    return out


def _assert_hf_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name  # fp32 copies and re-slicings: bit-exact


@pytest.mark.parametrize("name", ["dist_tp2pp2", "legacy_tp2pp2", "legacy_tp2"])
def test_hpt_convert_reads_megatron_lm_checkpoints(root, hf_oracle, megatron_lm, name, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hpt_megatron.convert.cli import main

    save_dir = megatron_lm[name]
    if name.startswith("legacy"):
        files = sorted(p.parent.name for p in save_dir.glob("iter_0000100/mp_rank_*/model_optim_rng.pt"))
        assert files == (
            ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
            if "pp2" in name
            else ["mp_rank_00", "mp_rank_01"]
        )
    out = tmp_path / "hf"
    argv = ["megatron-to-hf", "--megatron-dir", str(save_dir), "--output-dir", str(out), "--no-progress"]
    assert main([*argv, "--hf-config", str(root / LM_KIND)]) == 0
    got = {n: t for f in sorted(out.glob("*.safetensors")) for n, t in load_file(f).items()}
    _assert_hf_equal(got, hf_oracle)
    tokens = hf_tiny.tokens()
    ref = AutoModelForCausalLM.from_pretrained(root / LM_KIND, dtype=torch.float32)
    conv = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(conv(tokens).logits, ref(tokens).logits, rtol=0, atol=0)


def test_hpt_convert_without_hf_config_names_the_flag(megatron_lm, tmp_path, capsys):
    from hpt_megatron.convert.cli import main

    argv = [
        "megatron-to-hf",
        "--megatron-dir",
        str(megatron_lm["dist_tp2pp2"]),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert "--hf-config" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "tp", "pp"), [("dist_tp2pp2", 1, 1), ("dist_tp2pp2", 2, 1), ("legacy_tp2pp2", 1, 2)]
)
def test_training_starts_from_a_megatron_lm_checkpoint(root, hf_oracle, megatron_lm, name, tp, pp):
    out = launch(D.start_from_worker, tp * pp, args=(str(root), LM_KIND, tp, pp, str(megatron_lm[name])))[0]
    assert out["kind"] == ("torch_dist" if name.startswith("dist") else "legacy")
    _assert_hf_equal(out["weights"], hf_oracle)


def test_our_torch_dist_checkpoint_converts_without_hf_config(root, tp2pp2, tmp_path):
    """The HF config travels in common.pt; the converted model equals what the TP2 x PP2 actor saved
    (its own live export) and what a fresh model loads from the checkpoint."""
    from safetensors.torch import load_file

    from hpt_megatron.convert.cli import main

    out, ckpt = tmp_path / "hf", str(tp2pp2["dir"])
    assert main(["megatron-to-hf", "--megatron-dir", ckpt, "--output-dir", str(out), "--no-progress"]) == 0
    got = {n: t for f in sorted(out.glob("*.safetensors")) for n, t in load_file(f).items()}
    want = launch(D.start_from_worker, 1, args=(str(root), KIND, 1, 1, ckpt))[0]["weights"]
    _assert_hf_equal(got, want)
    _assert_hf_equal(got, tp2pp2["weights"])


def test_resuming_from_a_megatron_lm_checkpoint_points_to_megatron_checkpoint(root, megatron_lm):
    it_dir = megatron_lm["dist_tp2pp2"] / "iter_0000100"
    message = launch(D.resume_error_worker, 1, args=(str(root), LM_KIND, str(it_dir)))[0]
    assert "without this project's training state" in message
    assert f"model.megatron_checkpoint={it_dir}" in message
