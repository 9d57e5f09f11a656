"""PPO with the Megatron critic end to end on the tiny task: a short SFT phase (so that some
rollouts are rewarded and the critic has something to learn), then PPO with a critic warm-up step.
A run resumed from a checkpoint in the middle of the PPO phase matches the uninterrupted one, the
critic is saved next to the actor and exports to Hugging Face."""

from __future__ import annotations

import shutil

import pytest
import torch

from hpt_megatron.config import TrainerConfig
from hpt_megatron.trainer import checkpoint_dir
from tests.e2e.runs import comparable, hpt_train, metrics

pytestmark = pytest.mark.e2e

SFT_STEPS, PPO_STEPS = 30, 4
PHASES = (
    f"trainer.phases=[{{name: sft, steps: {SFT_STEPS}, algo: {{preset: sft}}}}, "
    f"{{name: ppo, steps: {PPO_STEPS}, algo: {{preset: ppo}}}}]"
)
SAVE_AT = SFT_STEPS + 2  # two PPO steps in: the critic has been trained (warm-up + one PPO step)
PPO = [
    PHASES,
    "trainer.mini_batch_prompts=8",
    "critic.warmup_steps=1",
    f"trainer.save_every={SAVE_AT}",
    "trainer.keep_last=5",
    "rollout.n=8",
]


def saved(run_dir):
    """The checkpoint written at step SAVE_AT (in the default checkpoint format)."""
    return checkpoint_dir(run_dir, SAVE_AT, TrainerConfig().checkpoint_format)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ppo")
    proc = hpt_train(run_dir, 1, *PPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_ppo_trains_the_critic_and_warms_it_up_first(reference):
    records = metrics(reference)
    assert [r["step"] for r in records] == list(range(1, SFT_STEPS + PPO_STEPS + 1))
    sft, ppo = records[:SFT_STEPS], records[SFT_STEPS:]
    assert not any(k.startswith("critic/") for r in sft for k in r)  # no values needed, no critic pass
    assert [r["critic/warmup"] for r in ppo] == [1.0] + [0.0] * (PPO_STEPS - 1)
    assert "actor/updates" not in ppo[0] and all(r["actor/updates"] == 2.0 for r in ppo[1:])
    assert all(r["critic/updates"] == 2.0 for r in ppo)
    # the critic starts from the SFT actor with a zero head: its first values are exactly 0
    assert ppo[0].get("critic/explained_variance", 0.0) == 0.0
    rewarded = [r for r in ppo if r["reward/mean"] > 0]
    assert rewarded, "the SFT phase should leave some rewarded rollouts (else the critic sees only zeros)"
    assert any(r["critic/value_loss"] > 0 for r in rewarded)
    assert any(r["critic/values_mean"] != 0 for r in ppo[1:])  # the warm-up step moved the critic


def test_critic_checkpoint_and_hf_export(reference, tmp_path):
    from transformers import AutoModelForTokenClassification

    from hpt_megatron.convert.cli import main as convert_main

    step = saved(reference)
    assert (step / "critic" / "meta.json").is_file() and (step / "critic" / "layout.json").is_file()
    out = tmp_path / "critic-hf"
    assert convert_main(["critic-to-hf", "--checkpoint", str(step), "--output-dir", str(out)]) == 0
    assert convert_main(["critic-to-hf", "--checkpoint", str(step), "--output-dir", str(out)]) == 2  # exists
    assert convert_main(["critic-to-hf", "--checkpoint", str(tmp_path), "--output-dir", str(out)]) == 2
    model = AutoModelForTokenClassification.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_labels == 1
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 1) and bool(torch.isfinite(logits).all())
    assert float(model.score.weight.detach().abs().sum()) > 0  # the trained head, not a fresh one


def test_resume_mid_ppo_matches_the_uninterrupted_run(reference, tmp_path):
    run_dir = tmp_path / "resumed"
    ckpt = tmp_path / "from" / saved(reference).name
    shutil.copytree(saved(reference), ckpt)
    proc = hpt_train(run_dir, 1, *PPO, f"trainer.resume={ckpt}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [comparable(r) for r in metrics(run_dir)]
    want = [comparable(r) for r in metrics(reference)][SAVE_AT:]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert got == want
