"""Sampled evaluation of a policy on benchmark files: problems -> prompts -> samples -> grades -> metrics.

Samples per problem: the count set for the problem's data source (paper defaults: avg@32 on aime,
aime25 and amc, one sample elsewhere). Copies of a problem pool (see ``metrics.py``), so each problem is
prompted once with n = its count: every problem gets exactly that many samples, whatever its number of
copies. With one prompt and one set of sampling settings, n samples of one row are distributed exactly
like n/c samples of each of c copies, so this is the released protocol (valid.parquet: 8 AIME copies x 4
samples) without the ceil(n/c) rounding when c does not divide n.

Seeds: sample j of the problem at position i of the generation order is seeded by (seed, i, j), so
results do not depend on the batch size or the engine's internal batching.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from hpt_megatron.config import EvalConfig
from hpt_megatron.data import PromptBuilder, load_examples
from hpt_megatron.eval.metrics import Problem, SourceMetrics, group_problems, source_metrics
from hpt_megatron.reward import ScoreResult, Verifier
from hpt_megatron.rollout import Completion, RolloutEngine, SamplingParams

PAPER = EvalConfig()  # the paper's settings, shared with the trainer's in-loop evaluation


@dataclass(frozen=True)
class EvalSettings:
    """How many samples each problem gets and how they are drawn."""

    samples: Mapping[str, int] = field(default_factory=lambda: dict(PAPER.samples))
    default_samples: int = PAPER.default_samples
    pass_k: tuple[int, ...] = tuple(PAPER.pass_k)
    temperature: float = PAPER.temperature
    top_p: float = PAPER.top_p
    max_new_tokens: int = PAPER.max_new_tokens
    seed: int = 0
    limit: int | None = None  # first N problems of each data source
    batch_size: int = 1024  # completions per engine call (progress granularity, HF memory)

    def __post_init__(self) -> None:
        counts = {**self.samples, "(default)": self.default_samples}
        bad = {name: n for name, n in counts.items() if n < 1}
        if bad:
            raise ValueError(f"samples per problem must be >= 1, got {bad}")
        if not self.pass_k or min(self.pass_k) < 1:
            raise ValueError(f"pass@k needs k >= 1, got {list(self.pass_k)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 problems per source, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.sampling(1, 0)  # validates temperature, top_p and max_new_tokens now, not after loading

    def samples_for(self, data_source: str) -> int:
        return self.samples.get(data_source, self.default_samples)

    def sampling(self, n: int, prompt_offset: int) -> SamplingParams:
        return SamplingParams(
            n=n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            prompt_offset=prompt_offset,
        )

    def check_pass_k(self, sources: Sequence[str]) -> None:
        """A k above every source's samples per problem asks for a metric nothing can estimate."""
        most, source = max((self.samples_for(s), s) for s in sources)
        too_large = [k for k in self.pass_k if k > most]
        if too_large:
            raise ValueError(
                f"pass@k for k={too_large} needs at least that many samples per problem, but the most any "
                f"source gets is {most} ({source}); raise --samples (e.g. --samples {source}={max(too_large)}) "
                "or lower --pass-k"
            )


def load_problems(files: Sequence[str | Path], limit: int | None = None) -> list[Problem]:
    """The problems of ``files`` (copies pooled), keeping the first ``limit`` of each data source."""
    examples, _ = load_examples(files)
    problems = group_problems(examples)
    if limit is None:
        return problems
    kept: dict[str, int] = {}
    out = []
    for problem in problems:
        kept[problem.data_source] = kept.get(problem.data_source, 0) + 1
        if kept[problem.data_source] <= limit:
            out.append(problem)
    return out


# The paper's column order (in-distribution math, then out-of-distribution); other sources follow.
PAPER_ORDER = ("aime", "aime25", "amc", "math", "minerva", "olympiad_bench", "arc_c", "gpqa")


def data_sources(problems: Sequence[Problem]) -> list[str]:
    """Data sources in the paper's column order, unknown ones after them in order of first appearance."""
    seen = list(dict.fromkeys(p.data_source for p in problems))
    rank = {source: i for i, source in enumerate(PAPER_ORDER)}
    return sorted(seen, key=lambda s: (rank.get(s, len(rank)), seen.index(s)))


@dataclass
class EvalResult:
    """Everything an evaluation produced; ``completions[p]`` and ``grades[p]`` belong to ``problems[p]``."""

    problems: list[Problem]
    prompts: list[str]
    completions: list[list[Completion]]
    grades: list[list[ScoreResult]]
    sources: list[SourceMetrics]
    seconds: dict[str, float]

    @property
    def average(self) -> float:
        """The paper's "Avg.": the unweighted mean of the per-source accuracies."""
        return sum(s.accuracy for s in self.sources) / len(self.sources)


def generate_all(
    engine: RolloutEngine,
    prompt_ids: Sequence[list[int]],
    counts: Sequence[int],
    settings: EvalSettings,
    progress: bool = True,
) -> list[list[Completion]]:
    """``counts[p]`` completions of each prompt, in calls of about ``settings.batch_size`` completions.

    One call has one n, so prompts are ordered by their count; each call's prompt offset is its first
    prompt's position in that order, which fixes every sample's seed independently of the chunking.
    """
    order = sorted(range(len(prompt_ids)), key=lambda p: counts[p])
    out: list[list[Completion]] = [[] for _ in prompt_ids]
    start = 0
    with tqdm(total=sum(counts), desc="generating", unit="sample", disable=not progress) as bar:
        while start < len(order):
            n = counts[order[start]]
            stop = start + 1
            while (
                stop < len(order)
                and counts[order[stop]] == n
                and (stop - start + 1) * n <= settings.batch_size
            ):
                stop += 1
            chunk = order[start:stop]
            results = engine.generate([prompt_ids[p] for p in chunk], settings.sampling(n, start))
            for p, completions in zip(chunk, results, strict=True):
                assert len(completions) == n, f"engine returned {len(completions)} completions, asked for {n}"
                out[p] = completions
            bar.update(n * len(chunk))
            start = stop
    return out


def grade_all(
    verifier: Verifier,
    problems: Sequence[Problem],
    completions: Sequence[Sequence[Completion]],
    progress: bool = True,
) -> list[list[ScoreResult]]:
    """Grade every completion against its problem's ground truth (multiple choice by data source)."""
    items = [
        (c.text, p.example.ground_truth, p.data_source)
        for p, cs in zip(problems, completions, strict=True)
        for c in cs
    ]
    flat = iter(verifier.score(items, progress=progress))
    return [[next(flat) for _ in cs] for cs in completions]


def summarize(
    problems: Sequence[Problem], grades: Sequence[Sequence[ScoreResult]], pass_k: Sequence[int]
) -> list[SourceMetrics]:
    """Per-source metrics, sources in the order of ``data_sources``."""
    out = []
    for source in data_sources(problems):
        picked = [i for i, p in enumerate(problems) if p.data_source == source]
        correct = [[g.reward > 0.5 for g in grades[i]] for i in picked]
        rows = sum(len(problems[i].examples) for i in picked)
        out.append(source_metrics(source, correct, rows=rows, ks=pass_k))
    return out


def evaluate(
    problems: Sequence[Problem],
    *,
    engine: RolloutEngine,
    builder: PromptBuilder,
    verifier: Verifier,
    settings: EvalSettings,
    progress: bool = True,
) -> EvalResult:
    """Render, sample, grade and aggregate ``problems``."""
    if not problems:
        raise ValueError("no problems to evaluate; check the eval files (and --limit)")
    settings.check_pass_k(data_sources(problems))
    prompts = [builder.render(p.example) for p in problems]
    counts = [settings.samples_for(p.data_source) for p in problems]
    start = time.perf_counter()
    completions = generate_all(engine, builder.encode_texts(prompts), counts, settings, progress)
    generated = time.perf_counter()
    grades = grade_all(verifier, problems, completions, progress)
    seconds = {"generation": generated - start, "grading": time.perf_counter() - generated}
    sources = summarize(problems, grades, settings.pass_k)
    return EvalResult(list(problems), prompts, completions, grades, sources, seconds)
