"""The toy study: does HPT beat SFT, GRPO, SFT->GRPO, LUFFY and SRFT when the base model already
solves part of the task (the paper's premise)?

    python -m hpt_megatron.experiments.study --out runs/study            # everything; resumable
    python -m hpt_megatron.experiments.study --out runs/study --report   # tables and plot from what ran
    python -m hpt_megatron.experiments.study --out runs/study --quick    # a smoke run of every stage

1. **Base model.** The tiny Qwen2 shape of configs/tiny_cpu.yaml, trained by SFT on an easier related
   distribution (one-operation problems) and cached in ``OUT/base``. It solves the one-step part of
   the task and rarely the two- and three-step rest, so its rollouts succeed on some prompts and
   fail on others, as Qwen2.5-Math's do on MATH.
2. **Post-training.** Every method starts from that base under one budget (steps, prompts per
   step, rollouts per prompt, optimizer): SFT, GRPO, SFT->GRPO (half the steps each), LUFFY, SRFT and
   HPT (released losses, SFT iff no rollout of a prompt is correct), each at every learning rate of
   ``--lrs`` and every seed of ``--seeds``. The learning rate of each method is chosen on the
   validation split (greedy accuracy at the end, mean over seeds); its results are reported on a
   separate test split.
3. **Gate ablation.** HPT with the switch threshold gamma = 0, 1, 2 (of 4 rollouts), at HPT's chosen
   learning rate: accuracy and the fraction of prompts trained by SFT.
4. **Metrics.** Greedy held-out accuracy over training; on the test split, pass@k for k = 1 .. 16
   from 16 samples per problem at the rollout temperature (``hpt-eval``, unbiased estimator).

Every run lives in its own directory with a ``summary.json`` written last: a re-run skips finished
runs and resumes unfinished ones from their checkpoints. Writes ``results.md``, ``results.json`` and
``study.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpt_megatron.experiments.compare import algo_overrides
from hpt_megatron.observability.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "tiny_cpu.yaml"
METHODS = ("sft", "grpo", "sft_then_grpo", "luffy", "srft", "hpt")
GAMMAS = (0, 1, 2)
PASS_K = (1, 2, 4, 8, 16)
# the target task's difficulty (data.synthetic keys, also hpt_megatron.data.synthetic.Difficulty's)
TARGET = {"min_steps": 1, "max_steps": 3, "max_value": 12, "max_start": 9, "max_operand": 5}


def synthetic(train: int, seed: int, **difficulty: int) -> str:
    """A ``data.synthetic=`` value: the target task with ``difficulty`` overrides."""
    keys = {"train": train, "val": 200, "seed": seed, **TARGET, **difficulty}
    return "{" + ", ".join(f"{k}: {v}" for k, v in keys.items()) + "}"


TASK = synthetic(20000, seed=0)
BASE_TASK = synthetic(10000, seed=1, max_steps=1)  # the easier related distribution: one operation
LENGTHS = ("data.max_response_len=64", "rollout.max_new_tokens=48", "eval.max_new_tokens=48")


@dataclass(frozen=True)
class Budget:
    base_steps: int = 200
    base_prompts_per_step: int = 128
    steps: int = 100
    prompts_per_step: int = 64
    eval_every: int = 25
    test_problems: int = 200
    samples: int = 16

    @classmethod
    def quick(cls) -> Budget:
        return cls(
            base_steps=4,
            base_prompts_per_step=8,
            steps=4,
            prompts_per_step=8,
            eval_every=2,
            test_problems=8,
            samples=4,
        )


@dataclass(frozen=True)
class RunSpec:
    method: str
    lr: float
    seed: int
    gamma: int = 0  # HPT's switch threshold (rollouts of 4 that may be correct while still SFT)

    @property
    def name(self) -> str:
        gate = f"_g{self.gamma}" if self.method == "hpt" else ""
        return f"{self.method}{gate}_lr{self.lr:g}_s{self.seed}"


def method_overrides(spec: RunSpec, steps: int) -> list[str]:
    """How each method differs from the shared recipe (as in the from-scratch comparison, except HPT's
    gate threshold, which the ablation varies)."""
    if spec.method == "hpt":
        return [f"algo={{preset: hpt_official, gate: {{gamma: {spec.gamma}}}}}"]
    return algo_overrides(spec.method, steps)


def hpt_train(run_dir: Path, overrides: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "hpt_megatron.cli", str(RECIPE), f"trainer.output_dir={run_dir}"]
    cmd += ["logging.progress=false", *LENGTHS, *overrides, "--resume", "auto"]
    with log.open("a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training in {run_dir} failed (exit {proc.returncode}); see {log}")


def hpt_eval(model: Path, files: Path, out: Path, budget: Budget, temperature: float, log: Path) -> dict:
    """pass@k on ``files`` from ``budget.samples`` samples per problem."""
    ks = [k for k in PASS_K if k <= budget.samples]
    cmd = [
        sys.executable,
        "-c",
        "import sys; from hpt_megatron.cli import eval_main; sys.exit(eval_main(sys.argv[1:]))",
        "--model", str(model), "--files", str(files), "--output-dir", str(out), "--device", "cpu",
        "--default-samples", str(budget.samples), "--pass-k", *map(str, ks),
        "--temperature", str(temperature), "--top-p", "1.0", "--max-new-tokens", "48",
        "--default-system-prompt", "", "--workers", "1",
    ]  # fmt: skip
    with log.open("a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluating {model} failed (exit {proc.returncode}); see {log}")
    (source,) = json.loads((out / "results.json").read_text())["sources"].values()
    return {"accuracy": source["accuracy"], "pass_at_k": source["pass_at_k"]}  # keys: str(k)


def write_test_split(out: Path, budget: Budget) -> Path:
    """Held-out problems of the target task drawn with another seed: never trained on (the
    generator assigns problems to splits by their content), never used to choose a learning rate."""
    from hpt_megatron.data import write_rows
    from hpt_megatron.data.synthetic import Difficulty, generate_problems, problem_to_row

    path = out / "test.parquet"
    if not path.exists():
        difficulty = Difficulty(**TARGET)
        problems = generate_problems(budget.test_problems, split="val", seed=1000, difficulty=difficulty)
        write_rows([problem_to_row(p, split="val", index=i) for i, p in enumerate(problems)], path)
    return path


# ---- stages -----------------------------------------------------------------------------------------


def weights_sha(hf_dir: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(hf_dir.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def train_base(out: Path, budget: Budget) -> Path:
    """SFT on one-step problems; the exported Hugging Face folder is the base of every run. A study
    directory copied with its base (docs/study/base/hf) uses it, checked against the recorded hash;
    one copied without rebuilds it and checks it is the same model (CPU training is deterministic at
    a fixed thread count and code version)."""
    run_dir = out / "base"
    summary = run_dir / "summary.json"
    recorded = json.loads(summary.read_text()).get("sha") if summary.exists() else None
    if recorded is not None and (run_dir / "hf" / "config.json").exists():
        if weights_sha(run_dir / "hf") != recorded:
            raise RuntimeError(
                f"{run_dir / 'hf'}: its weights (hash {weights_sha(run_dir / 'hf')}) are not the base the "
                f"recorded runs started from ({recorded}); restore that folder (docs/study/base/hf)"
            )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        overrides = [
            f"data.synthetic={BASE_TASK}", "algo={preset: sft}", f"trainer.total_steps={budget.base_steps}",
            f"trainer.prompts_per_step={budget.base_prompts_per_step}",
            f"trainer.mini_batch_prompts={budget.base_prompts_per_step}", "trainer.eval_every=0",
            "trainer.save_every=50", "trainer.eval_before_train=false",
        ]  # fmt: skip
        hpt_train(run_dir, overrides, run_dir / "train.log")
        sha = weights_sha(run_dir / "hf")
        if recorded is not None and sha != recorded:
            raise RuntimeError(
                f"{run_dir}: the rebuilt base model (weights {sha}) differs from the one the recorded runs "
                f"started from ({recorded}); another torch version, thread count or code version changes training. "
                f"Restore docs/study/base/hf, or move "
                f"{out / 'runs'} away to start the study over."
            )
        summary.write_text(json.dumps({"steps": budget.base_steps, "sha": sha}))
    return run_dir / "hf"


def post_train(out: Path, base: Path, spec: RunSpec, budget: Budget, test: Path) -> dict:
    run_dir = out / "runs" / spec.name
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    overrides = [
        f"model.path={base}", f"data.synthetic={TASK}", f"optim.lr={spec.lr}", f"optim.min_lr={spec.lr / 10}",
        f"trainer.seed={spec.seed}", f"trainer.total_steps={budget.steps}",
        f"trainer.prompts_per_step={budget.prompts_per_step}",
        f"trainer.mini_batch_prompts={budget.prompts_per_step}", f"trainer.eval_every={budget.eval_every}",
        "trainer.save_every=25", *method_overrides(spec, budget.steps),
    ]  # fmt: skip
    hpt_train(run_dir, overrides, run_dir / "train.log")
    minutes = (time.time() - start) / 60
    records = read_jsonl(run_dir / "metrics.jsonl")
    test_metrics = hpt_eval(run_dir / "hf", test, run_dir / "eval_test", budget, 1.0, run_dir / "eval.log")
    result = {
        **asdict(spec),
        "name": spec.name,
        "base_sha": json.loads((base.parent / "summary.json").read_text())["sha"],
        "val_curve": [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r],
        "sft_fraction": [(r["step"], r["hpt/sft_fraction"]) for r in records if "hpt/sft_fraction" in r],
        "test": test_metrics,
        "minutes": minutes,
    }
    summary.write_text(json.dumps(result, indent=1))
    return result


def base_metrics(out: Path, base: Path, budget: Budget, test: Path) -> dict:
    path = out / "base" / "test_metrics.json"
    if not path.exists():
        metrics = hpt_eval(base, test, out / "base" / "eval_test", budget, 1.0, out / "base" / "eval.log")
        path.write_text(json.dumps(metrics))
    return json.loads(path.read_text())


# ---- report -----------------------------------------------------------------------------------------


@dataclass
class Group:
    """The runs of one method (and gate threshold) at one learning rate, one per seed."""

    method: str
    lr: float
    gamma: int
    runs: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"hpt (gamma {self.gamma})" if self.method == "hpt" else self.method

    def final_val(self) -> list[float]:
        return [r["val_curve"][-1][1] for r in self.runs if r["val_curve"]]

    def test(self, k: int) -> list[float]:
        return [r["test"]["pass_at_k"][str(k)] for r in self.runs]


def group_runs(results: list[dict]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for r in results:
        key = (r["method"], r["lr"], r["gamma"] if r["method"] == "hpt" else 0)
        groups.setdefault(key, Group(*key)).runs.append(r)
    return list(groups.values())


def choose_lr(groups: list[Group], sweep_seed: int | None) -> dict[tuple[str, int], Group]:
    """Per method (and gamma), the learning rate with the best final validation accuracy of the
    sweep's seed (the other seeds run only at the chosen rate, so they must not change the choice)."""

    def score(g: Group) -> float:
        picked = [r for r in g.runs if sweep_seed is None or r["seed"] == sweep_seed]
        return mean([r["val_curve"][-1][1] for r in picked if r["val_curve"]])

    best: dict[tuple[str, int], Group] = {}
    for g in groups:
        key = (g.method, g.gamma)
        if not math.isnan(score(g)) and (key not in best or score(g) > score(best[key])):
            best[key] = g
    return best


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{mean(xs):.3f} ± {sd:.3f}"


def markdown(best: dict, base: dict, budget: Budget, ks: tuple[int, ...]) -> str:
    head = (
        "| method | lr | seeds | val acc (greedy) | "
        + " | ".join(f"test pass@{k}" for k in ks)
        + " | SFT frac |"
    )
    lines = [head, "|" + "---|" * (5 + len(ks))]
    base_cells = " | ".join(f"{base['pass_at_k'][str(k)]:.3f}" for k in ks)
    lines.append(f"| base (before post-training) | - | - | - | {base_cells} | - |")
    for (method, gamma), g in sorted(best.items(), key=lambda kv: -mean(kv[1].test(1))):
        if method == "hpt" and gamma != 0:
            continue
        sft = [r["sft_fraction"][-1][1] for r in g.runs if r["sft_fraction"]]
        cells = " | ".join(spread(g.test(k)) for k in ks)
        lines.append(
            f"| {g.label} | {g.lr:g} | {len(g.runs)} | {spread(g.final_val())} | {cells} | {mean(sft):.2f} |"
        )
    return "\n".join(lines)


def ablation_markdown(groups: list[Group], hpt_lr: float) -> str:
    lines = [
        "| gamma | seeds | val acc (greedy) | test pass@1 | SFT fraction (first / last step) |",
        "|---|---|---|---|---|",
    ]
    for g in sorted((g for g in groups if g.method == "hpt" and g.lr == hpt_lr), key=lambda g: g.gamma):
        first = [r["sft_fraction"][0][1] for r in g.runs if r["sft_fraction"]]
        last = [r["sft_fraction"][-1][1] for r in g.runs if r["sft_fraction"]]
        lines.append(
            f"| {g.gamma} | {len(g.runs)} | {spread(g.final_val())} | {spread(g.test(1))} | "
            f"{mean(first):.2f} / {mean(last):.2f} |"
        )
    return "\n".join(lines)


def plot(best: dict, base: dict, ks: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.plot(ks, [base["pass_at_k"][str(k)] for k in ks], "k--", label="base")
    for (method, gamma), g in sorted(best.items()):
        if method == "hpt" and gamma != 0:
            continue
        ax1.plot(ks, [mean(g.test(k)) for k in ks], marker="o", label=g.label)
        steps = [s for s, _ in g.runs[0]["val_curve"]]
        curves = [[a for _, a in r["val_curve"]] for r in g.runs if len(r["val_curve"]) == len(steps)]
        ax2.plot(steps, [mean(list(c)) for c in zip(*curves)], marker=".", label=g.label)
    ax1.set(title="test pass@k (16 samples, T = 1)", xlabel="k", xscale="log", ylim=(-0.02, 1.02))
    ax1.set_xticks(list(ks), [str(k) for k in ks])
    ax2.set(title="validation accuracy (greedy, mean over seeds)", xlabel="step", ylim=(-0.02, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_markdown(groups: list[Group], sweep_seed: int | None) -> str:
    """Final validation accuracy of every (method, learning rate) for the sweep's seed."""
    lrs = sorted({g.lr for g in groups})
    cell = {(g.label, g.lr): [r["val_curve"][-1][1] for r in g.runs if r["seed"] == sweep_seed or sweep_seed is None]
            for g in groups if g.method != "hpt" or g.gamma == 0}  # fmt: skip
    labels = sorted({label for label, _ in cell})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for label in labels:
        vals = [cell.get((label, lr)) for lr in lrs]
        lines.append(f"| {label} | " + " | ".join(f"{v[0]:.3f}" if v else "-" for v in vals) + " |")
    return "\n".join(lines)


def report(out: Path, budget: Budget, sweep_seed: int | None = 0) -> str:
    results = finished(out)
    bases = {r.get("base_sha") for r in results}
    if len(bases) > 1:
        raise RuntimeError(f"{out}/runs holds runs of {len(bases)} different base models; keep one set")
    base = json.loads((out / "base" / "test_metrics.json").read_text())
    ks = tuple(k for k in PASS_K if k <= budget.samples)
    groups = group_runs(results)
    best = choose_lr(groups, sweep_seed)
    text = [
        f"Post-training budget: {budget.steps} steps x {budget.prompts_per_step} prompts x 4 rollouts; "
        f"test: {budget.test_problems} problems x {budget.samples} samples at T = 1.",
        "",
        markdown(best, base, budget, ks),
        "",
        f"Learning-rate sweep (validation accuracy, greedy, final step, seed {sweep_seed}):",
        "",
        sweep_markdown(groups, sweep_seed),
        "",
    ]
    if ("hpt", 0) in best:
        text += [
            "Gate ablation (HPT at its chosen learning rate):",
            "",
            ablation_markdown(groups, best["hpt", 0].lr),
        ]
    md = "\n".join(text) + "\n"
    (out / "results.md").write_text(md)
    record = {"budget": asdict(budget), "base": base, "runs": results}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    plot(best, base, ks, out / "study.png")
    return md


# ---- the study --------------------------------------------------------------------------------------


def sweep(methods: list[str], lrs: list[float], seed: int) -> list[RunSpec]:
    """Phase 1: every method at every learning rate, one seed."""
    return [RunSpec(m, lr, seed) for m in methods for lr in lrs]


def at_chosen_lr(best: dict, methods: list[str], seeds: list[int]) -> list[RunSpec]:
    """Phase 2: each method at its chosen learning rate, every seed; phase 3, the gate ablation
    (gamma 1 and 2) at HPT's."""
    specs = [RunSpec(m, best[m, 0].lr, s) for m in methods for s in seeds]
    if "hpt" in methods:
        specs += [RunSpec("hpt", best["hpt", 0].lr, s, gamma) for gamma in GAMMAS[1:] for s in seeds]
    return specs


def finished(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/summary.json"))]


def run_specs(
    out: Path, base: Path, specs: list[RunSpec], budget: Budget, test: Path, desc: str, sweep_seed: int
) -> None:
    from tqdm import tqdm

    for spec in tqdm(specs, desc=desc, unit="run"):
        post_train(out, base, spec, budget, test)
        report(out, budget, sweep_seed)  # the learning rates stay chosen on the sweep's seed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/study"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    # 1e-4 was never the best of any method in a first sweep over 1e-4 .. 3e-3
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the first one runs the LR sweep")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: checks the pipeline only")
    p.add_argument(
        "--report", action="store_true", help="only rebuild the tables and plot from finished runs"
    )
    args = p.parse_args(argv)
    budget = Budget.quick() if args.quick else Budget()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        test = write_test_split(args.out, budget)
        base = train_base(args.out, budget)
        base_metrics(args.out, base, budget, test)
        first = args.seeds[0]
        run_specs(args.out, base, sweep(args.methods, args.lrs, first), budget, test, "lr sweep", first)
        best = choose_lr(group_runs(finished(args.out)), first)
        run_specs(args.out, base, at_chosen_lr(best, args.methods, args.seeds), budget, test, "seeds", first)
    print(report(args.out, budget, args.seeds[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
