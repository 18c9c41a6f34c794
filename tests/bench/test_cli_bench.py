"""``pml-margins bench`` end to end on tiny settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pml_margins.cli import main

TINY = ["--epochs", "1", "--repeats", "1", "--no-progress", "--threads", "1", "--no-baseline"]
KEYS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_tiny_digits_bench_writes_results_and_png(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["bench", "--losses", "softmax,arcface", "--out", str(out), *TINY]
    assert main(args[:-1]) == 0  # with the raw-pixel baseline
    results = _results(out)
    assert results["dataset"] == "digits"
    assert results["recall_ks"] == [1, 2, 4, 8]
    assert [e["name"] for e in results["losses"]] == ["softmax", "arcface", "pixels"]
    for entry in results["losses"][:2]:
        assert entry["train_seconds"] > 0 and entry["steps"] > 0
        metrics = entry["metrics"]
        assert {f"recall_at_{k}" for k in (1, 2, 4, 8)} | set(KEYS) <= set(metrics)
        for key in ("recall_at_1", *KEYS):
            assert 0.0 <= metrics[key] <= 1.0
        assert math.isclose(metrics["recall_at_1"], metrics["precision_at_1"])
    assert results["losses"][1]["hyperparameters"]["margin"] == 0.3
    png = (out / "recall.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert (out / "checkpoints" / "arcface.pt").exists()
    table = capsys.readouterr().out
    assert "| Loss | R@1 | R@2 | R@4 | R@8 | P@1 | R-Prec | MAP@R | Train (s) |" in table
    assert "| ArcFace |" in table
    assert "| Raw pixels (no training) |" in table
    assert (out / "results.md").read_text() in table


def test_bench_is_deterministic(tmp_path: Path) -> None:
    args = ["bench", "--losses", "nsl", *TINY]
    main([*args, "--out", str(tmp_path / "a")])
    main([*args, "--out", str(tmp_path / "b")])
    a, b = (_results(tmp_path / d)["losses"][0]["metrics"] for d in "ab")
    assert a == b


def test_loss_arg_overrides_hyperparameter(tmp_path: Path) -> None:
    main(
        [
            "bench",
            "--losses",
            "cosface",
            "--loss-arg",
            "cosface.margin=0.1",
            *TINY,
            "--out",
            str(tmp_path),
        ]
    )
    assert _results(tmp_path)["losses"][0]["hyperparameters"]["margin"] == 0.1


def test_embeddings_only_evaluates_saved_model(tmp_path: Path) -> None:
    main(["bench", "--losses", "nsl,cosface", "--out", str(tmp_path / "train"), *TINY])
    trained = _results(tmp_path / "train")
    out = tmp_path / "eval"
    ckpt = tmp_path / "train" / "checkpoints" / "cosface.pt"
    main(["bench", "--embeddings-only", "--checkpoint", str(ckpt), "--out", str(out), *TINY])
    evaluated = _results(out)
    assert [e["name"] for e in evaluated["losses"]] == ["cosface"]
    assert evaluated["losses"][0]["checkpoint"] == str(ckpt)
    assert evaluated["losses"][0]["metrics"] == trained["losses"][1]["runs"][0]["metrics"]
    # default: every checkpoint under <out>/checkpoints
    main(["bench", "--embeddings-only", "--out", str(tmp_path / "train"), *TINY])
    assert [e["name"] for e in _results(tmp_path / "train")["losses"]] == ["cosface", "nsl"]


def test_embeddings_only_without_checkpoints_fails(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no checkpoints"):
        main(["bench", "--embeddings-only", "--out", str(tmp_path), *TINY])


@pytest.mark.parametrize(
    "bad", [["--losses", "nope"], ["--loss-arg", "arcface.margin=0.1", "--losses", "nsl"]]
)
def test_unknown_loss_names(tmp_path: Path, bad: list[str]) -> None:
    with pytest.raises(SystemExit, match="unknown or unused loss"):
        main(["bench", *bad, "--out", str(tmp_path), *TINY])


@pytest.mark.parametrize("dataset", ["cub", "sop"])
def test_image_bench_on_fake_folders(
    tmp_path: Path, dataset: str, request: pytest.FixtureRequest
) -> None:
    root = request.getfixturevalue(f"fake_{dataset}")
    out = tmp_path / "out"
    args = [
        "bench",
        "--dataset",
        dataset,
        "--data-root",
        str(root),
        "--backbone",
        "small-cnn",
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--embedding-size",
        "8",
        "--losses",
        "nsl",
        "--out",
        str(out),
        *TINY,
    ]
    assert main(args) == 0
    results = _results(out)
    assert results["dataset"] == dataset
    expected_ks = [1, 2, 4, 8] if dataset == "cub" else [1, 10, 100, 1000]
    assert results["recall_ks"] == expected_ks
    assert 0.0 <= results["losses"][0]["metrics"]["precision_at_1"] <= 1.0
    assert main([*args, "--embeddings-only"]) == 0


def test_image_bench_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit, match=r"CUB_200_2011.*images\.txt"):
        main(
            [
                "bench",
                "--dataset",
                "cub",
                "--data-root",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path),
                *TINY,
            ]
        )
    with pytest.raises(SystemExit, match="needs --data-root"):
        main(["bench", "--dataset", "sop", "--out", str(tmp_path), *TINY])


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    main(["bench", "--losses", "arcface", "--amp", "bf16", "--out", str(tmp_path), *TINY])
    assert 0.0 <= _results(tmp_path)["losses"][0]["metrics"]["precision_at_1"] <= 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [[], ["--amp", "bf16"], ["--amp", "fp16"]])
def test_cuda_end_to_end(tmp_path: Path, amp: list[str]) -> None:
    main(
        [
            "bench",
            "--losses",
            "arcface,sphereface",
            "--device",
            "cuda",
            *amp,
            "--out",
            str(tmp_path),
            *TINY,
        ]
    )
    results = _results(tmp_path)
    assert results["config"]["device"] == "cuda"
    assert all(0.0 <= e["metrics"]["precision_at_1"] <= 1.0 for e in results["losses"])


def test_cuda_requested_without_gpu_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match=r"cuda\.is_available"):
        main(["bench", "--losses", "nsl", "--device", "cuda", "--out", str(tmp_path), *TINY])


def test_repeats_report_mean_and_std(tmp_path: Path) -> None:
    args = ["bench", "--losses", "nsl", "--out", str(tmp_path), *TINY, "--repeats", "2"]
    main(args)
    entry = _results(tmp_path)["losses"][0]
    assert entry["seeds"] == [0, 1] and len(entry["runs"]) == 2
    p1 = [run["metrics"]["precision_at_1"] for run in entry["runs"]]
    assert math.isclose(entry["metrics"]["precision_at_1"], sum(p1) / 2)
    assert math.isclose(entry["metrics_std"]["precision_at_1"], abs(p1[0] - p1[1]) / math.sqrt(2))
    assert " ± " in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit, match="--repeats must be >= 1"):
        main([*args, "--repeats", "0"])


def test_thread_setting_is_restored(tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    main(["bench", "--losses", "nsl", "--out", str(tmp_path), *TINY])
    assert torch.get_num_threads() == before
