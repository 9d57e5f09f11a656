"""Console entry points: ``hpt-train``, ``hpt-eval``, ``hpt-convert``."""

from __future__ import annotations

import argparse
import sys

import yaml

from hpt_megatron.algo.presets import list_presets
from hpt_megatron.algo.registry import describe
from hpt_megatron.config.io import ConfigError

DEFAULT_CONFIG = "configs/tiny_cpu.yaml"


def algorithms_table() -> list[list[str]]:
    """One row per (preset, term): the four UPGE parts and the reduction, from the live registry."""
    rows = []
    for p in list_presets():
        algo = p.build()
        extras = []
        if algo.entropy_coef:
            extras.append(f"entropy {algo.entropy_coef:g}")
        if algo.kl.coef:
            extras.append(f"kl {algo.kl.coef:g} ({algo.kl.estimator})")
        extras += [f"{k}={v}" for k, v in p.overrides.items()]
        if algo.drop_uniform_groups:
            extras.append("drop uniform groups")
        for i, (name, t) in enumerate(algo.terms.items()):
            shown_gate, shown_extra = (describe(algo.gate), ", ".join(extras)) if i == 0 else ("", "")
            advantage = describe(t.advantage)
            if t.weight.name != "none":
                advantage += f" x {describe(t.weight)}"
            rows.append(
                [
                    p.name if i == 0 else "",
                    shown_gate,
                    f"{name} ({', '.join(t.sources)})" + (f" x{t.coef:g}" if t.coef != 1 else ""),
                    describe(t.mask),
                    describe(t.ref),
                    advantage,
                    describe(t.transform),
                    describe(t.reduction),
                    shown_extra,
                ]
            )
    return rows


TABLE_HEADER = [
    "preset",
    "gate",
    "term (rows)",
    "mask",
    "pi_ref",
    "advantage",
    "transform",
    "reduction",
    "extras",
]


def algorithms_markdown() -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in algorithms_table()]
    return "\n".join(lines)


def print_algorithms() -> None:
    rows = [TABLE_HEADER, *algorithms_table()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    for j, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print("\nEach term trains the rows of its sources: rl = on-policy rollouts, offpolicy = a demonstration")
    print("inside its prompt's rollout group, sft = a demonstration trained by SFT. Compose your own in")
    print("a recipe: algo: {preset: grpo, terms: {rl: {mask: {name: cispo, eps_high: 4.0}}}}")


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hpt-train",
        description="Train a policy with HPT or any UPGE algorithm. Overrides are dotted keys: algo.gate.gamma=2",
    )
    p.add_argument(
        "config", nargs="?", default=DEFAULT_CONFIG, help=f"recipe YAML (default: {DEFAULT_CONFIG})"
    )
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, applied after the recipe")
    p.add_argument(
        "--list-algorithms", action="store_true", help="print every preset with its four components"
    )
    p.add_argument("--markdown", action="store_true", help="with --list-algorithms: print a markdown table")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument(
        "--dry-run", action="store_true", help="validate the recipe and print the plan; no training"
    )
    p.add_argument(
        "--gpu-mem-gb", type=float, default=80.0, help="with --dry-run: memory of one GPU in GiB (default 80)"
    )
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint in the run directory) or a path")
    return p


# Optional accelerator libraries missing on a CPU machine: expected, and said once in the README.
QUIET_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*full scope is deprecated.*",
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
)


def quiet_known_warnings() -> None:
    import warnings

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def train_main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()
    args = _train_parser().parse_args(argv)
    if args.list_algorithms:
        if args.markdown:
            print(algorithms_markdown())
        else:
            print_algorithms()
        return 0
    overrides = list(args.overrides) + ([f"trainer.resume={args.resume}"] if args.resume else [])
    try:
        from hpt_megatron.config import load_config

        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"hpt-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    if args.dry_run:
        return dry_run(cfg, args.config, args.gpu_mem_gb, args.json)
    from hpt_megatron.run_setup import train

    return train(cfg)


def dry_run(cfg, recipe: str, gpu_mem_gb: float, as_json: bool) -> int:
    """Print the plan; exit 1 when it does not fit, so CI can run every recipe through it."""
    import json

    from hpt_megatron.plan import make_plan
    from hpt_megatron.plan.text import render_text

    plan = make_plan(cfg, gpu_mem_gb, recipe)
    print(json.dumps(plan.to_dict(), indent=1) if as_json else render_text(plan, cfg))
    return 0 if plan.fits else 1


def eval_main(argv: list[str] | None = None) -> int:
    from hpt_megatron.eval.cli import main

    return main(argv)


def convert_main(argv: list[str] | None = None) -> int:
    from hpt_megatron.convert.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(train_main())
