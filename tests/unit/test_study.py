"""The toy study's bookkeeping: which runs it plans, how it picks each method's learning rate (on
validation, never on test), and the table it writes from finished runs."""

from __future__ import annotations

import json

from hpt_megatron.experiments import study


def fake_run(method: str, lr: float, seed: int, val: float, test1: float, gamma: int = 0) -> dict:
    spec = study.RunSpec(method, lr, seed, gamma)
    return {
        "method": method, "lr": lr, "seed": seed, "gamma": gamma, "name": spec.name,
        "val_curve": [[0, 0.0], [10, val]], "sft_fraction": [[1, 1.0], [10, 0.25]],
        "test": {"accuracy": test1, "pass_at_k": {"1": test1, "2": min(1.0, 2 * test1)}},
        "minutes": 1.0,
    }  # fmt: skip


def test_plan_covers_every_method_lr_seed_and_the_gate_ablation():
    specs = study.plan(["sft", "hpt"], [1e-3, 3e-3], [0, 1, 2])
    assert len(specs) == 2 * 2 * 3 + 2 * 2 * 3  # methods x lrs x seeds, then gamma 1 and 2 for HPT
    assert len({s.name for s in specs}) == len(specs)
    assert {s.gamma for s in specs if s.method == "hpt"} == {0, 1, 2}


def test_the_learning_rate_is_chosen_on_validation_not_test():
    runs = [fake_run("sft", 1e-3, s, val=0.8, test1=0.1) for s in range(3)]
    runs += [fake_run("sft", 3e-3, s, val=0.6, test1=0.9) for s in range(3)]  # better on test only
    best = study.choose_lr(study.group_runs(runs))
    assert best["sft", 0].lr == 1e-3
    assert best["sft", 0].test(1) == [0.1, 0.1, 0.1]


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
    md = study.report(tmp_path, budget)
    rows = [
        line for line in md.splitlines() if line.startswith("| hpt (gamma 0)") or line.startswith("| grpo")
    ]
    assert rows[0].startswith("| hpt (gamma 0) | 0.001 | 3 | 0.700 ± 0.200 | 0.350 ± 0.100 | 0.700 ± 0.200 |")
    assert rows[1].startswith("| grpo | 0.001 | 3 | 0.200 ± 0.000 | 0.100 ± 0.000 |")
    assert "| base (before post-training) | - | - | - | 0.100 | 0.150 | - |" in md
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 6
