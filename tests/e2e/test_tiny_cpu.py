"""End-to-end runs of the embedded default (tiny_cpu), shrunk to a few steps."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.runs import ROOT, TINY, comparable, hpt_train, metrics, overrides

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    # also profiles steps 2..3 with torch.profiler (the CPU stand-in for the nsys window)
    proc = hpt_train(run_dir, 6, "profile.steps=[2,3]", "profile.torch_profiler=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_a_short_run_learns_and_exports_a_working_model(reference):
    records = metrics(reference)
    assert [r["step"] for r in records] == list(range(1, 7))
    first, last = records[0], records[-1]
    # random init: every prompt fails its rollouts, so HPT trains them all by SFT at first
    assert first["hpt/sft_fraction"] == 1.0 and first["rollout/accuracy"] == 0.0
    assert last["loss/sft"] < 0.8 * first["loss/sft"]  # learning signal
    for key in (
        "hpt/sft_fraction",
        "rollout/accuracy",
        "reward/mean",
        "loss/total",
        "actor/grad_norm",
        "actor/entropy",
        "perf/time/rollout",
        "perf/time/update",
        "perf/weight_sync_s",
        "perf/weight_sync_bytes",
        "perf/actor_tflops_per_device",
        "perf/peak_memory_gib_max",
        "perf/generated_tokens_per_s",
        "perf/samples_per_s",
    ):
        assert key in last, key
    assert last["perf/actor_tflops_per_device"] > 0 and last["perf/peak_memory_gib_max"] > 0

    # the profiled window's trace, written by the worker, holds the actor's stage ranges
    trace = reference / "profile" / "rank_0" / "trace_steps2-3.json"
    assert trace.is_file()
    events = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"actor/forward", "actor/forward_backward", "actor/optimizer"} <= events

    # outputs: Megatron checkpoint, Hugging Face model, plots, summary
    # torch_dist, Megatron-LM's layout: iter_0000006/ and the tracker naming it
    assert (reference / "checkpoints" / "iter_0000006" / "common.pt").is_file()
    assert (reference / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (reference / "plots.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        "held-out" in (reference / "summary.txt").read_text()
        or "rollout acc" in (reference / "summary.txt").read_text()
    )
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    # the synthetic task's tokenizer is not Qwen2's: load the exported file as saved (AutoTokenizer
    # would pick Qwen2Tokenizer from config.json), and it must encode exactly like training did
    model = AutoModelForCausalLM.from_pretrained(reference / "hf")
    tok = PreTrainedTokenizerFast.from_pretrained(reference / "hf")
    trained = PreTrainedTokenizerFast.from_pretrained(reference / "tokenizer")
    messages = [{"role": "user", "content": "Tom has 3 apples. How many apples does Tom have now?"}]

    def encode(t):
        return t.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )

    ids = encode(tok)["input_ids"]
    assert ids.tolist() == encode(trained)["input_ids"].tolist()
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_sigterm_checkpoints_and_resume_matches_the_uninterrupted_run(reference, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "hpt_megatron.cli", str(TINY), *overrides(run_dir, 6)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    stopped_at = int((run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert (
        2 <= stopped_at < 6 and (run_dir / "checkpoints" / f"iter_{stopped_at:07d}" / "common.pt").is_file()
    )

    resumed = hpt_train(run_dir, 6, "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    got = [comparable(r) for r in metrics(run_dir)]
    want = [comparable(r) for r in metrics(reference)]
    assert [r["step"] for r in got] == list(range(1, 7))
    assert got == want


def test_kill_9_during_a_save_then_resume_matches_the_uninterrupted_run(reference, tmp_path):
    """SIGKILL (no handler runs) while a torch_dist save is being written: the tracker still names
    the previous complete checkpoint, and resuming from it reproduces the uninterrupted run."""
    import os

    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    cmd = [
        sys.executable,
        "-m",
        "hpt_megatron.cli",
        str(TINY),
        *overrides(run_dir, 6, "trainer.save_every=1"),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline, partial = time.time() + 300, []
    while time.time() < deadline and proc.poll() is None and not partial:
        done = len(metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
        partial = [p for p in ckpts.glob(".iter_*.partial")] if done >= 2 else []
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial, "the run ended before a save was caught in progress"
    tracked = int((ckpts / "latest_checkpointed_iteration.txt").read_text())
    assert tracked >= 1 and f".iter_{tracked:07d}.partial" != partial[0].name
    assert all(
        (ckpts / f"iter_{tracked:07d}" / f).is_file() for f in ("metadata.json", ".metadata", "common.pt")
    )

    resumed = hpt_train(run_dir, 6, "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {tracked}" in resumed.stdout
    got = [comparable(r) for r in metrics(run_dir)]
    want = [comparable(r) for r in metrics(reference)]
    assert got == want
