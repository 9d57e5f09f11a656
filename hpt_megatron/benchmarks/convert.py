"""Benchmark the offline converter on a random model with a real model's shapes.

    python -m hpt_megatron.benchmarks.convert --shape qwen2.5-1.5b [--tp 2 --pp 2] [--dtype bf16]

Writes a random HF checkpoint (safetensors, the given dtype) to a temporary directory, converts it
HF -> Megatron and back on CPU, each direction in a fresh process, and prints wall time and peak RSS
of each (and the RSS of a process that has only imported the libraries, for reference).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import torch

from hpt_megatron.benchmarks.shapes import SHAPES


def write_random_hf(config: dict, directory: Path, dtype: torch.dtype, max_shard_bytes: int) -> int:
    """A random HF checkpoint with ``config``'s shapes; returns its size in bytes."""
    import json

    from hpt_megatron.convert.hf_io import HFShardWriter, write_config
    from hpt_megatron.convert.mapping import hf_shapes
    from hpt_megatron.convert.safetensors_stream import TensorSpec
    from hpt_megatron.models import arch_config_from_hf

    directory.mkdir(parents=True)
    specs = [TensorSpec(n, s, dtype) for n, s in hf_shapes(arch_config_from_hf(config)).items()]
    writer = HFShardWriter(directory, specs, max_shard_bytes)
    gen = torch.Generator().manual_seed(0)
    for spec in specs:
        writer.write((torch.randn(spec.shape, generator=gen) * 0.02).to(dtype))
    writer.close()
    write_config({**config, "torch_dtype": str(dtype).removeprefix("torch.")}, directory, dtype)
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    return writer.total_bytes


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(direction: str, src: str, dst: str, tp: int, pp: int, queue) -> None:
    from hpt_megatron.convert import hf_to_megatron, megatron_to_hf

    start = time.perf_counter()
    if direction == "baseline":
        pass
    elif direction == "hf->megatron":
        hf_to_megatron(src, dst, tp, pp, progress=False)
    else:
        megatron_to_hf(src, dst, progress=False)
    queue.put((time.perf_counter() - start, _peak_rss_mib()))


def measure(direction: str, src: Path | None, dst: Path | None, tp: int, pp: int) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one direction, run in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_run, args=(direction, str(src), str(dst), tp, pp, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{direction} failed with exit code {proc.exitcode}")
    return queue.get()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        nbytes = write_random_hf(SHAPES[args.shape], root / "hf", dtype, 5 * 1024**3)
        print(
            f"shape {args.shape}: random HF checkpoint, {args.dtype}, {nbytes / 1024**3:.2f} GiB "
            f"(written in {time.perf_counter() - start:.1f}s)"
        )
        print(f"layout tp={args.tp} pp={args.pp}; torch threads {torch.get_num_threads()}")
        _, base = measure("baseline", None, None, 1, 1)
        print(f"{'baseline (imports only)':24s} peak RSS {base:8.0f} MiB")
        runs = [
            ("hf->megatron", root / "hf", root / "megatron"),
            ("megatron->hf", root / "megatron", root / "back"),
        ]
        for direction, src, dst in runs:
            wall, rss = measure(direction, src, dst, args.tp, args.pp)
            print(
                f"{direction:24s} wall {wall:7.1f} s   peak RSS {rss:8.0f} MiB   ({nbytes / 1024**2 / wall:.0f} MiB/s)"
            )


if __name__ == "__main__":
    main()
