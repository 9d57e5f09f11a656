"""The toy study's bookkeeping: which runs it plans, how it picks each method's learning rate (on
validation, never on test), and the table it writes from finished runs."""

from __future__ import annotations

import json

import pytest

from hpt_megatron.experiments import study


def fake_run(method: str, lr: float, seed: int, val: float, test1: float, gamma: int = 0) -> dict:
    spec = study.RunSpec(method, lr, seed, gamma)
    return {
        "method": method, "lr": lr, "seed": seed, "gamma": gamma, "name": spec.name, "base_sha": "b",
        "val_curve": [[0, 0.0], [10, val]], "sft_fraction": [[1, 1.0], [10, 0.25]],
        "test": {"accuracy": test1, "pass_at_k": {"1": test1, "2": min(1.0, 2 * test1)}},
        "minutes": 1.0,
    }  # fmt: skip


def test_the_sweep_runs_one_seed_then_the_chosen_rates_run_every_seed_and_the_ablation():
    lrs, seeds = [1e-3, 3e-3], [0, 1, 2]
    phase1 = study.sweep(["sft", "hpt"], lrs, seeds[0])
    assert {(s.method, s.lr, s.seed) for s in phase1} == {(m, lr, 0) for m in ("sft", "hpt") for lr in lrs}
    runs = [fake_run("sft", 1e-3, 0, val=0.2, test1=0.5), fake_run("sft", 3e-3, 0, val=0.4, test1=0.1)]
    runs += [fake_run("hpt", 1e-3, 0, val=0.6, test1=0.1), fake_run("hpt", 3e-3, 0, val=0.5, test1=0.9)]
    best = study.choose_lr(study.group_runs(runs), 0)
    phase2 = study.at_chosen_lr(best, ["sft", "hpt"], seeds)
    assert {(s.method, s.lr, s.seed, s.gamma) for s in phase2} == (
        {("sft", 3e-3, s, 0) for s in seeds} | {("hpt", 1e-3, s, g) for s in seeds for g in (0, 1, 2)}
    )
    assert len({s.name for s in phase1 + phase2}) == len(phase1) + len(phase2) - 2  # seed 0 reused


def test_the_learning_rate_is_chosen_on_validation_not_test():
    runs = [fake_run("sft", 1e-3, s, val=0.8, test1=0.1) for s in range(3)]
    runs += [fake_run("sft", 3e-3, 0, val=0.6, test1=0.9)]  # better on test only
    best = study.choose_lr(study.group_runs(runs), 0)
    assert best["sft", 0].lr == 1e-3
    assert best["sft", 0].test(1) == [0.1, 0.1, 0.1]
    # only the sweep seed decides: later seeds at the chosen rate (worse here) cannot flip it
    runs = [fake_run("sft", 1e-3, 0, val=0.5, test1=0.1), fake_run("sft", 1e-3, 1, val=0.0, test1=0.1)]
    runs += [fake_run("sft", 3e-3, 0, val=0.4, test1=0.1)]
    assert study.choose_lr(study.group_runs(runs), 0)["sft", 0].lr == 1e-3


def test_report_writes_mean_and_spread_over_seeds(tmp_path):
    budget = study.Budget(samples=2)
    vals = {"hpt": [0.5, 0.7, 0.9], "grpo": [0.2, 0.2, 0.2]}
    for method, accs in vals.items():
        for seed, acc in enumerate(accs):
            r = fake_run(method, 1e-3, seed, val=acc, test1=acc / 2)
            (tmp_path / "runs" / r["name"]).mkdir(parents=True)
            (tmp_path / "runs" / r["name"] / "summary.json").write_text(json.dumps(r))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "test_metrics.json").write_text(
        json.dumps({"accuracy": 0.1, "pass_at_k": {"1": 0.1, "2": 0.15}})
    )
    md = study.report(tmp_path, budget, 0)
    rows = [
        line for line in md.splitlines() if line.startswith("| hpt (gamma 0)") or line.startswith("| grpo")
    ]
    assert rows[0].startswith("| hpt (gamma 0) | 0.001 | 3 | 0.700 ± 0.200 | 0.350 ± 0.100 | 0.700 ± 0.200 |")
    assert rows[1].startswith("| grpo | 0.001 | 3 | 0.200 ± 0.000 | 0.100 ± 0.000 |")
    assert "| base (before post-training) | - | - | - | 0.100 | 0.150 | - |" in md
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 6
    assert "| grpo | 0.200 |" in md and "| hpt (gamma 0) | 0.500 |" in md  # the sweep table: seed 0
    bad = fake_run("sft", 1e-3, 0, val=0.1, test1=0.1) | {"base_sha": "other"}
    (tmp_path / "runs" / "x").mkdir()
    (tmp_path / "runs" / "x" / "summary.json").write_text(json.dumps(bad))
    with pytest.raises(RuntimeError, match="2 different base models"):
        study.report(tmp_path, budget, 0)


def test_a_copied_base_is_used_only_with_the_recorded_weights(tmp_path, monkeypatch):
    """The committed base (docs/study/base/hf) is reused without retraining when its weights hash to
    the recorded one; any other weights stop the study with the folder to restore."""
    base = tmp_path / "base"
    (base / "hf").mkdir(parents=True)
    (base / "hf" / "config.json").write_text("{}")
    (base / "hf" / "model.safetensors").write_bytes(b"weights")
    sha = study.weights_sha(base / "hf")
    (base / "summary.json").write_text(json.dumps({"steps": 200, "sha": sha}))
    monkeypatch.setattr(study, "hpt_train", lambda *a: pytest.fail("the base must not be retrained"))
    assert study.train_base(tmp_path, study.Budget()) == base / "hf"
    (base / "hf" / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(
        RuntimeError, match=r"are not the base the recorded runs started from .*docs/study/base/hf"
    ):
        study.train_base(tmp_path, study.Budget())
