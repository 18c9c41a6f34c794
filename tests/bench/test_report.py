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


def test_plot_recall_draws_one_series_per_loss_with_bands_and_labels(tmp_path: Path, monkeypatch):
    """The figure itself, captured before it is saved: axes, series, styles, bands, labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    results = {
        "dataset": "glyphs",
        "recall_ks": [1, 2, 4, 8],
        "losses": [
            {
                "label": "ArcFace",
                "metrics": {
                    f"recall_at_{k}": v
                    for k, v in zip((1, 2, 4, 8), (0.5, 0.6, 0.7, 0.8), strict=True)
                },
                "metrics_std": {f"recall_at_{k}": 0.01 for k in (1, 2, 4, 8)},
            },
            {
                "label": "Raw pixels",
                "name": "pixels",
                "metrics": {
                    f"recall_at_{k}": v
                    for k, v in zip((1, 2, 4, 8), (0.4, 0.5, 0.6, 0.7), strict=True)
                },
            },
        ],
    }
    report.plot_recall(results, tmp_path / "r.png")
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_xlabel() == "K" and ax.get_ylabel() == "Recall@K (%)"
    assert ax.get_xscale() == "log" and "glyphs" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"ArcFace", "Raw pixels"}
    assert list(lines["ArcFace"].get_ydata()) == [50.0, 60.0, 70.0, 80.0]
    assert list(lines["Raw pixels"].get_xdata()) == [1, 2, 4, 8]
    assert lines["Raw pixels"].get_linestyle() == "--"
    assert lines["ArcFace"].get_linestyle() == "-"
    assert len(ax.collections) == 1  # one std band: only the entry with metrics_std
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["ArcFace", "Raw pixels"]
    plt.close(fig)


def test_markdown_table_says_what_it_shows() -> None:
    """results.md was the bare table: no dataset, protocol, units or seeds (review)."""
    one = {**RESULTS, "protocol": "train on 5 classes, retrieve among 9 images"}
    caption = report.markdown_table(one).splitlines()[-1]
    assert caption.startswith("toy: train on 5 classes, retrieve among 9 images.")
    assert "Metrics in % (one seed)" in caption and "seconds per run" in caption
    seeded = {**one, "losses": [{**RESULTS["losses"][0], "seeds": [0, 1, 2]}]}
    assert "mean ± std over 3 seeds" in report.markdown_table(seeded).splitlines()[-1]


def test_the_ablation_docs_are_what_their_json_gives() -> None:
    """docs/ablations/*.md are sweep_report.markdown of the JSON beside them (they showed
    "± 0.0" for one seed after the generator stopped printing it)."""
    from pml_margins.bench import sweep_report

    docs = Path(__file__).resolve().parents[2] / "docs" / "ablations"
    tables = sorted(docs.glob("*.json"))
    assert tables
    for path in tables:
        result = json.loads(path.read_text())
        assert sweep_report.markdown(result) == path.with_suffix(".md").read_text(), path.name


def test_markdown_table_names_the_model_each_entry_trained() -> None:
    """A CUB table from a machine without timm/torchvision read as a ResNet-50 result: the
    small CNN that stood in was named only on stderr (review)."""
    small = "small-cnn (no torchvision/timm)"
    entries = [{**e, "model": small} for e in RESULTS["losses"]]
    caption = report.markdown_table({**RESULTS, "losses": entries}).splitlines()[-1]
    assert caption.endswith(f"Model: {small}.")
    mixed = [entries[0], {**entries[1], "model": "resnet50 (torchvision)"}]
    caption = report.markdown_table({**RESULTS, "losses": mixed}).splitlines()[-1]
    assert caption.endswith(f"Models: {small} (A); resnet50 (torchvision) (B).")
    partly = [entries[0], RESULTS["losses"][1]]  # one entry without a record says so
    caption = report.markdown_table({**RESULTS, "losses": partly}).splitlines()[-1]
    assert caption.endswith(f"Models: {small} (A); not recorded (B).")
    assert "Model" not in report.markdown_table(RESULTS)  # (no entry records one)
    blank = [{**e, "model": ""} for e in RESULTS["losses"]]
    assert "Model" not in report.markdown_table({**RESULTS, "losses": blank})
