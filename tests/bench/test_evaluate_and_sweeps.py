"""The bench's retrieval evaluation searches only the neighbours it needs; sweep output."""

from __future__ import annotations

import pytest
import torch

from pml_margins.bench import evaluate, sweep_report
from pml_margins.bench.sweeps import SWEEPS, SweepPoint


def test_evaluation_asks_only_for_the_neighbours_the_metrics_need(monkeypatch) -> None:
    from pml_margins.evaluation import calculator

    asked: list[int] = []
    original = calculator.exact_knn

    def spy(query, reference, k, **kwargs):
        asked.append(k)
        return original(query, reference, k, **kwargs)

    monkeypatch.setattr(calculator, "exact_knn", spy)
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 60  # 5 per class
    emb = torch.randn(300, 8, generator=gen)
    metrics = evaluate.evaluate_retrieval(emb, labels, (1, 2, 8))
    assert asked == [8]  # max(R = 4, largest K = 8), not all 299 others
    # against a float64 brute force
    x = torch.nn.functional.normalize(emb.double(), dim=1)
    sims = x @ x.T
    sims.fill_diagonal_(-torch.inf)
    order = sims.argsort(dim=1, descending=True)
    match = labels[order] == labels[:, None]
    assert metrics["recall_at_1"] == pytest.approx(match[:, 0].double().mean().item())
    assert metrics["recall_at_8"] == pytest.approx(match[:, :8].any(1).double().mean().item())
    assert metrics["r_precision"] == pytest.approx(match[:, :4].double().mean().item())


def _fake_result(sweep: str, repeats: int) -> dict:
    spec = SWEEPS[sweep]
    rows = []
    for i, point in enumerate(spec.points):
        runs = [
            {
                "metrics": {"recall_at_1": 0.5 + 0.01 * i + 0.02 * r,
                            "mean_average_precision_at_r": 0.2 + 0.01 * i},
                "train_seconds": 1.0,
                "final_train_loss": 1.0,
            }
            for r in range(repeats)
        ]  # fmt: skip
        rows.append(sweep_report.summarize_point(point, {}, runs))
    return {
        "sweep": sweep,
        "parameter": spec.parameter,
        "categorical": spec.categorical,
        "train_classes": 10,
        "seeds": list(range(repeats)),
        "settings": {"epochs": 1},
        "cosface_scale_lower_bound": 11.7,
        "points": rows,
    }


def test_sweep_summary_std_and_table() -> None:
    result = _fake_result("cosface-margin", 2)
    row = result["points"][0]
    assert row["metrics"]["recall_at_1"] == pytest.approx(0.51)
    assert row["metrics_std"]["recall_at_1"] == pytest.approx(0.02 / 2**0.5)
    table = sweep_report.markdown(result).splitlines()
    assert table[0] == "| Series | CosFace margin m (cosine) | Recall@1 | MAP@R | Train (s) |"
    assert table[2] == "| CosFace | 0.0 | 51.0 ± 1.4 | 20.0 ± 0.0 | 1.0 |"
    assert len([line for line in table if line.startswith("| CosFace |")]) == 10


def test_one_seed_shows_no_spread() -> None:
    """A single seed printed "± 0.0" (a spread it cannot have), unlike bench's table."""
    result = _fake_result("cosface-margin", 1)
    table = sweep_report.markdown(result).splitlines()
    assert table[2] == "| CosFace | 0.0 | 50.0 | 20.0 | 1.0 |"
    assert table[-1].endswith("metrics in %.")
    assert "±" not in sweep_report.row_text(result["points"][0])


def test_scale_sweep_figure_has_both_series_bound_and_labels() -> None:
    import matplotlib.pyplot as plt

    fig = sweep_report.figure(_fake_result("scale", 2))
    try:
        assert len(fig.axes) == 2
        for ax, label in zip(fig.axes, ("Recall@1 (%)", "MAP@R (%)"), strict=True):
            assert ax.get_ylabel() == label and ax.get_xlabel() == "scale s"
            assert ax.get_xscale() == "log"
            legend = [t.get_text() for t in ax.get_legend().get_texts()]
            assert legend == ["CosFace lower bound s=11.7", "CosFace", "ArcFace"]
            bound = [line for line in ax.lines if line.get_linestyle() == ":"]
            assert bound and bound[0].get_xdata()[0] == 11.7
        assert "2 seeds" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_categorical_sweep_draws_bars() -> None:
    import matplotlib.pyplot as plt

    fig = sweep_report.figure(_fake_result("warmup", 1))
    try:
        ax = fig.axes[0]
        assert len(ax.patches) == 2
        assert [t.get_text() for t in ax.get_xticklabels()] == ["fixed m", "warm-up 0 → m"]
    finally:
        plt.close(fig)


def test_sweeps_cover_the_issue_grids() -> None:
    margins = [p.x for p in SWEEPS["cosface-margin"].points]
    assert margins == pytest.approx([0.05 * i for i in range(10)])
    assert [p.x for p in SWEEPS["arcface-margin"].points] == pytest.approx(
        [0.1 * i for i in range(7)]
    )
    scales = {(p.series, p.x) for p in SWEEPS["scale"].points}
    assert scales == {(s, x) for s in ("CosFace", "ArcFace") for x in (8, 16, 32, 64, 128)}
    assert [p.loss for p in SWEEPS["normalization"].points] == ["softmax", "nsl"]
    assert [p.warmup for p in SWEEPS["warmup"].points] == [False, True]
    assert isinstance(SWEEPS["warmup"].points[0], SweepPoint)


def test_margin_warmup_schedule_ramps_from_zero() -> None:
    from pml_margins.bench.sweeps import margin_warmup
    from pml_margins.losses import ArcFaceLoss

    loss = ArcFaceLoss(3, 4, margin=0.4)
    schedule = margin_warmup(0.5)(loss, 10)
    assert loss.margin == 0.0
    values = [schedule.step() for _ in range(6)]
    assert values == pytest.approx([0.08, 0.16, 0.24, 0.32, 0.4, 0.4])


def test_ablate_cli_tiny(tmp_path, monkeypatch) -> None:
    from pml_margins.bench import cli_ablate
    from pml_margins.cli import main

    real = cli_ablate._bench_args

    def small(args):
        ns = real(args)
        ns.max_classes, ns.image_size, ns.batch_size = 20, 16, 32
        return ns

    monkeypatch.setattr(cli_ablate, "_bench_args", small)
    out = tmp_path / "ab"
    assert (
        main(["ablate", "--sweep", "warmup", "--epochs", "1", "--no-progress", "--out", str(out)])
        == 0
    )
    import json

    result = json.loads((out / "warmup.json").read_text())
    assert [p["warmup"] for p in result["points"]] == [False, True]
    assert result["points"][0]["metrics"] != result["points"][1]["metrics"]
    assert (out / "warmup.png").read_bytes().startswith(b"\x89PNG")
    assert "| ArcFace | fixed m |" in (out / "warmup.md").read_text()
    from tests.bench.conftest import run_cli

    with pytest.raises(SystemExit, match="error: --repeats must be >= 1"):
        run_cli(["ablate", "--repeats", "0", "--out", str(out)])


def test_ablate_trains_each_points_overrides_with_one_seed_per_repeat(tmp_path, monkeypatch):
    """Each point's swept value reaches the loss it trains, every repeat a seed of its own
    (``--seed`` + repeat), and a warm-up point's schedule is stepped to its end (found by
    review: none of the three was checked; the tiny run above has no overrides and one
    seed, and tells the warm-up point apart by metrics only)."""
    import json

    from pml_margins.bench import cli_ablate, registry, sweeps, train
    from pml_margins.cli import main

    real_args, real_build, real_seed = (
        cli_ablate._bench_args,
        registry.build_loss,
        train.seed_everything,
    )

    def small(args):
        ns = real_args(args)
        ns.max_classes, ns.image_size, ns.batch_size = 20, 16, 32
        return ns

    built, seeds = [], []

    def recording_build(*args, **kwargs):
        setup = real_build(*args, **kwargs)
        built.append(setup.loss)
        return setup

    def recording_seed(seed):
        seeds.append(seed)
        real_seed(seed)

    monkeypatch.setattr(cli_ablate, "_bench_args", small)
    monkeypatch.setattr(registry, "build_loss", recording_build)
    monkeypatch.setattr(train, "seed_everything", recording_seed)
    points = (
        sweeps.SweepPoint("ArcFace", 0.1, "arcface", {"margin": 0.1}),
        sweeps.SweepPoint("ArcFace", 0.4, "arcface", {"margin": 0.4}, warmup=True),
    )
    monkeypatch.setitem(sweeps.SWEEPS, "warmup", sweeps.Sweep("warmup", "m", points))
    out = tmp_path / "ab"
    argv = ["ablate", "--sweep", "warmup", "--epochs", "1", "--repeats", "2", "--seed", "5"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    runs = [seed for i, seed in enumerate(seeds) if i == 0 or seeds[i - 1] != seed]
    assert runs == [5, 6, 5, 6]  # (each run seeds more than once: its model, its loader)
    # the fixed point keeps its margin; the warm-up point's has risen from 0 to its value
    assert [float(loss.margin) for loss in built] == pytest.approx([0.1, 0.1, 0.4, 0.4])
    result = json.loads((out / "warmup.json").read_text())
    assert result["seeds"] == [5, 6]
    assert [p["hyperparameters"]["margin"] for p in result["points"]] == [0.1, 0.4]
    for point in result["points"]:
        first, second = (run["metrics"] for run in point["runs"])
        assert [run["seed"] for run in point["runs"]] == [5, 6] and first != second


@pytest.mark.parametrize(("flag", "expected"), [([], None), (["--threads", "2"], 2)])
def test_ablate_threads_and_glyph_loss_defaults(tmp_path, monkeypatch, flag, expected) -> None:
    import json

    from pml_margins.bench import cli_ablate, train
    from pml_margins.bench.datasets import DATASETS
    from pml_margins.cli import main

    real_args, real_train = cli_ablate._bench_args, train.train_embedding
    threads: list[int] = []

    def small(args):
        ns = real_args(args)
        ns.max_classes, ns.image_size, ns.batch_size = 20, 16, 32
        return ns

    def record(*args, **kwargs):
        threads.append(torch.get_num_threads())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(cli_ablate, "_bench_args", small)
    monkeypatch.setattr(train, "train_embedding", record)
    before = torch.get_num_threads()
    out = tmp_path / "ab"
    args = ["ablate", "--sweep", "normalization", "--epochs", "1", "--no-progress", *flag]
    assert main([*args, "--out", str(out)]) == 0
    glyphs = DATASETS["glyphs"]
    assert threads == [expected or glyphs.defaults["threads"]] * 2
    assert torch.get_num_threads() == before
    result = json.loads((out / "normalization.json").read_text())
    points = result["points"]
    assert points[1]["hyperparameters"]["scale"] == glyphs.loss_defaults["nsl"]["scale"]
    # the settings recorded are those used: the threads set, the command's repeats
    assert result["settings"]["threads"] == (expected or glyphs.defaults["threads"])
    assert result["settings"]["repeats"] == 1 and result["settings"]["epochs"] == 1
