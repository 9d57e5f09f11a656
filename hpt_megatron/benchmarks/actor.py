"""Throughput of one actor training step (Megatron-Core + the UPGE loss), and the same step in plain
Hugging Face transformers + torch AdamW on the same model shape and batch.

    python -m hpt_megatron.benchmarks.actor --shape small --rows 8 --seq 512          # CPU
    python -m hpt_megatron.benchmarks.actor --shape qwen2.5-1.5b --rows 16 --seq 2048  # one GPU
    python -m hpt_megatron.benchmarks.actor --config configs/tiny_cpu.yaml            # a recipe's model

Prints tokens/s of a training step (forward + backward + optimizer) and of the no-grad log-prob pass,
peak memory, and on GPUs the model FLOPs utilisation (formula: hpt_megatron.observability.flops).
Random weights; the loss is the GRPO-style ratio loss with random advantages over all tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from hpt_megatron.benchmarks.shapes import SHAPES
from hpt_megatron.observability.flops import DecoderShape, mfu, peak_flops_for, sequence_train_flops
from hpt_megatron.observability.timing import peak_memory_gib


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_batch(rows: int, seq: int, vocab: int, prompt: int):
    from hpt_megatron.algo import Source
    from hpt_megatron.train.batching import build_train_batch

    g = torch.Generator().manual_seed(0)
    ids = [(torch.randint(0, vocab, (seq,), generator=g).tolist(), prompt) for _ in range(rows)]
    batch = build_train_batch(ids, [int(Source.RL)] * rows, [1.0] * rows)
    batch.advantages = {"rl": torch.randn(batch.loss_mask_BT.shape, generator=g, dtype=torch.float64)}
    return batch


def megatron_step(hf_config: dict, args) -> dict:
    from hpt_megatron.algo import count_rows, get_preset
    from hpt_megatron.config import OptimConfig
    from hpt_megatron.distributed import init_parallel
    from hpt_megatron.models import arch_config_from_hf
    from hpt_megatron.train.actor import ActorOptions, MegatronActor

    ctx = init_parallel(args.tp, args.pp)
    arch = arch_config_from_hf(hf_config)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    opts = ActorOptions(spec=args.spec, dtype=dtype, micro_batch_tokens=args.micro_batch_tokens)
    actor = MegatronActor(arch, ctx, OptimConfig(lr=1e-6), total_steps=100, options=opts)
    algo = get_preset("grpo").build()  # advantages come with the batch; pi_old = zeros below
    batch = make_batch(args.rows, args.seq, arch.vocab_size, args.prompt)
    counts = count_rows(algo, batch.source_B, batch.loss_mask_BT)
    batch.old_logp_BT = torch.zeros_like(batch.loss_mask_BT)
    step_s = _timed(lambda: actor.train_step(batch, algo, counts), args.steps)
    logprob_s = _timed(lambda: actor.compute_logprobs(batch), args.steps)
    return {"step_s": step_s, "logprob_s": logprob_s, "peak_gib": peak_memory_gib(ctx.device), "arch": arch}


def hf_step(hf_config: dict, args) -> dict:
    """The same batch through transformers' model, full-vocab log_softmax, torch AdamW."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device == "cuda")
    batch = make_batch(args.rows, args.seq, config.vocab_size, args.prompt)
    tokens, mask = batch.tokens_BL.to(device), batch.loss_mask_BT.to(device)
    adv = batch.advantages["rl"].to(device, torch.float32)

    def step():
        opt.zero_grad(set_to_none=True)
        for a in range(0, tokens.shape[0], args.hf_micro_rows):
            t, m, ad = (
                tokens[a : a + args.hf_micro_rows],
                mask[a : a + args.hf_micro_rows],
                adv[a : a + args.hf_micro_rows],
            )
            logits = model(t).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, t[:, 1:, None]).squeeze(-1)
            ratio = torch.exp(logp - logp.detach())
            (-(ratio * ad * m).sum() / mask.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return {"step_s": _timed(step, args.steps)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--config", help="a recipe: benchmark its model (model.hf_config or model.path)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row (not trained)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--spec", default="auto")
    p.add_argument("--micro-batch-tokens", type=int, default=8192)
    p.add_argument("--hf-micro-rows", type=int, default=1, help="rows per micro-batch of the HF baseline")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    args = p.parse_args(argv)
    hf_config = SHAPES[args.shape]
    if args.config:
        from hpt_megatron.config import load_config

        hf_config = json.loads(load_config(args.config).model.config_json().read_text())
    mg = megatron_step(hf_config, args)
    arch, tokens = mg["arch"], args.rows * args.seq
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"model {args.config or args.shape}: {arch.num_layers} layers, hidden {arch.hidden_size}, vocab {arch.vocab_size}"
    )
    print(f"batch {args.rows} rows x {args.seq} tokens; tp={args.tp} pp={args.pp}; device {device}")
    print(f"megatron train step   {mg['step_s']:8.3f} s   {tokens / mg['step_s']:10.1f} tokens/s")
    print(f"megatron log-prob pass {mg['logprob_s']:7.3f} s   {tokens / mg['logprob_s']:10.1f} tokens/s")
    print(f"peak memory           {mg['peak_gib']:8.2f} GiB")
    shape = DecoderShape.from_arch(arch)
    flops = sequence_train_flops(shape, args.seq) * args.rows
    print(f"model FLOPs per step  {flops / 1e12:8.2f} TFLOP  ({flops / mg['step_s'] / 1e12:.2f} TFLOP/s)")
    peak = peak_flops_for(device) if torch.cuda.is_available() else None
    if peak:
        print(
            f"MFU                   {mfu(shape, [args.seq] * args.rows, mg['step_s'], peak):8.3f}  (peak {peak / 1e12:.0f} TFLOP/s bf16)"
        )
    if not args.no_hf:
        hf = hf_step(hf_config, args)
        print(f"hf + torch AdamW step {hf['step_s']:8.3f} s   {tokens / hf['step_s']:10.1f} tokens/s")
        print(f"megatron / hf speed   {hf['step_s'] / mg['step_s']:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
