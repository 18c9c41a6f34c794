"""Tiny fake CUB-200-2011 and Stanford Online Products folders in the official layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# CUB: classes 1-100 are the official train split, 101-200 the test split
CUB_CLASSES = {1: 3, 2: 3, 3: 2, 101: 3, 102: 3}
# SOP: class ids in Ebay_train.txt (1..11318) and Ebay_test.txt (11319..22634)
SOP_TRAIN = {1: 3, 5: 3, 9: 2}
SOP_TEST = {11319: 3, 11320: 3}


def _save_jpeg(path: Path, rng: np.random.Generator, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (12, 10) if mode == "L" else (12, 10, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path, "JPEG")


def make_fake_cub(root: Path) -> Path:
    """``root/CUB_200_2011/{images.txt, image_class_labels.txt, images/...}``; image 1 is gray."""
    rng = np.random.default_rng(0)
    folder = root / "CUB_200_2011"
    images, labels = [], []
    image_id = 0
    for class_id, count in CUB_CLASSES.items():
        for j in range(count):
            image_id += 1
            rel = f"{class_id:03d}.Bird_{class_id}/Bird_{class_id}_{j}.jpg"
            _save_jpeg(folder / "images" / rel, rng, "L" if image_id == 1 else "RGB")
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
    (folder / "images.txt").write_text("\n".join(images) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def make_fake_sop(root: Path) -> Path:
    """``root/Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <cat>_final/...}``."""
    rng = np.random.default_rng(1)
    folder = root / "Stanford_Online_Products"
    image_id = 0
    for split, classes in (("train", SOP_TRAIN), ("test", SOP_TEST)):
        lines = ["image_id class_id super_class_id path"]
        for class_id, count in classes.items():
            for j in range(count):
                image_id += 1
                rel = f"bicycle_final/{class_id}_{j}.JPG"
                _save_jpeg(folder / rel, rng)
                lines.append(f"{image_id} {class_id} 1 {rel}")
        (folder / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def fake_cub(tmp_path: Path) -> Path:
    return make_fake_cub(tmp_path / "cub")


@pytest.fixture
def fake_sop(tmp_path: Path) -> Path:
    return make_fake_sop(tmp_path / "sop")


def run_cli(argv: list[str]) -> int:
    """``pml-margins`` as a user runs it, for tests written against ``SystemExit``: a bad
    input must give status 2 and exactly one ``pml-margins <command>: error: ...`` line on
    stderr, which is then raised as ``SystemExit("error: ...")``; other stderr passes on."""
    import contextlib
    import io
    import sys

    from pml_margins.cli import main

    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        code = main(argv)
    lines = captured.getvalue().strip().splitlines()
    if code == 2:
        errors = [ln for ln in lines if ": error: " in ln]
        assert len(errors) == 1 and errors[0].startswith(f"pml-margins {argv[0]}: error: "), lines
        raise SystemExit(errors[0].split(": ", 1)[1])
    sys.stderr.write(captured.getvalue())
    return code
