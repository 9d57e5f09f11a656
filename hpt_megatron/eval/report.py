"""The files an evaluation leaves behind.

results.json    per-source metrics, the average over sources, the settings used
results.md      the paper's table: one column per benchmark plus Avg. (accuracy in %), then pass@k
samples.jsonl   one line per sample: prompt, response, ground truth, extracted answer, correct
pass_at_k.png   pass@k against k (log2 axis) per source, when some source has more than one sample
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpt_megatron.eval.metrics import SourceMetrics
from hpt_megatron.eval.runner import EvalResult, EvalSettings


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def metric_name(source: SourceMetrics) -> str:
    n = source.samples_per_problem
    return f"avg@{n}" if n > 1 else "pass@1"


def response_stats(result: EvalResult, data_source: str) -> dict[str, float]:
    """Mean response length and the fraction cut at max_new_tokens: a truncated response scores 0."""
    completions = [
        c for p, cs in zip(result.problems, result.completions) if p.data_source == data_source for c in cs
    ]
    grades = [g for p, gs in zip(result.problems, result.grades) if p.data_source == data_source for g in gs]
    return {
        "mean_response_tokens": sum(len(c.token_ids) for c in completions) / len(completions),
        "truncated": sum(c.finish_reason == "length" for c in completions) / len(completions),
        "grading_timeouts": sum(g.timed_out for g in grades),
    }


def results_dict(result: EvalResult, *, model: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The content of results.json; ``settings`` is recorded as given."""
    sources = {}
    for s in result.sources:
        sources[s.data_source] = {
            "problems": s.problems,
            "rows": s.rows,
            "samples_per_problem": s.samples_per_problem,
            "metric": metric_name(s),
            "accuracy": s.accuracy,
            "pass_at_k": {str(k): v for k, v in s.pass_at_k.items()},
            "pass_at_k_curve": {str(k): v for k, v in s.curve.items()},
            **response_stats(result, s.data_source),
        }
    return {
        "model": model,
        "average": result.average,
        "sources": sources,
        "settings": dict(settings),
        "seconds": result.seconds,
    }


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def results_markdown(result: EvalResult, *, model: str, pass_k: Sequence[int]) -> str:
    """The accuracy table (one column per benchmark + Avg.) and a pass@k table (sources x k)."""
    header = ["model", *(f"{s.data_source} ({metric_name(s)})" for s in result.sources), "Avg."]
    values = [model, *(percent(s.accuracy) for s in result.sources), percent(result.average)]
    lines = [_row(header), "|---" + "|---:" * (len(header) - 1) + "|", _row(values), ""]
    lines.append(
        "Accuracy in %. avg@n: the fraction of correct samples among n per problem, averaged over "
        "problems; Avg.: the mean over the benchmarks."
    )
    ks = sorted(set(pass_k))
    lines += ["", _row(["pass@k (%)", *(f"k={k}" for k in ks)]), "|---" + "|---:" * len(ks) + "|"]
    for s in result.sources:
        lines.append(
            _row([s.data_source, *(percent(s.pass_at_k[k]) if k in s.pass_at_k else "-" for k in ks)])
        )
    lines += ["", "-: k is larger than that source's samples per problem."]
    return "\n".join(lines) + "\n"


def write_samples(result: EvalResult, path: Path) -> None:
    with path.open("w", encoding="utf-8") as out:
        for p, (problem, prompt) in enumerate(zip(result.problems, result.prompts)):
            for j, (c, g) in enumerate(zip(result.completions[p], result.grades[p], strict=True)):
                record = {
                    "data_source": problem.data_source,
                    "problem": p,
                    "sample": j,
                    "rows": [e.location for e in problem.examples],
                    "prompt": prompt,
                    "response": c.text,
                    "ground_truth": problem.example.ground_truth,
                    "extracted": g.extracted,
                    "correct": g.reward > 0.5,
                    "finish_reason": c.finish_reason,
                    "response_tokens": len(c.token_ids),
                    "grading_error": g.error,
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")


def plot_pass_at_k(sources: Sequence[SourceMetrics], path: Path) -> Path | None:
    """pass@k against k per source with more than one sample; None when no source has one."""
    curves = [s for s in sources if s.samples_per_problem > 1]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s in curves:
        ks = sorted(s.curve)
        ax.plot(ks, [100 * s.curve[k] for k in ks], marker="o", label=s.data_source)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:.0f}"))  # 1, 2, 4, not 2^0, 2^1
    ax.set_ylim(0, 100)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(
    result: EvalResult,
    out_dir: str | Path,
    *,
    model: str,
    settings: EvalSettings,
    extra_settings: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write every output file to ``out_dir``; returns their paths by name.

    ``extra_settings`` (model path, files, engine, template, ...) join the sampling settings in
    results.json, so a result says how it was obtained.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("results.json", "results.md", "samples.jsonl")}
    recorded = {**dataclasses.asdict(settings), **(extra_settings or {})}
    results = results_dict(result, model=model, settings=recorded)
    paths["results.json"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    markdown = results_markdown(result, model=model, pass_k=settings.pass_k)
    paths["results.md"].write_text(markdown, encoding="utf-8")
    write_samples(result, paths["samples.jsonl"])
    plot = plot_pass_at_k(result.sources, out_dir / "pass_at_k.png")
    if plot is not None:
        paths["pass_at_k.png"] = plot
    else:  # a plot left by an earlier run in this folder would contradict results.json
        (out_dir / "pass_at_k.png").unlink(missing_ok=True)
    return paths
