"""A stand-in for ``hpt-train`` that honours the trainer's launch contract, for the SLURM tests.

    fake_trainer.py CONFIG [key=value ...] [--resume auto]

- The run directory is ``trainer.output_dir``; each step appends one JSON object with a "step" key to
  ``DIR/metrics.jsonl``; checkpoints go to ``DIR/checkpoints/step_XXXXXXXX/`` (written atomically)
  and ``DIR/checkpoints/latest`` names the newest.
- SIGUSR1 or SIGTERM: finish the current step, write a checkpoint, exit 75 (preempted).
- ``--resume auto`` continues from ``DIR/checkpoints/latest`` (fresh start if none).
- With a Ray address (``cluster.ray_address`` or env RAY_ADDRESS) it checks that the GCS port
  answers, so a launcher that hands over a dead address fails the test.

Step metrics are pure functions of (seed, step) and of a running state carried in the checkpoint,
so a preempted-and-resumed run logs exactly the metrics of an uninterrupted one only if the resume
restored the right state. Every start appends its view of the launch to ``DIR/launches.jsonl``.
Knob: HPT_FAKE_STEP_SECONDS (default 0.2), the time one step takes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import yaml

PREEMPTED = 75
DEFAULTS = {"trainer.total_steps": 10, "trainer.seed": 1, "trainer.save_every": 50}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    p = argparse.ArgumentParser(prog="fake_trainer")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--resume", default="none")
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        p.error(f"config file '{args.config}' does not exist")
    keys = dict(_flatten(yaml.safe_load(Path(args.config).read_text()) or {}))
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"override '{item}' is not key=value")
        keys[key] = value
    if "trainer.output_dir" not in keys:
        p.error("trainer.output_dir is required")
    return args, keys


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", str(v)


def check_ray(address: str) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        sys.exit(f"fake_trainer: Ray GCS at {address} does not answer: {e}")


def step_metrics(seed: int, step: int, state: float) -> tuple[dict, float]:
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    noise = int.from_bytes(digest[:8], "big") / 2**64
    state = 0.9 * state + 0.1 * noise
    return {"step": step, "loss/total": round(1.0 / step + noise, 12), "loss/ema": round(state, 12)}, state


def write_checkpoint(ckpt_root: Path, step: int, state: float) -> None:
    name = f"step_{step:08d}"
    tmp = ckpt_root / f".{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "state.json").write_text(json.dumps({"step": step, "state": state}))
    os.replace(tmp, ckpt_root / name)
    (ckpt_root / ".latest.tmp").write_text(name + "\n")
    os.replace(ckpt_root / ".latest.tmp", ckpt_root / "latest")


def load_checkpoint(ckpt_root: Path) -> tuple[int, float]:
    latest = ckpt_root / "latest"
    if not latest.exists():
        return 0, 0.0
    saved = json.loads((ckpt_root / latest.read_text().strip() / "state.json").read_text())
    return saved["step"], saved["state"]


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget steps logged after the checkpoint we resume from (they will be run again)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in kept))


def record_launch(
    out: Path, args: argparse.Namespace, keys: dict, start: int, ray_address: str | None
) -> None:
    launch = {"argv": sys.argv[1:], "resume": args.resume, "start_step": start, "ray_address": ray_address}
    launch.update(overrides=keys, restart_count=os.environ.get("SLURM_RESTART_COUNT"))
    with open(out / "launches.jsonl", "a") as f:
        f.write(json.dumps(launch) + "\n")


def train(out: Path, cfg: dict, start: int, state: float, stop: list[int]) -> int:
    seed, total, save_every = (int(cfg[f"trainer.{k}"]) for k in ("seed", "total_steps", "save_every"))
    step_seconds = float(os.environ.get("HPT_FAKE_STEP_SECONDS", 0.2))
    with open(out / "metrics.jsonl", "a") as metrics:
        for step in range(start + 1, total + 1):
            time.sleep(step_seconds)
            record, state = step_metrics(seed, step, state)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if step == total or (save_every and step % save_every == 0) or stop:
                write_checkpoint(out / "checkpoints", step, state)
            if stop and step < total:
                print(f"fake_trainer: signal {stop[0]} -> checkpoint at step {step}, exit 75", flush=True)
                return PREEMPTED
    print(f"fake_trainer: finished {total} steps", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args, keys = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = {**DEFAULTS, **keys}
    out = Path(cfg["trainer.output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    ray_address = cfg.get("cluster.ray_address") or os.environ.get("RAY_ADDRESS")
    if ray_address:
        check_ray(ray_address)
    stop: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    start, state = load_checkpoint(out / "checkpoints") if args.resume == "auto" else (0, 0.0)
    drop_metrics_after(out / "metrics.jsonl", start)
    record_launch(out, args, keys, start, ray_address)
    return train(out, cfg, start, state, stop)


if __name__ == "__main__":
    sys.exit(main())
