"""Wall-clock step time of synchronous vs asynchronous (one-step-off) rollouts on a recipe.

    python -m hpt_megatron.benchmarks.async_rollout                       # the default run's steps
    python -m hpt_megatron.benchmarks.async_rollout --steps 12 --staleness 1 2
    python -m hpt_megatron.benchmarks.async_rollout --config configs/tiny_cpu.yaml 'algo={preset: grpo}'

Each mode trains the same recipe from the same start (same seed, so the same prompts per step) in
this process: a few warm-up steps, then ``--steps`` timed steps, wall clock around the whole loop
(generation, reward, update, weight sync). The synchronous run's stage times give the bound an
overlap can reach: max(rollout, the rest) per step instead of their sum. Modes alternate run by run
(``--repeats``), each reports its fastest run, so load from other processes hits them alike.

Two comparisons: both modes on all cores (asynchronous mode splits them between the actor and the
engine thread), and each stage on half the cores against a synchronous run on half, the setting of
generation and training on devices of their own.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUIET = [
    "logging.progress=false",
    "logging.tensorboard=false",
    "logging.jsonl=false",
    "trainer.eval_every=0",
    "trainer.eval_before_train=false",
    "trainer.save_every=0",
]


def measure(
    config: Path,
    overrides: list[str],
    staleness: int,
    warmup: int,
    steps: int,
    threads: int,
    engine_threads: int = 0,
) -> dict:
    """Train warmup + steps steps on ``threads`` torch threads (asynchronous: the engine thread takes
    ``engine_threads`` of them); the timed steps' wall clock and the mean stage times."""
    import torch

    from hpt_megatron.config import load_config
    from hpt_megatron.run_setup import setup_run, teardown
    from hpt_megatron.trainer import train_step

    with tempfile.TemporaryDirectory() as tmp:
        total = warmup + steps
        cfg = load_config(
            config,
            [*overrides, *QUIET, f"trainer.output_dir={tmp}", f"trainer.total_steps={total}",
             f"rollout.async_staleness={staleness}", f"rollout.async_engine_threads={engine_threads}"],
        )  # fmt: skip
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        run = setup_run(cfg)
        try:
            for step in range(warmup):
                train_step(run, step)
            records = []
            start = time.perf_counter()
            for step in range(warmup, total):
                records.append(train_step(run, step))
            seconds = time.perf_counter() - start
        finally:
            if run.ahead is not None:
                run.ahead.close()
            teardown(run)
            torch.set_num_threads(before)  # the asynchronous worker gave the actor fewer

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in records) / len(records)

    rollout = mean("perf/time/rollout")
    return {
        "step_s": seconds / steps,
        "rollout_s": rollout,  # synchronous: generation; asynchronous: the wait for it
        "rest_s": mean("perf/step_s") - rollout,
        "generated_tokens": mean("rollout/generated_tokens"),
        "train_tokens": mean("perf/train_tokens"),
    }


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny_cpu.yaml")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--staleness", type=int, default=1, help="the asynchronous mode's rollout.async_staleness")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode (the fastest counts)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="torch threads in all")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.staleness < 1 or args.repeats < 1 or args.cores < 1:
        p.error("--steps, --staleness, --repeats and --cores must be >= 1, --warmup >= 0")

    half = max(1, args.cores // 2)
    # (label, staleness, torch threads, engine threads): the same cores for both modes; and one
    # half of the cores per stage, as when generation and training have their own devices
    modes = [
        ("sync, all cores", 0, args.cores, 0),
        (f"async k={args.staleness}, cores split", args.staleness, args.cores, half),
        ("sync, half the cores", 0, half, 0),
        (f"async k={args.staleness}, half per stage", args.staleness, 2 * half, half),
    ]
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for label, k, threads, engine in modes:
            r = measure(args.config, args.overrides, k, args.warmup, args.steps, threads, engine)
            if label not in best or r["step_s"] < best[label]["step_s"]:
                best[label] = r
    print(f"== {args.config.name} {' '.join(args.overrides)}: {args.steps} timed steps after {args.warmup}, "
          f"{args.cores} cores, fastest of {args.repeats} runs per mode")  # fmt: skip
    for label, *_ in modes:
        r = best[label]
        print(
            f"{label:<28} step {r['step_s']:7.3f} s   rollout (wait) {r['rollout_s']:6.3f} s   "
            f"rest {r['rest_s']:6.3f} s   {r['generated_tokens']:6.0f} generated + "
            f"{r['train_tokens']:6.0f} trained tokens/step"
        )
    labels = [m[0] for m in modes]
    for sync, other in ((labels[0], labels[1]), (labels[2], labels[3])):
        s0 = best[sync]
        bound = max(s0["rollout_s"], s0["rest_s"]) / (s0["rollout_s"] + s0["rest_s"])
        print(
            f"{other} / {sync}: step time {best[other]['step_s'] / s0['step_s']:.2f}x "
            f"(full overlap of the synchronous stages: {bound:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
