"""Rollout throughput, HF engine vs vLLM engine side by side, and the weight-sync time per step.

    python -m hpt_megatron.benchmarks.rollout                        # tiny and ~100M shapes, CPU
    python -m hpt_megatron.benchmarks.rollout --shapes small --prompts 64 --n 8 --new-tokens 128

Needs vLLM (scripts/install_vllm_cpu.sh on CPU). For each shape: a random-weight Qwen2 model saved as
a Hugging Face checkpoint; both engines generate ``prompts x n`` completions of random prompts at
temperature 1 (timed after a warm-up call); then the vLLM engine receives ``--syncs`` weight syncs of
the whole model (buckets of ``--bucket-mb``, packed into shared memory, layers re-processed) followed
by the probe, as in training. Prints generated tokens/s of each engine, their ratio, sync seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch

from hpt_megatron.benchmarks.shapes import SHAPES

TINY = (
    Path(__file__).resolve().parents[2] / "configs" / "models" / "tiny-qwen2.json"
)  # the default run's model
SHAPES_HERE = {
    "tiny": json.loads(TINY.read_text()),
    # ~100M parameters (24.6M of them the embedding), head size 64
    "100m": {
        **SHAPES["small"],
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
    },
}


class BenchTokenizer:
    """Ids only: the benchmark decodes nothing. EOS is id 0 (rarely sampled by a random model)."""

    eos_token_id = 0
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return ""


def _save_model(shape: dict, out: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**{k: v for k, v in shape.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(out)
    return model


def _generated(results) -> int:
    return sum(len(c.token_ids) for row in results for c in row)


def _timed_generate(engine, prompts, params) -> tuple[float, int]:
    engine.generate(prompts[:2], params)  # warm-up
    start = time.perf_counter()
    tokens = _generated(engine.generate(prompts, params))
    return time.perf_counter() - start, tokens


def bench_shape(name: str, shape: dict, args) -> dict:
    from hpt_megatron.rollout import SamplingParams
    from hpt_megatron.rollout.hf_engine import HFEngine
    from hpt_megatron.rollout.vllm_engine import VLLMEngine

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, shape["vocab_size"], (args.prompts, args.prompt_len), generator=g).tolist()
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model = _save_model(shape, Path(tmp))
        n_params = sum(p.numel() for p in model.parameters())
        hf_s, hf_tokens = _timed_generate(
            HFEngine(model, BenchTokenizer(), max_batch=args.hf_batch), prompts, params
        )
        engine = VLLMEngine(
            tmp,
            BenchTokenizer(),
            dtype="float32",
            seed=0,
            max_model_len=args.prompt_len + args.new_tokens,
            max_num_seqs=min(args.prompts * args.n, 256),
            gpu_memory_utilization=0.3,
        )
        vllm_s, vllm_tokens = _timed_generate(engine, prompts, params)
        tied = shape.get("tie_word_embeddings", False)
        sd = [(k, v) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")]
        manifest = types.SimpleNamespace(entries={k: (tuple(v.shape), "float32") for k, v in sd})
        buckets, cur, size = [], [], 0
        for k, v in sd:
            cur.append((k, v))
            size += v.numel() * 4
            if size >= args.bucket_mb * 2**20:
                buckets, cur, size = [*buckets, cur], [], 0
        buckets += [cur] if cur else []
        sync_s, probe_s = [], []
        probe = prompts[0][:32]
        for _ in range(args.syncs):
            start = time.perf_counter()
            engine.load_weights(buckets, manifest)
            sync_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            engine.score(probe)
            probe_s.append(time.perf_counter() - start)
            engine.mark_verified()
        engine.close()
    return {
        "shape": name,
        "params_m": n_params / 1e6,
        "hf_tokens_per_s": hf_tokens / hf_s,
        "vllm_tokens_per_s": vllm_tokens / vllm_s,
        "vllm_vs_hf": (vllm_tokens / vllm_s) / (hf_tokens / hf_s),
        "sync_s": statistics.median(sync_s),
        "probe_s": statistics.median(probe_s),
        "weights_mib": sum(v.numel() * 4 for _, v in sd) / 2**20,
        "generated_tokens": {"hf": hf_tokens, "vllm": vllm_tokens},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes", default="tiny,100m", help=f"comma-separated: {', '.join([*SHAPES_HERE, *SHAPES])}"
    )
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=4, help="completions per prompt")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--hf-batch", type=int, default=512, help="HF engine: sequences per forward")
    p.add_argument("--syncs", type=int, default=3)
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    known = {**SHAPES, **SHAPES_HERE}
    names = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in known]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; choose from {sorted(known)}")
    rows = [bench_shape(s, known[s], args) for s in names]
    print(
        f"\n{args.prompts} prompts x {args.n} samples x up to {args.new_tokens} new tokens, fp32, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "| shape | params | HF engine tokens/s | vLLM tokens/s | vLLM / HF | sync s (weights MiB) | probe s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['params_m']:.1f}M | {r['hf_tokens_per_s']:.0f} | {r['vllm_tokens_per_s']:.0f} | "
            f"{r['vllm_vs_hf']:.2f}x | {r['sync_s']:.3f} ({r['weights_mib']:.0f}) | {r['probe_s']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
