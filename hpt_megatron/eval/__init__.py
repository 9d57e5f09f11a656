"""Evaluation: sample a policy on benchmark files and report avg@k and pass@k per benchmark (``hpt-eval``).

Layout: ``metrics`` (the unbiased pass@k estimator, avg@k, pooling of rows that repeat a problem),
``runner`` (problems -> prompts -> samples through any rollout engine -> grades -> per-source metrics),
``report`` (results.json, the paper-style results.md table, samples.jsonl, the pass@k plot) and ``cli``.
The trainer's in-loop evaluation is a single-sample accuracy; this package is the full protocol.
"""

from hpt_megatron.eval.metrics import Problem, SourceMetrics, group_problems, pass_at_k, source_metrics
from hpt_megatron.eval.runner import EvalResult, EvalSettings, evaluate, load_problems

__all__ = [
    "EvalResult",
    "EvalSettings",
    "Problem",
    "SourceMetrics",
    "evaluate",
    "group_problems",
    "load_problems",
    "pass_at_k",
    "source_metrics",
]
