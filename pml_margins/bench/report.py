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


def _cell(value: float | None, percent: bool = True, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if not percent:
        return f"{value:.1f}"
    return f"{100 * value:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def _count(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.0f}"


def _seed_count(results: dict[str, Any]) -> int:
    """The most seeds any loss of ``results`` ran (0 when none says)."""
    return max((len(e.get("seeds", [])) for e in results["losses"]), default=0)


def markdown_table(results: dict[str, Any]) -> str:
    """One row per loss: Recall@K, P@1, R-Precision, MAP@R (percent), train time (s), img/s.

    Metrics are ``mean ± std`` (sample std over seeds) where an entry has ``metrics_std``;
    the train time (seconds per run) and the training throughput (images per second)
    are means over the runs. A caption under the table says the dataset, the protocol,
    the units and the model each row trained (its entry's ``model``).
    """
    ks = results["recall_ks"]
    header = [
        "Loss",
        *(f"R@{k}" for k in ks),
        "P@1",
        "R-Prec",
        "MAP@R",
        "Train (s)",
        "img/s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for entry in results["losses"]:
        m, sd = entry["metrics"], entry.get("metrics_std", {})
        keys = [*(f"recall_at_{k}" for k in ks), "precision_at_1", "r_precision"]
        keys.append("mean_average_precision_at_r")
        row = [
            entry["label"],
            *(_cell(m.get(key), std=sd.get(key)) for key in keys),
            _cell(entry.get("train_seconds"), percent=False),
            _count(entry.get("images_per_second")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    seeds = _seed_count(results)
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    model = _models_caption(results["losses"])
    lines += [
        "",
        f"{results.get('dataset', 'retrieval')}: {results.get('protocol', 'held-out classes')}. "
        f"Metrics in % ({spread}); train time in seconds per run, img/s in training.{model}",
    ]
    return "\n".join(lines) + "\n"


def _models_caption(entries: list[dict[str, Any]]) -> str:
    """What each entry records it trained (a small CNN stands in for a backbone neither
    timm nor torchvision has): `` Model: X.`` when one model serves every row, else
    each model with its rows; ``""`` when no entry records one."""
    rows: dict[Any, list[str]] = {}
    for entry in entries:
        rows.setdefault(entry.get("model") or None, []).append(str(entry["label"]))
    if list(rows) in ([], [None]):
        return ""
    if len(rows) == 1:
        return f" Model: {next(iter(rows))}."
    shown = (f"{model or 'not recorded'} ({', '.join(labels)})" for model, labels in rows.items())
    return f" Models: {'; '.join(shown)}."


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

    Bands show ± one std over seeds where an entry has ``metrics_std``; the raw-pixel
    baseline (entry ``name == "pixels"``) is drawn dashed grey.
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
        if not points:
            continue
        style = {"ls": "--", "color": "0.4"} if entry.get("name") == "pixels" else {}
        (line,) = ax.plot(*zip(*points, strict=True), marker="o", label=entry["label"], **style)
        std = entry.get("metrics_std")
        if std and all(f"recall_at_{k}" in std for k, _ in points):
            xs = [k for k, _ in points]
            spread = [100 * std[f"recall_at_{k}"] for k in xs]
            mean = [v for _, v in points]
            ax.fill_between(
                xs,
                [m - d for m, d in zip(mean, spread, strict=True)],
                [m + d for m, d in zip(mean, spread, strict=True)],
                color=line.get_color(),
                alpha=0.12,
                linewidth=0,
            )
    ax.set_xscale("log", base=2 if ks[-1] <= 64 else 10)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    title = f"Retrieval on held-out classes: {results['dataset']}"
    seeds = _seed_count(results)
    if seeds > 1:
        title += f" (mean ± std, {seeds} seeds)"
    ax.set_title(title, fontsize=10)
    ax.set_ylim(top=100.5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
