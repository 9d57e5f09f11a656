"""Throughput and memory of one actor training step, side by side in one process:

- the Megatron actor with padded (bucketed) micro-batches,
- the Megatron actor with padding-free packed micro-batches (``thd``, no N x N mask),
- plain Hugging Face transformers + torch AdamW on the same rows and the same micro-batches as the
  padded actor (rows right-padded to their micro-batch's longest, causal attention, no mask).

    python -m hpt_megatron.benchmarks.actor                          # the tiny and ~100M shapes
    python -m hpt_megatron.benchmarks.actor --shapes small --rows 8 --min-len 256 --max-len 512
    python -m hpt_megatron.benchmarks.actor --config configs/tiny_cpu.yaml   # a recipe's model

Steps alternate between the three (one step each, round after round) so that load from other
processes hits them alike; each reports its fastest step (wall clock and this process's CPU time). Rows have random lengths in [min-len, max-len]
(as RL rows do), random weights, and the GRPO ratio loss with random advantages. Peak memory is the
step's working memory: on CUDA the allocator's peak above the memory held before the step, on CPU the
peak resident set size above it (sampled every millisecond). On CUDA an MFU line follows
(``hpt_megatron.observability.flops``: the model FLOPs of the real tokens over the bf16 peak).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hpt_megatron.benchmarks.shapes import SHAPES
from hpt_megatron.observability.flops import DecoderShape, mfu, peak_flops_for, sequence_train_flops

# per shape: rows per step, row lengths, micro-batch token budget (like verl's max token length per GPU)
PRESETS = {
    "tiny": {"rows": 256, "min_len": 40, "max_len": 112, "budget": 16384},  # a default-run step
    "100m": {"rows": 8, "min_len": 128, "max_len": 384, "budget": 2048},
    "small": {"rows": 8, "min_len": 256, "max_len": 512, "budget": 4096},
}
DEFAULT_PRESET = {"rows": 16, "min_len": 512, "max_len": 2048, "budget": 16384}


@dataclass
class Stats:
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time, all threads
    peak_bytes: list[int] = field(default_factory=list)

    # the fastest step: on a shared machine, the one least slowed by other processes
    @property
    def step_s(self) -> float:
        return min(self.seconds)

    @property
    def cpu_s(self) -> float:
        return min(self.cpu_seconds)

    @property
    def peak_gib(self) -> float:
        return max(self.peak_bytes) / 2**30


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    """Hand memory freed by earlier steps back to the OS (glibc keeps it), so that a step's peak
    above the entry level counts the memory this step needs, not what an earlier one left."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class _PeakRSS:
    """Peak resident set size above the level at entry, sampled by a thread (torch ops release the GIL)."""

    def __enter__(self):
        _release_free_heap()
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def measure(fn: Callable[[], object], stats: Stats) -> None:
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _timed(fn, stats)
        stats.peak_bytes.append(torch.cuda.max_memory_allocated() - base)
        return
    with _PeakRSS() as rss:
        _timed(fn, stats)
    stats.peak_bytes.append(rss.extra)


def _timed(fn: Callable[[], object], stats: Stats) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync()
    stats.seconds.append(time.perf_counter() - start)
    stats.cpu_seconds.append(time.process_time() - cpu)


def alternate(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, Stats]:
    """One warm-up step each, then ``rounds`` rounds of one step each."""
    for fn in steps.values():
        fn()
    stats = {name: Stats() for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            measure(fn, stats[name])
    return stats


def make_batch(rows: int, min_len: int, max_len: int, vocab: int):
    """Rows of random lengths; the first quarter of each (at least one token) is the prompt."""
    from hpt_megatron.algo import Source
    from hpt_megatron.train.batching import build_train_batch

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(min_len, max_len + 1, (rows,), generator=g).tolist()
    ids = [(torch.randint(0, vocab, (n,), generator=g).tolist(), max(1, n // 4)) for n in lengths]
    batch = build_train_batch(ids, [int(Source.RL)] * rows, [1.0] * rows)
    batch.advantages = {"rl": torch.randn(batch.loss_mask_BT.shape, generator=g, dtype=torch.float64)}
    batch.old_logp_BT = torch.zeros_like(batch.loss_mask_BT)
    return batch


def megatron_step(arch, ctx, batch, args, packed: bool) -> Callable[[], object]:
    from hpt_megatron.algo import count_rows, get_preset
    from hpt_megatron.config import OptimConfig
    from hpt_megatron.train.actor import ActorOptions, MegatronActor

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    opts = ActorOptions(spec=args.spec, dtype=dtype, micro_batch_tokens=args.budget, packed=packed)
    actor = MegatronActor(arch, ctx, OptimConfig(lr=1e-6), total_steps=100, options=opts)
    algo = get_preset("grpo").build()  # advantages come with the batch; pi_old = zeros
    counts = count_rows(algo, batch.source_B, batch.loss_mask_BT)
    return lambda: actor.train_step(batch, algo, counts)


def hf_step(hf_config: dict, batch, args) -> Callable[[], object]:
    """The same rows in the padded actor's micro-batches through transformers' model, a full-vocab
    log_softmax and torch AdamW; the loss is divided by the global token count as the actor's is."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hpt_megatron.train.batching import micro_batches

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device == "cuda")
    groups = micro_batches(batch.lengths_B.tolist(), args.budget, packed=False)
    parts = [batch.select(g) for g in groups]
    total = batch.loss_mask_BT.sum()

    def step():
        opt.zero_grad(set_to_none=True)
        for b in parts:
            t, m = b.tokens_BL.to(device), b.loss_mask_BT.to(device)
            adv = b.advantages["rl"].to(device, torch.float32)
            logits = model(t).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, t[:, 1:, None]).squeeze(-1)
            ratio = torch.exp(logp - logp.detach())
            (-(ratio * adv * m).sum() / total).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def run_shape(name: str, hf_config: dict, ctx, args) -> dict[str, Stats]:
    from hpt_megatron.models import arch_config_from_hf

    arch = arch_config_from_hf(hf_config)
    batch = make_batch(args.rows, args.min_len, args.max_len, arch.vocab_size)
    steps = {
        "megatron padded": megatron_step(arch, ctx, batch, args, packed=False),
        "megatron packed": megatron_step(arch, ctx, batch, args, packed=True),
    }
    if not args.no_hf:
        steps["hf + torch"] = hf_step(hf_config, batch, args)
    stats = alternate(steps, args.steps)
    report(name, arch, batch, stats, args)
    return stats


def report(name: str, arch, batch, stats: dict[str, Stats], args) -> None:
    lengths = batch.lengths_B.tolist()
    tokens = sum(lengths)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    params = _parameters(arch)
    print(
        f"\n== {name}: {arch.num_layers} layers, hidden {arch.hidden_size}, vocab {arch.vocab_size}, "
        f"{params / 1e6:.1f}M parameters; {len(lengths)} rows of {min(lengths)}-{max(lengths)} tokens "
        f"({tokens} tokens), micro-batch budget {args.budget} tokens; device {device}"
    )
    for label, s in stats.items():
        print(
            f"{label:16s} step {s.step_s:8.3f} s  {tokens / s.step_s:10.1f} tokens/s  cpu {s.cpu_s:8.3f} s  "
            f"peak +{s.peak_gib:6.2f} GiB   (steps: {', '.join(f'{x:.2f}' for x in s.seconds)})"
        )
    padded, packed = stats["megatron padded"], stats["megatron packed"]
    print(
        f"packed / padded   time {packed.step_s / padded.step_s:5.2f}x  cpu {packed.cpu_s / padded.cpu_s:5.2f}x  "
        f"peak memory {packed.peak_gib / padded.peak_gib:5.2f}x"
    )
    if "hf + torch" in stats:
        hf = stats["hf + torch"]
        print(
            f"actor / hf speed  packed {hf.step_s / packed.step_s:5.2f}x (cpu {hf.cpu_s / packed.cpu_s:5.2f}x)  "
            f"padded {hf.step_s / padded.step_s:5.2f}x (cpu {hf.cpu_s / padded.cpu_s:5.2f}x)"
        )
    shape = DecoderShape.from_arch(arch)
    flops = sum(sequence_train_flops(shape, n) for n in lengths)
    print(f"model FLOPs/step  {flops / 1e12:.3f} TFLOP  (packed: {flops / packed.step_s / 1e12:.3f} TFLOP/s)")
    peak = peak_flops_for(device) if torch.cuda.is_available() else None
    if peak:
        for label in ("megatron padded", "megatron packed"):
            print(
                f"MFU {label:12s} {mfu(shape, lengths, stats[label].step_s, peak):6.3f}  (peak {peak / 1e12:.0f} TFLOP/s bf16)"
            )


def _parameters(arch) -> int:
    h, d = arch.hidden_size, arch.head_dim
    attn = h * d * (2 * arch.num_heads + 2 * arch.num_kv_heads)
    layer = attn + 3 * h * arch.ffn_hidden_size + 2 * h
    head = 0 if arch.tie_embeddings else arch.vocab_size * h
    return arch.num_layers * layer + arch.vocab_size * h + head + h


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny,100m", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--config", help="a recipe: benchmark its model (model.hf_config or model.path)")
    p.add_argument("--rows", type=int, help="rows per step (default: per shape)")
    p.add_argument("--min-len", type=int, help="shortest row in tokens (default: per shape)")
    p.add_argument("--max-len", type=int, help="longest row in tokens (default: per shape)")
    p.add_argument("--budget", type=int, help="micro-batch token budget (default: per shape)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each, after one warm-up")
    p.add_argument("--spec", default="auto")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    args = p.parse_args(argv)
    unknown = [n for n in args.shapes.split(",") if n not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join(sorted(SHAPES))}")
    from hpt_megatron.distributed import init_parallel

    ctx = init_parallel(1, 1)
    todo = (
        [(n, SHAPES[n]) for n in args.shapes.split(",")]
        if not args.config
        else [(args.config, _recipe(args))]
    )
    for name, hf_config in todo:
        shape_args = argparse.Namespace(**vars(args))
        for key, value in PRESETS.get(name, DEFAULT_PRESET).items():
            if getattr(shape_args, key) is None:
                setattr(shape_args, key, value)
        run_shape(name, hf_config, ctx, shape_args)
    return 0


def _recipe(args) -> dict:
    from hpt_megatron.config import load_config

    return json.loads(load_config(args.config).model.config_json().read_text())


if __name__ == "__main__":
    sys.exit(main())
