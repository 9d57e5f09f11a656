"""Benchmark training-checkpoint save and load: torch_dist (megatron-core dist_checkpointing) vs the
sharded safetensors format, on a random actor (model + Adam moments + scheduler + RNG).

    python -m hpt_megatron.benchmarks.checkpoint [--shape gpt-100m] [--tp 1] [--repeats 2]

Each measurement runs in a fresh process group of ``tp`` ranks that builds the actor (its memory is
the baseline), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), then saves or loads
once. Printed per format and operation: wall time (best of ``--repeats``), the peak RSS of rank 0
during the operation and how far it rose above the RSS before it, and the checkpoint's size on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# ~124M parameters: GPT-2-small width and depth with a Llama block (GQA, SwiGLU), untied head.
GPT_100M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def _shapes() -> dict:
    from hpt_megatron.benchmarks.shapes import SHAPES

    return {"gpt-100m": GPT_100M, **SHAPES}


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _build_actor(config: dict, tp: int):
    import torch

    from hpt_megatron.config import OptimConfig
    from hpt_megatron.distributed import init_parallel
    from hpt_megatron.models import arch_config_from_hf
    from hpt_megatron.train.actor import ActorOptions, MegatronActor

    ctx = init_parallel(tp, 1)
    actor = MegatronActor(arch_config_from_hf(config), ctx, OptimConfig(), 100, ActorOptions(spec="local"))
    for opt in getattr(actor.optimizer, "chained_optimizers", None) or [actor.optimizer]:
        opt.init_state_fn(opt.optimizer, opt.config)  # Adam moments exist, as after a first step
        for state in opt.optimizer.state.values():
            state["step"] = torch.tensor(1.0)
    return actor


def measure_worker(config: dict, tp: int, fmt: str, op: str, directory: str) -> dict:
    """One save or load of one format; rank 0's numbers."""
    import torch.distributed as dist

    from hpt_megatron.train.checkpoint import load_training_checkpoint, save_training_checkpoint

    actor = _build_actor(config, tp)
    dist.barrier()
    before = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    start = time.perf_counter()
    if op == "save":
        save_training_checkpoint(actor, directory, {"step": 1}, fmt)
    else:
        load_training_checkpoint(actor, directory)
    dist.barrier()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": _rss_mib("VmHWM"), "before_mib": before}


@dataclasses.dataclass
class Result:
    fmt: str
    op: str
    seconds: float
    peak_mib: float
    rise_mib: float
    disk_mib: float


def run(config: dict, tp: int, repeats: int, workdir: str | None) -> Iterator[Result]:
    """Yield each (format, operation) result as soon as it is measured."""
    from hpt_megatron.distributed import launch

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for fmt in ("torch_dist", "safetensors"):
            for op in ("save", "load"):
                runs = []
                for i in range(repeats):
                    directory = Path(tmp) / f"{fmt}-{i if op == 'save' else 0}"
                    args = (config, tp, fmt, op, str(directory))
                    runs.append(launch(measure_worker, tp, args=args, timeout_s=1800)[0])
                size = sum(f.stat().st_size for f in (Path(tmp) / f"{fmt}-0").rglob("*") if f.is_file())
                yield Result(
                    fmt,
                    op,
                    min(r["seconds"] for r in runs),
                    max(r["peak_mib"] for r in runs),
                    max(r["peak_mib"] - r["before_mib"] for r in runs),
                    size / 2**20,
                )


def _count_params(config: dict) -> float:
    from hpt_megatron.convert.mapping import hf_shapes
    from hpt_megatron.models import arch_config_from_hf

    total = 0
    for shape in hf_shapes(arch_config_from_hf(config)).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(_shapes()), default="gpt-100m")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)
    config = _shapes()[args.shape]
    print(
        f"shape {args.shape} ({_count_params(config) / 1e6:.0f}M parameters, fp32 + Adam moments), "
        f"tp={args.tp}, torch threads {torch.get_num_threads()}, best of {args.repeats}",
        flush=True,
    )
    for r in run(config, args.tp, args.repeats, args.workdir):
        print(
            f"{r.fmt:12s} {r.op:5s} wall {r.seconds:6.2f} s   peak RSS {r.peak_mib:7.0f} MiB "
            f"(+{r.rise_mib:5.0f} MiB during the {r.op})   on disk {r.disk_mib:6.0f} MiB",
            flush=True,
        )


if __name__ == "__main__":
    main()
