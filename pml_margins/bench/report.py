"""Benchmark output: a Markdown table, ``results.json`` and a Recall@K plot.

A result is a plain dict so that it round-trips through JSON::

    {"dataset": "digits", "recall_ks": [1, 2, 4, 8], "command": "...",
     "config": {...}, "environment": {...},
     "losses": [{"name": "arcface", "label": "ArcFace", "hyperparameters": {...},
                 "train_seconds": 12.3, "metrics": {"recall_at_1": 0.97, ...}}, ...]}
"""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Any

__all__ = [
    "environment",
    "markdown_table",
    "plot_recall",
    "write_json",
]


def environment() -> dict[str, str]:
    """Versions and machine, recorded with every result."""
    import pytorch_metric_learning
    import torch

    import pml_margins

    return {
        "pml_margins": pml_margins.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": str(torch.get_num_threads()),
    }


def _cell(value: float | None, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * value:.1f}" if percent else f"{value:.1f}"


def markdown_table(results: dict[str, Any]) -> str:
    """One row per loss: Recall@K, P@1, R-Precision, MAP@R (percent) and train time (s)."""
    ks = results["recall_ks"]
    header = [
        "Loss",
        *(f"R@{k}" for k in ks),
        "P@1",
        "R-Prec",
        "MAP@R",
        "Train (s)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for entry in results["losses"]:
        m = entry["metrics"]
        row = [
            entry["label"],
            *(_cell(m.get(f"recall_at_{k}")) for k in ks),
            _cell(m.get("precision_at_1")),
            _cell(m.get("r_precision")),
            _cell(m.get("mean_average_precision_at_r")),
            _cell(entry.get("train_seconds"), percent=False),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``results`` as indented JSON (NaN -> ``null``)."""
    with open(path, "w") as f:
        json.dump(_json_safe(results), f, indent=2, sort_keys=False)
        f.write("\n")


def plot_recall(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Recall@K against K (log scale), one line per loss, saved as a PNG.

    The raw-pixel baseline (entry ``name == "pixels"``) is drawn dashed grey.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = results["recall_ks"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for entry in results["losses"]:
        values = [entry["metrics"].get(f"recall_at_{k}") for k in ks]
        points = [
            (k, 100 * v)
            for k, v in zip(ks, values, strict=True)
            if v is not None and not math.isnan(v)
        ]
        if points:
            style = {"ls": "--", "color": "0.4"} if entry.get("name") == "pixels" else {}
            ax.plot(*zip(*points, strict=True), marker="o", label=entry["label"], **style)
    ax.set_xscale("log", base=2 if ks[-1] <= 64 else 10)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title(f"Retrieval on held-out classes: {results['dataset']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
