"""Peak memory and time of per-token log-prob + entropy (forward and backward): the chunked
vocab-parallel implementation vs a naive full ``log_softmax``.

    python -m hpt_megatron.benchmarks.logprob --tokens 8192 --vocab 152064 --dtype bf16

Each method runs in a fresh process. Memory is the peak resident set (CPU) or peak allocated CUDA
memory above the logits; it includes the logits' gradient, which both methods must produce, so the
working memory is that peak minus one logits-sized tensor. Time is the median of ``--repeats``
forward+backward passes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive(logits: torch.Tensor, targets: torch.Tensor):
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def chunked(logits: torch.Tensor, targets: torch.Tensor, chunk: int | None):
    from hpt_megatron.train.logprobs import vocab_parallel_logprobs

    return vocab_parallel_logprobs(logits, targets, chunk=chunk, with_entropy=True)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(method: str, tokens: int, vocab: int, dtype: str, chunk: int, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, dtype=DTYPES[dtype], device=device).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    fn = naive if method == "naive" else lambda x, t: chunked(x, t, chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_bytes(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        logp, entropy = fn(logits, targets)
        (logp.sum() + entropy.sum()).backward()
        logits.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del logp, entropy
    extra = _peak_bytes(device) - base
    return {
        "method": method,
        "device": str(device),
        "extra_bytes": extra,
        "seconds": statistics.median(times),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument(
        "--chunk", type=int, default=None, help="tokens per chunk (default: ~256 MiB of fp32 logits)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.method:
        print(json.dumps(run_one(args.method, args.tokens, args.vocab, args.dtype, args.chunk, args.repeats)))
        return 0
    gib = 1024**3
    grad_bytes = args.tokens * args.vocab * torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    print(
        f"log-prob + entropy over [{args.tokens} x {args.vocab}] {args.dtype} logits ({grad_bytes / gib:.2f} GiB), "
        f"forward+backward, median of {args.repeats}; working memory = peak - logits gradient"
    )
    results = {}
    for method in ("naive", "chunked"):
        cmd = [sys.executable, "-m", "hpt_megatron.benchmarks.logprob", "--method", method]
        cmd += [f"--tokens={args.tokens}", f"--vocab={args.vocab}", f"--dtype={args.dtype}"]
        cmd += [f"--repeats={args.repeats}"] + ([f"--chunk={args.chunk}"] if args.chunk else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{method:8s} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["working"] = max(r["extra_bytes"] - grad_bytes, 0)
        results[method] = r
        print(
            f"{method:8s} peak above logits {r['extra_bytes'] / gib:6.2f} GiB   working {r['working'] / gib:6.2f} GiB"
            f"   time {r['seconds']:7.3f} s  ({r['device']})"
        )
    if len(results) == 2:
        mem = results["chunked"]["working"] / max(results["naive"]["working"], 1)
        t = results["chunked"]["seconds"] / results["naive"]["seconds"]
        print(
            f"chunked / naive: working memory {mem:.3f}x, time {t:.3f}x  (target: memory <= 0.25x, time <= 1.10x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
