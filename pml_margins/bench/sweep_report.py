"""Output of ``pml-margins ablate``: one summary per sweep point, a Markdown table, a plot."""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["PLOTTED", "figure", "markdown", "row_text", "save_plot", "summarize_point"]

#: the metrics plotted and tabulated, with their labels
PLOTTED: tuple[tuple[str, str], ...] = (
    ("recall_at_1", "Recall@1"),
    ("mean_average_precision_at_r", "MAP@R"),
)


def summarize_point(point: Any, hyperparameters: dict[str, Any], runs: list[dict]) -> dict:
    """Mean and sample std (0 for one seed) of each metric over the runs of one point."""
    keys = runs[0]["metrics"].keys()
    mean = {k: sum(r["metrics"][k] for r in runs) / len(runs) for k in keys}
    std = {
        k: math.sqrt(sum((r["metrics"][k] - mean[k]) ** 2 for r in runs) / (len(runs) - 1))
        if len(runs) > 1
        else 0.0
        for k in keys
    }
    return {
        "series": point.series,
        "x": point.x,
        "loss": point.loss,
        "warmup": point.warmup,
        "hyperparameters": hyperparameters,
        "metrics": mean,
        "metrics_std": std,
        "train_seconds": sum(r["train_seconds"] for r in runs) / len(runs),
        "final_train_loss": [r["final_train_loss"] for r in runs],
        "runs": runs,
    }


def _percent(row: dict[str, Any], key: str) -> str:
    """A metric in percent, ``± std`` when the point has more than one seed."""
    text = f"{100 * row['metrics'][key]:.1f}"
    return text + (f" ± {100 * row['metrics_std'][key]:.1f}" if len(row["runs"]) > 1 else "")


def row_text(row: dict[str, Any]) -> str:
    """``R@1 71.2 ± 0.4, MAP@R 40.1 ± 0.3`` for progress lines (no ``±`` for one seed)."""
    return ", ".join(f"{label} {_percent(row, key)}" for key, label in PLOTTED)


def markdown(result: dict[str, Any]) -> str:
    """The sweep as a table: one row per point, metrics in percent (mean ± std over seeds)."""
    header = ["Series", result["parameter"], *(label for _, label in PLOTTED), "Train (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in result["points"]:
        cells = [_percent(row, key) for key, _ in PLOTTED]
        lines.append(
            f"| {row['series']} | {row['x']} | " + " | ".join(cells)
            + f" | {row['train_seconds']:.1f} |"
        )  # fmt: skip
    seeds = len(result["seeds"])
    lines.append("")
    lines.append(
        f"Glyph benchmark ({result['train_classes']} training classes), "
        f"{seeds} seed{'s' if seeds > 1 else ''} per point, "
        f"{_epochs(result['settings']['epochs'])}; metrics in %"
        + (", mean ± std over seeds." if seeds > 1 else ".")
    )
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any]) -> Any:
    """The sweep's figure: one panel per metric, one line (or bar group) per series.

    Numeric sweeps plot metric against the parameter with ± std error bars; the
    ``scale`` sweep uses a log axis and marks CosFace's lower bound on ``s``.
    Categorical sweeps draw bars with error bars.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(9, 3.6), dpi=110)
    series = list(dict.fromkeys(row["series"] for row in result["points"]))
    for ax, (key, label) in zip(axes, PLOTTED, strict=True):
        for name in series:
            rows = [row for row in result["points"] if row["series"] == name]
            xs = [row["x"] for row in rows]
            ys = [100 * row["metrics"][key] for row in rows]
            err = [100 * row["metrics_std"][key] for row in rows]
            if result["categorical"]:
                ax.bar(xs, ys, yerr=err, capsize=4, color=["0.6", "tab:blue"][: len(xs)])
            else:
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        if result["sweep"] == "scale":
            ax.set_xscale("log", base=2)
            bound = result["cosface_scale_lower_bound"]
            ax.axvline(bound, color="0.3", ls=":", label=f"CosFace lower bound s={bound:.1f}")
        ax.set_xlabel(result["parameter"])
        ax.set_ylabel(f"{label} (%)")
        ax.grid(True, alpha=0.3)
        if not result["categorical"]:
            ax.legend(fontsize=8)
    seeds = len(result["seeds"])
    fig.suptitle(
        f"{result['sweep']}: glyphs, {result['train_classes']} training classes"
        + (f" (mean ± std, {seeds} seeds)" if seeds > 1 else " (1 seed)"),
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def save_plot(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Save :func:`figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(result)
    fig.savefig(path)
    plt.close(fig)


def _epochs(count: int) -> str:
    return f"{count} epoch" + ("" if count == 1 else "s")
