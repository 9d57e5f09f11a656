"""``hpt-eval``: sample a Hugging Face model on benchmark files and report avg@k / pass@k per benchmark.

    hpt-eval --model runs/hpt/hf --files data/valid.parquet --output-dir runs/hpt/eval
    hpt-eval --model M --files valid.all.parquet --engine vllm --pass-k 1 2 4 8 16 32
    hpt-eval --model M --files valid.all.parquet --engine vllm --data-parallel 8   # 8 engines, 1 GPU each
    hpt-eval --model M --files valid.parquet --limit 2 --max-new-tokens 64     # a smoke test

Every argument is checked (files, model folder, --samples, --pass-k against the samples) before the
model is loaded, so a typo costs seconds, not a model load.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from hpt_megatron.data.datasets import SUFFIXES
from hpt_megatron.data.templates import QWEN_MATH_SYSTEM_PROMPT, SYSTEM_PROMPT_MODES, TEMPLATES
from hpt_megatron.eval.runner import PAPER, EvalSettings, data_sources, load_problems
from hpt_megatron.reward import GradeConfig

ENGINES = ("hf", "vllm")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16")
DEFAULT_BATCH = {"hf": 64, "vllm": 1024}
_PAPER_SAMPLES = " ".join(f"{s}={n}" for s, n in PAPER.samples.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hpt-eval",
        description=(
            "Evaluate a Hugging Face model on HPT/LUFFY benchmark files (parquet or jsonl). Paper defaults: "
            f"temperature {PAPER.temperature}, top_p {PAPER.top_p}, up to {PAPER.max_new_tokens} new tokens, "
            f"avg@32 on AIME24, AIME25 and AMC ({_PAPER_SAMPLES}), one sample elsewhere (MATH-500, Minerva, "
            "OlympiadBench; ARC-c and GPQA graded as multiple choice). Rows repeating a problem (valid.parquet "
            "holds AIME 8x, AMC 4x) are pooled: each problem gets exactly its source's number of samples."
        ),
    )
    add = p.add_argument
    add("--model", type=Path, required=True, help="Hugging Face model folder (config.json, weights)")
    add("--files", nargs="+", required=True, help="eval files (.parquet or .jsonl, HPT schema)")
    add("--output-dir", type=Path, default=None, help="where outputs go (default: MODEL/eval)")
    add("--tokenizer", type=Path, default=None, help="tokenizer folder (default: the model's)")
    add("--name", default=None, help="the model's name in results.md (default: --model as given)")
    add(
        "--samples",
        nargs="*",
        default=[],
        metavar="SOURCE=N",
        help=f"samples per problem of a data source, merged over the paper's {_PAPER_SAMPLES}",
    )
    add("--default-samples", type=int, default=PAPER.default_samples, help=_default("samples elsewhere"))
    add("--pass-k", type=int, nargs="+", default=list(PAPER.pass_k), help=_default("k of pass@k"))
    add("--temperature", type=float, default=PAPER.temperature, help=_default("0: greedy"))
    add("--top-p", type=float, default=PAPER.top_p, help=_default(""))
    add("--max-new-tokens", type=int, default=PAPER.max_new_tokens, help=_default(""))
    add("--seed", type=int, default=0, help=_default("sampling seed"))
    add("--limit", type=int, default=None, help="first N problems of each source (smoke tests)")
    add(
        "--template", choices=TEMPLATES, default="tokenizer", help=_default("prompt template, as in training")
    )
    add(
        "--system-prompt",
        choices=SYSTEM_PROMPT_MODES,
        default="drop",
        help=_default("the files' system message"),
    )
    add(
        "--default-system-prompt",
        default=QWEN_MATH_SYSTEM_PROMPT,
        help="replaces a dropped system message (tokenizer template; '' for none; default: Qwen's math prompt)",
    )
    add("--engine", choices=ENGINES, default="hf", help=_default("hf or vllm (CUDA, or vLLM's CPU build)"))
    add("--device", choices=DEVICES, default="auto", help=_default("auto: cuda when available"))
    add("--dtype", choices=DTYPES, default="auto", help=_default("auto: fp32 on CPU, bf16 on GPU"))
    add(
        "--batch-size",
        type=int,
        default=None,
        help="completions per generate call, split over the engines (default: hf 64, vllm 1024, x --data-parallel)",
    )
    add("--tp", type=int, default=1, help=_default("vllm: tensor-parallel GPUs"))
    add(
        "--data-parallel",
        type=int,
        default=1,
        metavar="N",
        help=_default("engines, each in its own process (--tp GPUs each, or a share of the CPU cores)"),
    )
    add("--gpu-memory-utilization", type=float, default=0.85, help=_default("vllm: share of GPU memory"))
    add("--workers", type=int, default=2, help=_default("grading processes"))
    add("--grade-timeout", type=float, default=5.0, help=_default("seconds per graded answer"))
    add(
        "--choice-by-letter",
        action="store_true",
        help="grade any single-letter ground truth as multiple choice",
    )
    return p


def _default(text: str) -> str:
    return f"{text} (default %(default)s)" if text else "default %(default)s"


def parse_samples(pairs: list[str]) -> dict[str, int]:
    """``["aime=32", "amc=16"]`` -> ``{"aime": 32, "amc": 16}``."""
    out = {}
    for pair in pairs:
        source, sep, count = pair.partition("=")
        if not sep or not source or not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"--samples {pair!r}: expected SOURCE=N with N >= 1 samples per problem, "
                "e.g. --samples aime=32 amc=32"
            )
        out[source] = int(count)
    return out


def check_paths(args: argparse.Namespace) -> None:
    if not args.model.is_dir():
        raise ValueError(f"--model {args.model}: no such folder; pass a Hugging Face model folder")
    if not (args.model / "config.json").is_file():
        raise ValueError(
            f"--model {args.model} has no config.json; pass a Hugging Face model folder (hpt-train writes "
            "one to RUN_DIR/hf, hpt-convert makes one from a Megatron checkpoint)"
        )
    for name in args.files:
        if not Path(name).is_file():
            raise ValueError(f"--files {name}: no such file; check the path")
        if not name.endswith(SUFFIXES):
            raise ValueError(f"--files {name}: eval files must end in {' or '.join(SUFFIXES)}")
    if args.tokenizer is not None and not args.tokenizer.is_dir():
        raise ValueError(f"--tokenizer {args.tokenizer}: no such folder")


def build_settings(args: argparse.Namespace) -> EvalSettings:
    return EvalSettings(
        samples={**PAPER.samples, **parse_samples(args.samples)},
        default_samples=args.default_samples,
        pass_k=tuple(sorted(set(args.pass_k))),
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size or DEFAULT_BATCH[args.engine] * max(args.data_parallel, 1),
    )


def warn_unused_samples(args: argparse.Namespace, sources: list[str]) -> None:
    unused = [s for s in parse_samples(args.samples) if s not in sources]
    if unused:
        print(
            f"hpt-eval: warning: --samples for {', '.join(unused)} has no effect: the files hold "
            f"{', '.join(sources)}",
            file=sys.stderr,
        )


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU; use --device cpu")
    return device


def torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def load_tokenizer(args: argparse.Namespace):
    """The tokenizer the model was trained with (see ``data.tokenizer.load_hf_tokenizer``)."""
    from hpt_megatron.data.tokenizer import load_hf_tokenizer

    source = args.tokenizer or args.model
    tokenizer = load_hf_tokenizer(source)
    if args.template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"--template tokenizer, but the tokenizer of {source} has no chat template; use --template "
            "llama_base (base models) or --template raw"
        )
    return tokenizer


@dataclass(frozen=True)
class EngineSpec:
    """How to build the rollout engine: picklable, so ``--data-parallel`` builds each engine in its
    own process by calling the spec with the engine's rank."""

    engine: str
    model: str
    tokenizer: str
    device: str
    dtype: str
    batch_size: int
    tp: int = 1
    gpu_memory_utilization: float = 0.85
    seed: int = 0

    def __call__(self, rank: int = 0):
        """The engine of data-parallel rank ``rank``; vLLM is imported only when asked for."""
        from hpt_megatron.data.tokenizer import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(self.tokenizer)
        dtype = torch_dtype(self.dtype, self.device)
        if self.engine == "vllm":
            from hpt_megatron.rollout import vllm_engine

            if not vllm_engine.HAVE_VLLM:
                raise ValueError(
                    f"--engine vllm needs vLLM ({vllm_engine.CPU_INSTALL_HINT}); or use --engine hf"
                )
            # the engine-level seed matters only where requests cannot carry their own (CPU)
            return vllm_engine.VLLMEngine(
                self.model,
                tokenizer,
                tp=self.tp,
                gpu_memory_utilization=self.gpu_memory_utilization,
                dtype=str(dtype).removeprefix("torch."),
                seed=self.seed + 7919 * rank,
            )
        from transformers import AutoModelForCausalLM

        from hpt_megatron.rollout.hf_engine import HFEngine

        model = AutoModelForCausalLM.from_pretrained(self.model, dtype=dtype)
        return HFEngine(model, tokenizer, self.device, max_batch=self.batch_size)


def engine_spec(args: argparse.Namespace, device: str, batch_size: int) -> EngineSpec:
    return EngineSpec(
        engine=args.engine,
        model=str(args.model),
        tokenizer=str(args.tokenizer or args.model),
        device=device,
        dtype=args.dtype,
        batch_size=batch_size,
        tp=args.tp,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed,
    )


def check_data_parallel(args: argparse.Namespace, device: str) -> None:
    """Enough devices for --data-parallel x --tp, before any engine starts."""
    import os

    import torch

    n = args.data_parallel
    if n < 1:
        raise ValueError(f"--data-parallel {n}: need >= 1 engines")
    if device == "cuda":
        have, need = torch.cuda.device_count(), n * (args.tp if args.engine == "vllm" else 1)
        if need > have:
            raise ValueError(
                f"--data-parallel {n} x --tp {args.tp} needs {need} GPUs, torch sees {have}; lower --data-parallel"
            )
    elif n > (os.cpu_count() or 1):
        raise ValueError(
            f"--data-parallel {n} on CPU: more engines than the {os.cpu_count()} cores; lower --data-parallel"
        )


def build_engine(args: argparse.Namespace, device: str, batch_size: int):
    """One engine in this process, or --data-parallel engines in their own processes."""
    spec = engine_spec(args, device, batch_size)
    if args.data_parallel == 1:
        return spec()
    from hpt_megatron.cluster.engine_pool import EnginePool

    gpus = (args.tp if args.engine == "vllm" else 1) if device == "cuda" else 0
    return EnginePool(spec, args.data_parallel, gpus_per_engine=gpus)


def run(args: argparse.Namespace) -> Path:
    """Check everything, load the model, evaluate, write the outputs; returns the output folder."""
    from hpt_megatron.data import PromptBuilder
    from hpt_megatron.eval.report import write_outputs
    from hpt_megatron.eval.runner import evaluate
    from hpt_megatron.reward import Verifier

    check_paths(args)
    settings = build_settings(args)
    problems = load_problems(args.files, settings.limit)
    sources = data_sources(problems)
    warn_unused_samples(args, sources)
    settings.check_pass_k(sources)
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args)
    builder = PromptBuilder(
        tokenizer,
        template=args.template,
        system_prompt=args.system_prompt,
        default_system_prompt=args.default_system_prompt or None,
    )
    check_data_parallel(args, device)
    engine = build_engine(args, device, settings.batch_size)
    grading = GradeConfig(choice_by_letter=args.choice_by_letter)
    try:
        with Verifier(num_workers=args.workers, timeout_s=args.grade_timeout, config=grading) as verifier:
            result = evaluate(problems, engine=engine, builder=builder, verifier=verifier, settings=settings)
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    out_dir = args.output_dir or args.model / "eval"
    extra = {
        "model_path": str(args.model),
        "files": [str(f) for f in args.files],
        "engine": args.engine,
        "data_parallel": args.data_parallel,
        "device": device,
        "dtype": args.dtype,
        "template": args.template,
        "system_prompt": args.system_prompt,
        "default_system_prompt": args.default_system_prompt,
        "choice_by_letter": args.choice_by_letter,
    }
    paths = write_outputs(
        result, out_dir, model=args.name or str(args.model), settings=settings, extra_settings=extra
    )
    print(paths["results.md"].read_text(encoding="utf-8"))
    print(f"wrote {', '.join(sorted(paths))} to {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # a user mistake (flag, file, data row): the message, not a traceback
        print(f"hpt-eval: error: {e}", file=sys.stderr)
        return 2
    return 0
