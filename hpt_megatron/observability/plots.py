"""PNG plots of a run's metrics (accuracy, SFT fraction, entropy, ...) over steps."""

from __future__ import annotations

from pathlib import Path

DEFAULT_PANELS = {
    "rollout/accuracy": "rollout accuracy (train prompts)",
    "eval/accuracy": "held-out accuracy",
    "hpt/sft_fraction": "fraction of prompts trained by SFT",
    "actor/entropy": "policy entropy (nats/token)",
}


def plot_metrics(
    records: list[dict], out_path: str | Path, panels: dict[str, str] | None = None
) -> Path | None:
    """One panel per metric present in ``records``; returns the PNG path (None if nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        k: v for k, v in (panels or DEFAULT_PANELS).items() if any(r.get(k) is not None for r in records)
    }
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels.items()):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, lw=1.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
