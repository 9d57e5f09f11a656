"""The check after every weight sync: the engine's log-probs of a fixed probe sequence against the
actor's. An engine that kept other weights (a sync that silently did nothing) fails it."""

from __future__ import annotations

import torch


class StaleEngineError(RuntimeError):
    """A rollout engine failed the probe after a weight sync."""


def check_probe(
    rank: int, engine_logp: list[float], actor_logp: torch.Tensor, tol: float
) -> dict[str, float]:
    """The engine's log-probs of the probe sequence against the actor's: StaleEngineError when the
    mean absolute difference exceeds ``tol``, else that difference (mean and max)."""
    d = (torch.tensor(engine_logp, dtype=torch.float64) - actor_logp.double()).abs()
    if not bool(torch.isfinite(d).all()) or float(d.mean()) > tol:
        raise StaleEngineError(
            f"rank {rank}: after the weight sync its rollout engine's log-probs of the probe "
            f"sequence differ from the actor's by {float(d.mean()):.3g} on average (max "
            f"{float(d.max()):.3g}; rollout.probe_tolerance = {tol:g}): the engine does not serve "
            "the trained weights, so its rollouts would be off-policy. Check the weight sync "
            "(README: vLLM), or raise rollout.probe_tolerance if the dtypes differ on purpose."
        )
    return {
        "rollout/probe_logp_diff_mean_max": float(d.mean()),
        "rollout/probe_logp_diff_max": float(d.max()),
    }
