"""Compare post-training algorithms on the embedded synthetic task under one budget.

    python -m hpt_megatron.experiments.compare --out runs/compare            # all, 300 steps each
    python -m hpt_megatron.experiments.compare --algos hpt grpo --steps 100

Every run is configs/tiny_cpu.yaml (same random initialisation, data, prompts per step, optimizer and
number of steps) with only the algorithm changed; ``sft_then_grpo`` spends half the steps on each.
Writes ``results.md`` (a table), ``results.json`` and ``curves.png`` (held-out accuracy and the
fraction of prompts trained by SFT over steps) into ``--out``; each run's own directory is under it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from hpt_megatron.observability.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "tiny_cpu.yaml"
ALGOS = ("sft", "grpo", "sft_then_grpo", "luffy", "srft", "hpt")


def algo_overrides(name: str, steps: int) -> list[str]:
    """How each algorithm differs from tiny_cpu (which runs the released HPT gate)."""
    if name == "hpt":
        return []
    if name == "sft_then_grpo":
        half = steps // 2
        phases = f"[{{name: sft, steps: {half}, algo: {{preset: sft}}}}, {{name: grpo, steps: {steps - half}, algo: {{preset: grpo}}}}]"
        return [f"trainer.phases={phases}", "algo={preset: grpo}"]
    return [f"algo={{preset: {name}}}"]  # the whole block: tiny_cpu's gate threshold is HPT's


def run_one(name: str, steps: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / name
    cmd = [
        sys.executable,
        "-m",
        "hpt_megatron.cli",
        str(RECIPE),
        f"trainer.total_steps={steps}",
        f"trainer.output_dir={run_dir}",
        "trainer.save_every=0",
        "logging.progress=false",
        *algo_overrides(name, steps),
        *extra,
    ]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - start
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {out / (name + '.log')}")
    return summarize(name, read_jsonl(run_dir / "metrics.jsonl"), seconds)


def summarize(name: str, records: list[dict], seconds: float) -> dict:
    evals = [(r["step"], r["eval/accuracy"]) for r in records if r.get("eval/accuracy") is not None]
    sft = [(r["step"], r["hpt/sft_fraction"]) for r in records if r.get("hpt/sft_fraction") is not None]

    def first_step(threshold: float) -> int | None:
        return next((s for s, a in evals if a >= threshold), None)

    return {
        "algo": name,
        "final_eval": evals[-1][1] if evals else None,
        "best_eval": max((a for _, a in evals), default=None),
        "steps_to_50": first_step(0.5),
        "steps_to_80": first_step(0.8),
        "final_sft_fraction": sft[-1][1] if sft else None,
        "minutes": seconds / 60,
        "eval_curve": evals,
        "sft_curve": sft,
    }


def markdown(results: list[dict], steps: int) -> str:
    def fmt(v, pattern="{:.3f}"):
        return "-" if v is None else pattern.format(v)

    lines = [
        f"| algorithm ({steps} steps) | held-out acc (final) | best | steps to 50% | steps to 80% | SFT fraction (final) | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['algo']} | {fmt(r['final_eval'])} | {fmt(r['best_eval'])} | {fmt(r['steps_to_50'], '{}')} | "
            f"{fmt(r['steps_to_80'], '{}')} | {fmt(r['final_sft_fraction'], '{:.2f}')} | {r['minutes']:.1f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        if r["eval_curve"]:
            ax1.plot(*zip(*r["eval_curve"]), marker="o", label=r["algo"])
        if r["sft_curve"] and r["algo"] in ("hpt", "sft_then_grpo", "sft"):
            ax2.plot(*zip(*r["sft_curve"]), label=r["algo"], lw=1.2)
    ax1.set(title="held-out accuracy (greedy)", xlabel="step", ylim=(-0.02, 1.02))
    ax2.set(title="fraction of prompts trained by SFT", xlabel="step", ylim=(-0.02, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.algos:
        print(f"running {name} ...", flush=True)
        results.append(run_one(name, args.steps, out, args.overrides))
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(markdown(results, args.steps) + "\n")
        plot(results, out / "curves.png")
        print(
            f"  {name}: final held-out accuracy {results[-1]['final_eval']}, {results[-1]['minutes']:.1f} min",
            flush=True,
        )
    print("\n" + markdown(results, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
