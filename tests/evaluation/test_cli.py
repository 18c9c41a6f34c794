import json

import numpy as np
import pytest
import torch
from conftest import make_data

from pml_margins.cli import main
from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.evaluation.cli_eval import format_table, load_array


def save(path, array, fmt):
    if fmt == "npy":
        np.save(path, array.numpy())
    elif fmt == "npz":
        np.savez(path, only=array.numpy())
    else:
        torch.save(array, path)
    return str(path)


@pytest.mark.parametrize("fmt", ["npy", "npz", "pt"])
def test_eval_writes_json_equal_to_the_calculator(tmp_path, capsys, fmt):
    x, y = make_data("clustered", 90, 5, 4, seed=13)
    e = save(tmp_path / f"e.{fmt}", x, fmt)
    lab = save(tmp_path / f"l.{fmt}", y, fmt)
    out = tmp_path / "acc.json"
    argv = ["eval", "--embeddings", e, "--labels", lab, "--output", str(out)]
    argv += ["--metrics", "precision_at_1", "recall_at_1", "recall_at_4", "r_precision"]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    expected = RetrievalAccuracyCalculator(
        include=("precision_at_1", "recall_at_1", "recall_at_4", "r_precision"),
        k="max_bin_count",
    ).get_accuracy(x, y)
    assert results == pytest.approx(expected)
    table = capsys.readouterr().out
    assert "| recall_at_4 |" in table and "| metric | value |" in table


def test_eval_with_reference_set_cosine_and_recall_ks(tmp_path):
    x, y = make_data("clustered", 100, 5, 4, seed=14)
    paths = {
        n: save(tmp_path / f"{n}.npy", t, "npy")
        for n, t in {"q": x[:40], "ql": y[:40], "r": x[40:], "rl": y[40:]}.items()
    }
    out = tmp_path / "acc.json"
    main(
        [
            "eval",
            "--embeddings",
            paths["q"],
            "--labels",
            paths["ql"],
            "--reference-embeddings",
            paths["r"],
            "--reference-labels",
            paths["rl"],
            "--recall-ks",
            "1",
            "16",
            "--distance",
            "cosine",
            "--exclude",
            "NMI",
            "AMI",
            "--output",
            str(out),
        ]
    )
    results = json.loads(out.read_text())
    assert {"recall_at_1", "recall_at_16", "num_excluded_queries"} <= set(results)
    assert "recall_at_2" not in results and "AMI" not in results


def test_load_array_errors(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros(2), b=np.zeros(2))
    with pytest.raises(ValueError, match="must hold one array or one named 'labels'"):
        load_array(tmp_path / "two.npz", "labels")
    np.savez(tmp_path / "named.npz", labels=np.arange(3), other=np.zeros(2))
    assert load_array(tmp_path / "named.npz", "labels").tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"expected a \.npy, \.npz or \.pt"):
        load_array(tmp_path / "x.csv")


def test_bad_k_and_missing_reference_labels(tmp_path, capsys):
    e = save(tmp_path / "e.npy", torch.zeros(3, 2), "npy")
    with pytest.raises(SystemExit):
        main(["eval", "--embeddings", e, "--labels", e, "--k", "zero"])
    assert "k must be a positive integer" in capsys.readouterr().err
    assert main(["eval", "--embeddings", e, "--labels", e, "--reference-embeddings", e]) == 2
    assert "give both --reference-embeddings" in capsys.readouterr().err


def test_format_table_per_class():
    table = format_table({"precision_at_1": [1.0, 0.0], "num_excluded_queries": 0})
    assert "0.5000 (mean of 2 classes)" in table
