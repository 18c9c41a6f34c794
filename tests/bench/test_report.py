"""Markdown table, JSON and plot of a results dict."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pml_margins.bench import report

RESULTS = {
    "dataset": "toy",
    "recall_ks": [1, 10],
    "losses": [
        {
            "label": "A",
            "train_seconds": 1.234,
            "images_per_second": 1234.6,
            "metrics": {
                "recall_at_1": 0.5,
                "recall_at_10": math.nan,
                "precision_at_1": 0.5,
                "r_precision": 0.25,
                "mean_average_precision_at_r": 0.125,
            },
        },
        {"label": "B", "train_seconds": None, "metrics": {"recall_at_1": 1.0}},
    ],
}


def test_markdown_table() -> None:
    lines = report.markdown_table(RESULTS).splitlines()
    assert lines[0] == "| Loss | R@1 | R@10 | P@1 | R-Prec | MAP@R | Train (s) | img/s |"
    assert lines[2] == "| A | 50.0 | — | 50.0 | 25.0 | 12.5 | 1.2 | 1,235 |"
    assert lines[3] == "| B | 100.0 | — | — | — | — | — | — |"


def test_json_replaces_nan_by_null(tmp_path: Path) -> None:
    report.write_json(RESULTS, tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["losses"][0]["metrics"]["recall_at_10"] is None


def test_plot_recall_writes_png(tmp_path: Path) -> None:
    report.plot_recall(RESULTS, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")


def test_environment_has_versions() -> None:
    env = report.environment()
    assert {"pml_margins", "pytorch_metric_learning", "torch"} <= set(env)
