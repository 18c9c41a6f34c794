"""Issue 15: every flag of ``pml-margins eval`` changes what it should; bad input is
one error line with exit status 2 (issue 16.8)."""

import json

import numpy as np
import pytest
import torch
from conftest import brute_force_neighbours

from pml_margins.cli import main


@pytest.fixture
def files(tmp_path):
    """Data where cosine and Euclidean rank differently: the class is the direction,
    the norm is noise, so cosine finds the class and Euclidean does not."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 4
    angles = y * (np.pi / 2) + 0.3 * torch.randn(120, generator=g)
    radii = torch.rand(120, generator=g) * 9 + 1
    x = torch.stack([radii * torch.cos(angles), radii * torch.sin(angles)], dim=1).float()
    paths = {"x": tmp_path / "x.npy", "y": tmp_path / "y.npy"}
    np.save(paths["x"], x.numpy())
    np.save(paths["y"], y.numpy())
    return x, y, {k: str(v) for k, v in paths.items()}, tmp_path


def _run(argv, tmp_path):
    out = tmp_path / "out.json"
    assert main([*argv, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def _base(paths):
    return ["eval", "--embeddings", paths["x"], "--labels", paths["y"]]


def _p_at_1(x, y, metric):
    xx = x / x.norm(dim=1, keepdim=True) if metric == "dot" else x
    first = brute_force_neighbours(xx, xx, True, metric)[:, 0]
    return float((y.numpy()[first] == y.numpy()).mean())


def test_distance_flag_changes_the_ranking(files):
    x, y, paths, tmp = files
    argv = [*_base(paths), "--metrics", "precision_at_1"]
    euclid = _run(argv, tmp)["precision_at_1"]
    cosine = _run([*argv, "--distance", "cosine"], tmp)["precision_at_1"]
    assert euclid == pytest.approx(_p_at_1(x, y, "euclidean"))
    assert cosine == pytest.approx(_p_at_1(x, y, "dot"))
    assert cosine != euclid


def test_recall_ks_metrics_and_exclude_flags(files):
    x, y, paths, tmp = files
    got = _run(
        [*_base(paths), "--metrics", "recall_at_1", "recall_at_3", "--recall-ks", "1", "3"], tmp
    )
    assert set(got) == {"recall_at_1", "recall_at_3"}
    order = brute_force_neighbours(x, x, True)
    hits = y.numpy()[order[:, :3]] == y.numpy()[:, None]
    assert got["recall_at_3"] == pytest.approx(hits.any(1).mean())
    assert got["recall_at_1"] == pytest.approx(hits[:, 0].mean())
    got = _run([*_base(paths), "--exclude", "NMI", "AMI", "recall_at_2"], tmp)
    assert "NMI" not in got and "recall_at_2" not in got and "recall_at_8" in got


def test_k_avg_of_avgs_and_reference_flags(files):
    x, y, paths, tmp = files
    metrics = ["--metrics", "mean_average_precision"]
    k3 = _run([*_base(paths), *metrics, "--k", "3"], tmp)["mean_average_precision"]
    k_all = _run([*_base(paths), *metrics, "--k", "all"], tmp)["mean_average_precision"]
    assert k3 != k_all  # PML's MAP depends on k
    y_unbalanced = torch.cat([torch.zeros(100, dtype=torch.long), torch.arange(1, 21) % 2 + 1])
    np.save(tmp / "yu.npy", y_unbalanced.numpy())
    argv = ["eval", "--embeddings", paths["x"], "--labels", str(tmp / "yu.npy")]
    plain = _run([*argv, "--metrics", "precision_at_1"], tmp)["precision_at_1"]
    avg = _run([*argv, "--metrics", "precision_at_1", "--avg-of-avgs"], tmp)["precision_at_1"]
    assert plain != pytest.approx(avg)
    np.save(tmp / "q.npy", x[:30].numpy())
    np.save(tmp / "ql.npy", y[:30].numpy())
    ref = ["--reference-embeddings", paths["x"], "--reference-labels", paths["y"]]
    q = ["eval", "--embeddings", str(tmp / "q.npy"), "--labels", str(tmp / "ql.npy")]
    with_self = _run([*q, *ref, "--metrics", "precision_at_1"], tmp)["precision_at_1"]
    assert with_self == 1.0  # each query finds itself in the reference set
    without = _run([*q, *ref, "--ref-includes-query", "--metrics", "precision_at_1"], tmp)
    first = brute_force_neighbours(x[:30], x, False)
    first = [row[row != i][0] for i, row in enumerate(first)]
    assert without["precision_at_1"] == pytest.approx(
        float((y.numpy()[first] == y[:30].numpy()).mean())
    )


def test_output_writes_null_for_nan(files, capsys):
    _, _, paths, tmp = files
    np.save(tmp / "lone.npy", np.arange(120))  # every label alone: P@1 is NaN
    argv = ["eval", "--embeddings", paths["x"], "--labels", str(tmp / "lone.npy")]
    got = _run([*argv, "--metrics", "precision_at_1"], tmp)
    assert got == {"precision_at_1": None}
    assert "null" in (tmp / "out.json").read_text()
    assert "| precision_at_1 | nan |" in capsys.readouterr().out


def test_help_lists_metrics_and_flags(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for word in (
        "precision_at_1",
        "mean_average_precision_at_r",
        "recall_at_K",
        "stdout",
        "nearest references",
        "L2-normalized",
        "null",
    ):
        assert word in text


@pytest.mark.parametrize(
    ("embeddings", "labels", "message"),
    [
        ("missing.npy", "y.npy", "missing.npy: cannot read: No such file"),
        (".", "y.npy", ": is a directory"),
        ("x.npy", "nanlab.npy", "nanlab.npy: query_labels contains NaN"),
        ("x.npy", "str.npy", "str.npy: cannot read: it holds strings (dtype <U1), not numbers"),
        ("x.npy", "short.npy", "short.npy: query_labels has length 5"),
        ("nan.npy", "y.npy", "nan.npy: query contains NaN"),
        ("x.txt", "y.npy", "x.txt: cannot read: expected a .npy"),
        ("empty.pt", "y.npy", "empty.pt: cannot read: not a .pt file: it is empty"),
        # torch.load's legacy reader took a text file's first byte for a pickle opcode
        ("text.pt", "y.npy", "text.pt: cannot read: not a .pt file: it is neither a .npy"),
        ("npy.pt", "y.npy", "npy.pt: cannot read: not a .pt file: it is a .npy array"),
        ("pickle.pt", "y.npy", "pickle.pt: cannot read: not a valid .pt file (struct.error"),
        ("x.npy", "nan_labels.npy", "nan_labels.npy: query_labels contains NaN or Inf"),
        # a file that is not what its suffix says is named for what it is (numpy called
        # any of them "pickled (object) data"; found by review)
        ("text.npy", "y.npy", "text.npy: cannot read: not a .npy file: it is neither a .npy"),
        ("zip.npy", "y.npy", "zip.npy: cannot read: not a .npy file: it is a zip archive"),
        ("array.npz", "y.npy", "array.npz: cannot read: not a .npz file: it is a .npy array"),
        ("empty.npy", "y.npy", "empty.npy: cannot read: not a .npy file: it is empty"),
        # the article follows the type's name ("holds a int" before; found by review)
        ("int.pt", "y.npy", "int.pt: cannot read: int.pt holds an int, not a tensor"),
        ("list.pt", "y.npy", "list.pt: cannot read: list.pt holds a list, not a tensor"),
    ],
)
def test_bad_files_give_one_line_and_status_2(
    files, capsys, monkeypatch, embeddings, labels, message
):
    _, _, _, tmp = files
    np.save(tmp / "nanlab.npy", np.full(120, np.nan))
    np.save(tmp / "str.npy", np.array(["a"] * 120))
    np.save(tmp / "short.npy", np.arange(5))
    np.save(tmp / "nan.npy", np.full((120, 2), np.nan, dtype=np.float32))
    (tmp / "x.txt").write_text("1 2\n")
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "text.npy").write_text("hello")
    np.savez(tmp / "zip.npz", a=np.zeros((120, 2)))
    (tmp / "zip.npy").write_bytes((tmp / "zip.npz").read_bytes())
    np.save(tmp / "array.npy", np.zeros((120, 2)))
    (tmp / "array.npz").write_bytes((tmp / "array.npy").read_bytes())
    (tmp / "empty.npy").write_bytes(b"")
    (tmp / "text.pt").write_text("epoch 3")
    (tmp / "npy.pt").write_bytes((tmp / "array.npy").read_bytes())
    (tmp / "pickle.pt").write_bytes(b"\x80\x02junk")
    torch.save(3, tmp / "int.pt")
    torch.save([1.0, 2.0], tmp / "list.pt")
    np.save(tmp / "nan_labels.npy", np.where(np.arange(120) == 3, np.nan, np.arange(120) % 4))
    monkeypatch.chdir(tmp)
    assert main(["eval", "--embeddings", embeddings, "--labels", labels]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--metrics", "foo"], "--metrics: unknown metric foo; choose from AMI, NMI,"),
        (["--exclude", "bar"], "--exclude: unknown metric bar; choose from"),
        (["--metrics", "NMI", "--exclude", "NMI"], "--metrics and --exclude leave no metric"),
        # "03" is no K: refused, and K = 3 not offered among the choices (it was)
        (["--metrics", "recall_at_03"], "recall_at_2, recall_at_4, recall_at_8 (or"),
    ],
)
def test_metric_names_are_checked_against_the_flags(files, capsys, flags, message):
    """PML's "Primary metrics must be one or more of" named neither the value nor the
    flag; excluding every metric printed an empty table with status 0."""
    _, _, paths, _ = files
    assert main(["eval", "--embeddings", paths["x"], "--labels", paths["y"], *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert (
        main(
            ["eval", "--embeddings", paths["x"], "--labels", paths["y"], "--metrics", "recall_at_3"]
        )
        == 0
    )


def test_errors_name_the_flags_not_the_calculators_arguments(files, capsys):
    _, _, paths, tmp = files
    width = np.load(paths["x"]).shape[1]
    np.save(tmp / "other.npy", np.random.default_rng(0).standard_normal((5, width), np.float32))
    np.save(tmp / "other_y.npy", np.arange(5))
    ref = ["--reference-embeddings", str(tmp / "other.npy"), "--reference-labels"]
    cases = {
        "--num-threads must be an integer in [1, 1024], got 0": ["--num-threads", "0"],
        "--ref-includes-query needs the first rows of --reference-embeddings and "
        "--reference-labels to equal --embeddings and --labels": [
            *ref, str(tmp / "other_y.npy"), "--ref-includes-query"
        ],
    }  # fmt: skip
    for message, flags in cases.items():
        assert main([*_base(paths), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"pml-margins eval: error: {message}"
