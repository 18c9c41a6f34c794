"""``pml-margins sphere`` on tiny settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pml_margins.bench.sphere_plot import class_weight_directions
from pml_margins.cli import main


def test_sphere_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sphere.png"
    args = ["sphere", "--losses", "softmax,arcface", "--epochs", "1", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("dims", ["2", "3"])
def test_sphere_single_row(tmp_path: Path, dims: str) -> None:
    out = tmp_path / "one.png"
    args = ["sphere", "--losses", "nsl", "--dims", dims, "--epochs", "1", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_sphere_rejects_bad_dims(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--dims"):
        main(["sphere", "--dims", "4", "--out", str(tmp_path / "x.png")])


def test_class_weight_directions_are_unit_rows() -> None:
    from pytorch_metric_learning.losses import MultipleLosses

    from pml_margins.losses import ArcFaceLoss, SoftmaxLoss

    w = class_weight_directions(ArcFaceLoss(5, 3))
    assert w.shape == (5, 3)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
    nested = MultipleLosses([SoftmaxLoss(4, 2)])
    assert class_weight_directions(nested).shape == (4, 2)
    assert class_weight_directions(torch.nn.Identity()) is None
