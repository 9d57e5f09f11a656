"""``hpt-convert``: HF <-> sharded Megatron checkpoints on one machine, no process group needed.

hpt-convert hf-to-megatron --hf-dir Qwen2.5-1.5B --output-dir ckpt/tp2pp1 --tp 2 --pp 1 [--dtype bf16]
hpt-convert megatron-to-hf --megatron-dir ckpt/tp2pp1 --output-dir Qwen2.5-1.5B-tuned [--dtype bf16]
hpt-convert megatron-to-hf --megatron-dir megatron-lm/save --hf-config Qwen2.5-1.5B --output-dir out
    (torch_dist iter_XXXXXXX/ or legacy mp_rank_XX[_YYY]/model_optim_rng.pt, Megatron-LM's layout)
hpt-convert critic-to-hf --checkpoint runs/ppo/checkpoints --output-dir out/critic
    (a PPO run's critic -> <Arch>ForTokenClassification with num_labels = 1)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hpt_megatron.convert.hf_io import DTYPES
from hpt_megatron.convert.offline import DEFAULT_MAX_SHARD_BYTES, hf_to_megatron, megatron_to_hf

PROG = "hpt-convert"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    to_mg = sub.add_parser("hf-to-megatron", help="HF safetensors -> sharded Megatron checkpoint")
    to_mg.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    to_mg.add_argument("--output-dir", required=True)
    to_mg.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    to_mg.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    _common(to_mg)

    to_hf = sub.add_parser(
        "megatron-to-hf",
        help="Megatron checkpoint (any TP/PP): hpt sharded, torch_dist or legacy mp_rank_XX -> HF directory",
    )
    to_hf.add_argument(
        "--megatron-dir",
        required=True,
        help="a checkpoint directory, or a Megatron-LM save directory (its latest_checkpointed_iteration.txt "
        "picks the iteration)",
    )
    to_hf.add_argument(
        "--hf-config",
        default=None,
        help="HF config.json or model directory of the architecture (needed for Megatron-LM checkpoints, "
        "which keep none; tokenizer files are copied from a directory)",
    )
    to_hf.add_argument("--output-dir", required=True)
    to_hf.add_argument(
        "--max-shard-gb",
        type=float,
        default=DEFAULT_MAX_SHARD_BYTES / 1024**3,
        help="size of each HF shard file",
    )
    _common(to_hf)

    critic = sub.add_parser(
        "critic-to-hf", help="a PPO critic -> HF <Arch>ForTokenClassification (num_labels 1)"
    )
    critic.add_argument(
        "--checkpoint",
        required=True,
        help="a training checkpoint holding critic/ (iter_XXXXXXX or step_XXXXXXXX), its critic/ directory, "
        "or the run's checkpoints/ directory (the newest checkpoint)",
    )
    critic.add_argument("--output-dir", required=True)
    critic.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="output dtype (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter; returns the process exit code (2 on a user error, with its message)."""
    args = build_parser().parse_args(argv)
    dtype = DTYPES[args.dtype] if getattr(args, "dtype", None) else None
    try:
        if args.command == "hf-to-megatron":
            out = hf_to_megatron(
                args.hf_dir, args.output_dir, args.tp, args.pp, dtype, args.overwrite, not args.no_progress
            )
        elif args.command == "critic-to-hf":
            from hpt_megatron.train.critic import export_critic_hf

            out = export_critic_hf(critic_dir(args.checkpoint), args.output_dir, args.overwrite)
        else:
            out = _megatron_to_hf(args, dtype)
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"{PROG}: wrote {out}")
    return 0


def critic_dir(path: str | Path) -> Path:
    """The critic/ directory of a checkpoint, given it, the checkpoint, or the run's checkpoints/."""
    from hpt_megatron.convert.torch_dist import tracked_checkpoint
    from hpt_megatron.train.critic import CRITIC_DIR

    path = Path(path)
    if (path / "layout.json").is_file() and path.name == CRITIC_DIR:
        return path
    if (path / CRITIC_DIR).is_dir():
        return path / CRITIC_DIR
    latest = tracked_checkpoint(path)
    if latest is None and (path / "latest").is_file():
        latest = path / (path / "latest").read_text().strip()
    if latest is not None and (latest / CRITIC_DIR).is_dir():
        return latest / CRITIC_DIR
    raise ValueError(
        f"--checkpoint {path}: no {CRITIC_DIR}/ there; pass a PPO run's checkpoint (iter_XXXXXXX or "
        "step_XXXXXXXX, saved with the critic), its critic/ directory or the run's checkpoints/ directory"
    )


def _megatron_to_hf(args: argparse.Namespace, dtype):
    """Detect the input format: this project's sharded format, or torch_dist / legacy Megatron-LM."""
    from hpt_megatron.convert.megatron_lm import find_checkpoint, megatron_lm_to_hf

    max_bytes = int(args.max_shard_gb * 1024**3)
    found = find_checkpoint(args.megatron_dir)
    if found.kind == "sharded":
        return megatron_to_hf(
            found.directory, args.output_dir, dtype, args.overwrite, max_bytes, not args.no_progress
        )
    return megatron_lm_to_hf(
        found.directory,
        args.output_dir,
        args.hf_config,
        dtype,
        args.overwrite,
        max_bytes,
        not args.no_progress,
    )


if __name__ == "__main__":
    sys.exit(main())
