"""Figures written into run folders: matplotlib Figure objects rendered by the Agg canvas directly,
so no display is needed and the user's pyplot backend and figure list are never touched."""
from __future__ import annotations

from pathlib import Path

import torch


def new_figure(figsize: tuple[float, float]):
    """A Figure with an Agg canvas, outside pyplot (garbage-collected; nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_curve(path: Path, xs, ys, cis=None, label: str = "", xlabel: str = "inner steps",
               ylabel: str = "meta-test MSE", title: str = "") -> None:
    fig = new_figure((5, 3.5))
    ax = fig.subplots()
    ax.plot(xs, ys, marker="o", label=label)
    if cis is not None:
        lo = [y - c for y, c in zip(ys, cis)]
        hi = [y + c for y, c in zip(ys, cis)]
        ax.fill_between(xs, lo, hi, alpha=0.25)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if label:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@torch.no_grad()
def plot_regression(run: Path, config, x_range: tuple[float, float], result: dict, first) -> None:
    """MSE vs inner steps, and predictive bands (mean ± 1.645 std) of a few test tasks."""
    K = len(result["mse_by_step"]) - 1
    plot_curve(run / "mse_vs_steps.png", list(range(K + 1)), result["mse_by_step"], result["mse_ci95_by_step"],
               label=config.algo, title=f"{config.task} ({config.preset or 'finn'})")
    if first is None:
        return
    batch, adapted, before = first
    lo, hi = x_range
    T = len(batch)
    grid = torch.linspace(lo, hi, 200, device=batch.x_support.device).view(1, -1, 1).expand(T, -1, -1).contiguous()
    out_k, out_0 = adapted.predict(grid), before.predict(grid)
    n = min(4, T)
    fig = new_figure((4 * n, 3.2))
    axes = fig.subplots(1, n, squeeze=False)
    for i, ax in enumerate(axes[0]):
        g = grid[i, :, 0].cpu()
        ax.plot(g, out_0.mean[i, :, 0].cpu(), color="0.6", ls="--", label="before adaptation")
        mean = out_k.mean[i, :, 0].cpu()
        ax.plot(g, mean, color="C0", label=f"after {K} steps")
        if out_k.std is not None:
            std = out_k.std[i, :, 0].cpu()
            ax.fill_between(g, mean - 1.645 * std, mean + 1.645 * std, color="C0", alpha=0.2, label="90% interval")
        ax.scatter(batch.x_query[i, :, 0].cpu(), batch.y_query[i, :, 0].cpu(), s=10, color="C3", label="query")
        ax.scatter(batch.x_support[i, :, 0].cpu(), batch.y_support[i, :, 0].cpu(), s=25, marker="x",
                   color="k", label="support")
        ax.set_title(f"test task {i}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run / "predictions.png", dpi=110)
