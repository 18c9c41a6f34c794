"""Datasets: the digits' class-disjoint split; CUB/SOP through PML's classes; folder errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pml_margins.bench import data
from pml_margins.bench.train import dataset_labels

from .conftest import CUB_CLASSES, SOP_TEST, SOP_TRAIN


def test_digits_split_is_class_disjoint() -> None:
    split = data.load_digits_split((0, 1, 2, 3, 4))
    train_x, train_y = split.train.tensors
    test_x, test_y = split.test.tensors
    assert set(train_y.tolist()) == set(range(5))  # remapped to 0..C-1
    assert set(test_y.tolist()) == {5, 6, 7, 8, 9}
    assert len(train_y) + len(test_y) == 1797
    assert train_x.shape[1:] == (1, 8, 8) and float(train_x.max()) <= 1.0
    # no image of the test set appears in the training set
    flat_train = {tuple(row.tolist()) for row in train_x.flatten(1)}
    overlap = sum(tuple(row.tolist()) in flat_train for row in test_x.flatten(1))
    assert overlap <= 2  # a couple of 8x8 digits are pixel-identical across classes, if any
    assert split.recall_ks == ()  # filled in by the dataset registry


def test_digits_split_remaps_arbitrary_classes() -> None:
    split = data.load_digits_split((9, 3, 5))
    assert split.num_train_classes == 3
    assert set(split.train.tensors[1].tolist()) == {0, 1, 2}
    assert set(split.test.tensors[1].tolist()) == {0, 1, 2, 4, 6, 7, 8}


@pytest.mark.parametrize("classes", [(), (1, 1), (0, 10), tuple(range(10))])
def test_digits_split_rejects_bad_classes(classes: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="train_classes"):
        data.load_digits_split(classes)


def test_cub_loads_through_pml_with_rgb_and_remapped_labels(fake_cub: Path) -> None:
    from pytorch_metric_learning.datasets import CUB

    split = data.load_image_dataset("cub", fake_cub, image_size=16)
    assert isinstance(split.train.dataset, CUB) and isinstance(split.test.dataset, CUB)
    assert split.num_train_classes == 3
    assert split.input_shape == (3, 16, 16)
    # official split: classes 1-100 train, 101-200 test
    assert sorted(set(split.train.labels)) == [1, 2, 3]
    assert sorted(set(split.test.labels)) == [101, 102]
    assert len(split.train) == sum(v for k, v in CUB_CLASSES.items() if k <= 100)
    # image 1 is grayscale on disk and comes out as 3 channels
    assert Path(split.train.paths[0]).exists()
    image, label = split.train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert label == 0
    assert sorted(set(dataset_labels(split.train))) == [0, 1, 2]
    batch = torch.stack([split.train[i][0] for i in range(len(split.train))])
    assert torch.isfinite(batch).all()


def test_an_image_truncated_in_its_header_is_named(fake_cub: Path) -> None:
    """PML opens each image before the transform: Pillow's "Truncated File Read" there
    is a ValueError naming the file too (found by review)."""
    split = data.load_image_dataset("cub", fake_cub, image_size=16)
    path = Path(split.test.paths[1])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"cannot read image {path}: Truncated File Read"):
        split.test[1]
    assert split.test[0][0].shape == (3, 16, 16)  # the others still load


def test_an_image_with_too_many_pixels_is_named(fake_cub: Path, monkeypatch) -> None:
    """Pillow's DecompressionBombError (not an OSError) went past the wrapper as a
    traceback; only the first image, opened by open_image, was covered."""
    from PIL import Image

    split = data.load_image_dataset("cub", fake_cub, image_size=16)
    path = Path(split.test.paths[1])
    with Image.open(path) as image:
        pixels = image.width * image.height
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels // 4)  # twice over: the error
    with pytest.raises(ValueError, match=f"cannot read image {path}: Image size"):
        split.test[1]


def test_sop_loads_through_pml_with_official_split(fake_sop: Path) -> None:
    from pytorch_metric_learning.datasets import StanfordOnlineProducts

    split = data.load_image_dataset("sop", fake_sop, image_size=8)
    assert isinstance(split.train.dataset, StanfordOnlineProducts)
    assert sorted(set(split.train.labels)) == sorted(SOP_TRAIN)
    assert sorted(set(split.test.labels)) == sorted(SOP_TEST)
    assert sorted(set(dataset_labels(split.train))) == [0, 1, 2]
    assert split.recall_ks == ()  # the loader does not choose cut-offs

    from argparse import Namespace

    from pml_margins.bench.datasets import load_dataset

    registered = load_dataset("sop", Namespace(data_root=str(fake_sop), image_size=16))
    assert registered.recall_ks == (1, 10, 100, 1000)
    image, label = split.test[0]
    assert image.shape == (3, 8, 8) and label == 11319


@pytest.mark.parametrize(
    ("name", "expected"),
    [("cub", "images.txt, .*image_class_labels.txt"), ("sop", "Ebay_train.txt, .*Ebay_test.txt")],
)
def test_missing_folder_names_expected_files(tmp_path: Path, name: str, expected: str) -> None:
    os.makedirs(tmp_path / "empty")
    with pytest.raises(data.DatasetFolderError, match=f"not found: expected .*{expected}"):
        data.load_image_dataset(name, tmp_path / "empty")


def test_cub_missing_index_file(fake_cub: Path) -> None:
    (fake_cub / "CUB_200_2011" / "image_class_labels.txt").unlink()
    with pytest.raises(data.DatasetFolderError, match=r"missing image_class_labels\.txt"):
        data.load_image_dataset("cub", fake_cub)


def test_cub_missing_images_are_listed(fake_cub: Path) -> None:
    victim = next((fake_cub / "CUB_200_2011" / "images").rglob("*.jpg"))
    victim.unlink()
    with pytest.raises(data.DatasetFolderError, match=r"1 of 14 listed images are missing") as err:
        data.load_image_dataset("cub", fake_cub)
    assert victim.name in str(err.value)


def test_sop_missing_split_file(fake_sop: Path) -> None:
    (fake_sop / "Stanford_Online_Products" / "Ebay_test.txt").unlink()
    with pytest.raises(data.DatasetFolderError, match=r"missing Ebay_test\.txt"):
        data.load_image_dataset("sop", fake_sop)


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        data.check_dataset_folder("imagenet", tmp_path)


def test_image_to_tensor_converts_grayscale() -> None:
    from PIL import Image

    tensor = data.ImageToTensor(4)(Image.new("L", (7, 5), color=128))
    assert tensor.shape == (3, 4, 4)
    assert torch.allclose(tensor[0, 0, 0], (torch.tensor(128 / 255) - 0.485) / 0.229)


def test_a_premultiplied_alpha_image_reads_and_an_unconvertible_one_is_named(tmp_path) -> None:
    """Pillow converts mode La to LA only: the image failed with Pillow's own message,
    which names no file (found by review)."""
    from PIL import Image

    path = tmp_path / "grey.png"
    Image.new("LA", (7, 5), color=(128, 255)).save(path)
    with Image.open(path) as opened:
        expected = data.ImageToTensor(4)(opened)
    premultiplied = Image.new("La", (7, 5), color=(128, 255))
    assert torch.equal(data.ImageToTensor(4)(premultiplied), expected)

    class Unconvertible:  # a Pillow image whose mode has no RGB conversion
        mode, filename = "La", str(tmp_path / "odd.png")

        def convert(self, mode):
            raise ValueError(f"conversion from La to {mode} not supported")

    with pytest.raises(ValueError, match=r"cannot read image .*odd\.png: conversion from La"):
        data.ImageToTensor(4)(Unconvertible())


@pytest.mark.parametrize("name", ["cub", "sop"])
def test_download_passes_through_to_pml(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytorch_metric_learning import datasets

    from .conftest import make_fake_cub, make_fake_sop

    calls: list[str] = []

    def fake_download(self: object) -> None:  # stands in for PML's network download
        calls.append(self.root)  # type: ignore[attr-defined]
        (make_fake_cub if name == "cub" else make_fake_sop)(Path(self.root))  # type: ignore[attr-defined]

    cls = datasets.CUB if name == "cub" else datasets.StanfordOnlineProducts
    monkeypatch.setattr(cls, "download_and_remove", fake_download)
    root = tmp_path / "new"
    split = data.load_image_dataset(name, root, download=True, image_size=8)
    assert calls == [str(root)]
    assert len(split.train) > 0 and len(split.test) > 0
    # an existing, non-empty folder is not downloaded again (PML's rule)
    data.load_image_dataset(name, root, download=True, image_size=8)
    assert calls == [str(root)]


@pytest.mark.parametrize("download", [False, True])
def test_a_skipped_download_is_named(tmp_path: Path, download: bool) -> None:
    """A non-empty --data-root without the dataset: the error advised --download, which
    had been passed and silently skipped (found by review)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "notes.txt").write_text("x")
    with pytest.raises(data.DatasetFolderError) as caught:
        data.load_image_dataset("cub", root, download=download, image_size=8)
    skipped = "--download was skipped: " + str(root) + " is not empty"
    assert (skipped in str(caught.value)) is download


def test_an_index_file_with_a_byte_order_mark_is_named(fake_cub: Path) -> None:
    """PML reads the first id with the BOM attached and fails: the check says why first
    (it dropped the BOM and passed; found by review)."""
    path = fake_cub / "CUB_200_2011" / "images.txt"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    with pytest.raises(data.DatasetFolderError, match=r"images\.txt starts with a byte-order"):
        data.load_image_dataset("cub", fake_cub, image_size=16)


def test_training_images_are_augmented_and_test_images_centre_cropped(fake_cub: Path) -> None:
    """The benchmarks' transforms (found by review: both splits were squashed to a square,
    the training split without augmentation): training draws a random resized crop and a
    mirror from torch's generator; the test split resizes the shorter side and crops the
    centre, the same every time."""
    split = data.load_image_dataset("cub", fake_cub, image_size=16)
    assert split.train.dataset.transform.augment and not split.test.dataset.transform.augment
    torch.manual_seed(0)
    first, second = split.train[0][0], split.train[0][0]
    assert first.shape == second.shape == (3, 16, 16) and not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(split.train[0][0], first)  # a seeded run repeats
    assert torch.equal(split.test[0][0], split.test[0][0])
    given = data.ImageToTensor(16)
    same = data.load_image_dataset("cub", fake_cub, image_size=16, transform=given)
    assert same.train.dataset.transform is given is same.test.dataset.transform


def test_the_evaluation_transform_keeps_the_aspect_ratio_and_crops_the_centre() -> None:
    from PIL import Image

    wide = np.zeros((16, 64, 3), np.uint8)  # blue | red, red | green
    wide[:, :16], wide[:, 16:48], wide[:, 48:] = (0, 0, 255), (255, 0, 0), (0, 255, 0)
    tensor = data.ImageToTensor(16)(Image.fromarray(wide))
    assert tensor.shape == (3, 16, 16)
    assert (tensor.argmax(0) == 0).all()  # only the red middle (squashing kept all three)


@pytest.mark.parametrize("shape", [(16, 64), (200, 10), (10, 200), (1, 1), (33, 33)])
def test_random_crops_stay_inside_the_image_and_mirror_half_the_time(shape) -> None:
    from PIL import Image

    ramp = np.broadcast_to(
        np.linspace(0, 255, shape[1]).astype(np.uint8)[None, :, None], (*shape, 3)
    )
    image, augment = (
        Image.fromarray(np.ascontiguousarray(ramp)),
        data.ImageToTensor(8, augment=True),
    )
    torch.manual_seed(1)
    draws = [augment(image) for _ in range(200)]
    assert all(d.shape == (3, 8, 8) and torch.isfinite(d).all() for d in draws)
    if shape[1] > 1:  # the ramp rises left to right; mirrored, it falls
        rising = sum(bool(d[0, :, -1].mean() >= d[0, :, 0].mean()) for d in draws)
        assert 60 < rising < 140
