"""The Unified Policy Gradient Estimator and the HPT gate, in pure torch.

Nothing in this package imports megatron, ray or vllm: functions take tensors and return
``(loss, metrics)``. See ``spec.py`` for how an algorithm is composed and ``presets.py`` for the
named algorithms.
"""

from hpt_megatron.algo.advantages import ADVANTAGES, ROW_WEIGHTS, compute_advantages
from hpt_megatron.algo.denominators import DENOMINATORS
from hpt_megatron.algo.gate import GATES, Routing, RowPlan, plan_rows
from hpt_megatron.algo.loss import count_rows, mean_metrics, merge_metrics, upge_loss
from hpt_megatron.algo.masks import MASKS
from hpt_megatron.algo.mismatch import CORRECTIONS
from hpt_megatron.algo.presets import PRESETS, Preset, get_preset, list_presets
from hpt_megatron.algo.reductions import REDUCTIONS
from hpt_megatron.algo.spec import AlgoConfig, KLPenalty, Term
from hpt_megatron.algo.transforms import TRANSFORMS
from hpt_megatron.algo.types import Counts, LossInputs, ScoredRows, Source

__all__ = [
    "ADVANTAGES",
    "CORRECTIONS",
    "DENOMINATORS",
    "GATES",
    "MASKS",
    "PRESETS",
    "REDUCTIONS",
    "ROW_WEIGHTS",
    "TRANSFORMS",
    "AlgoConfig",
    "Counts",
    "KLPenalty",
    "LossInputs",
    "Preset",
    "Routing",
    "RowPlan",
    "ScoredRows",
    "Source",
    "Term",
    "compute_advantages",
    "count_rows",
    "get_preset",
    "list_presets",
    "mean_metrics",
    "merge_metrics",
    "plan_rows",
    "upge_loss",
]
