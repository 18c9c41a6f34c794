"""CUB/SOP folders that break the official protocol, unreadable images and unwritable
outputs: each is one error line naming the file and the problem (status 2), found before
the work it would spoil, never a wrong split nor a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pml_margins.bench.cli_bench import one_line
from pml_margins.bench.data import check_dataset_folder, open_image
from tests.bench.conftest import run_cli
from tests.bench.test_cli_review import CUB


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _cub(root: Path) -> Path:
    return root / "CUB_200_2011"


def _sop(root: Path) -> Path:
    return root / "Stanford_Online_Products"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (  # PML pairs the two files line by line: 10 missing labels lost 10 test images
            lambda f: _edit(f / "image_class_labels.txt", "14 102\n", ""),
            r"images.txt lists 14 images but .*image_class_labels.txt labels 13",
        ),
        (  # zero-based class ids: class 0 was dropped, "train" became 1-100
            lambda f: _edit(f / "image_class_labels.txt", "1 1\n", "1 0\n"),
            r"image_class_labels.txt line 1: class 0 is outside CUB's 1-200",
        ),
        (  # the same images in another order: PML drops every pair whose ids differ
            lambda f: _edit(f / "image_class_labels.txt", "1 1\n2 1\n", "2 1\n1 1\n"),
            r"line 1 of .*images.txt is image 1 but that of .*image_class_labels.txt is image 2",
        ),
        (  # an editor's trailing blank line: PML's reader fails on it
            lambda f: (f / "images.txt").write_text((f / "images.txt").read_text() + "\n"),
            r"images.txt line 15 is blank: remove it",
        ),
        (  # an image id used twice: a damaged index (found by review: it was accepted)
            lambda f: (
                _edit(f / "images.txt", "\n2 001.Bird_1/", "\n1 001.Bird_1/"),
                _edit(f / "image_class_labels.txt", "\n2 1\n", "\n1 1\n"),
            ),
            r"1 image ids are used more than once in images.txt .*\(1\): the official",
        ),
        (  # another encoding: the message did not say which of the two files
            lambda f: (f / "images.txt").write_bytes(
                (f / "images.txt").read_bytes().replace(b"Bird_1_0", b"Bird_\xe9_0", 1)
            ),
            r"images.txt is not UTF-8 text \(line 1: invalid continuation byte\)",
        ),
        (  # an image listed twice (as SOP refuses): a test query found its own copy
            lambda f: (
                (f / "images.txt").write_text(
                    (f / "images.txt").read_text()
                    + "15 "
                    + (f / "images.txt").read_text().splitlines()[-1].split()[1]
                    + "\n"
                ),
                (f / "image_class_labels.txt").write_text(
                    (f / "image_class_labels.txt").read_text() + "15 102\n"
                ),
            ),
            r"1 images are listed more than once in images.txt .*\(images/",
        ),
        (
            lambda f: _edit(f / "images.txt", "3 ", "3 x "),
            r"images.txt line 3 has 3 fields, expected 2 \(<image_id> <path>\)",
        ),
    ],
)
def test_a_cub_folder_off_the_protocol_is_named(fake_cub: Path, edit, match) -> None:
    edit(_cub(fake_cub))
    with pytest.raises(FileNotFoundError, match=match):
        check_dataset_folder("cub", fake_cub)


def _first_test_image_renumbered(folder: Path, image_id: int) -> None:
    lines = (folder / "Ebay_test.txt").read_text().splitlines()
    lines[1] = " ".join([str(image_id), *lines[1].split()[1:]])
    (folder / "Ebay_test.txt").write_text("\n".join(lines) + "\n")


def test_a_sop_image_id_used_in_both_splits_is_named(fake_sop: Path) -> None:
    """(found by review: image 1 in both Ebay files was accepted)"""
    _first_test_image_renumbered(_sop(fake_sop), 1)
    with pytest.raises(FileNotFoundError, match=r"1 image ids are used more than once .*\(1\)"):
        check_dataset_folder("sop", fake_sop)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (  # PML skips the first line: without the header an image was lost per split
            lambda f: _edit(f / "Ebay_test.txt", "image_id class_id super_class_id path\n", ""),
            r"Ebay_test.txt does not start with the header line",
        ),
        (  # a test class trained on: not open-set retrieval
            lambda f: _edit(f / "Ebay_test.txt", " 11319 1 ", " 5 1 "),
            r"1 classes are in both Ebay_train.txt and Ebay_test.txt .*\(5\)",
        ),
        (
            lambda f: (f / "Ebay_train.txt").write_text((f / "Ebay_train.txt").read_text() + "\n"),
            r"Ebay_train.txt line 10 is blank",
        ),
        (
            lambda f: _edit(f / "Ebay_train.txt", " 5 1 ", " five 1 "),
            r"Ebay_train.txt line \d+: .* does not read as <image_id> <class_id>",
        ),
        (  # an image in both splits: a test query would find its own training copy
            lambda f: _edit(
                f / "Ebay_test.txt", "bicycle_final/11319_0.JPG", "bicycle_final/5_0.JPG"
            ),
            r"1 images are listed more than once .*\(bicycle_final/5_0.JPG\)",
        ),
        (  # the same file written another way
            lambda f: _edit(
                f / "Ebay_test.txt", "bicycle_final/11319_0.JPG", "./bicycle_final//5_0.JPG"
            ),
            r"1 images are listed more than once .*\(bicycle_final/5_0.JPG\)",
        ),
        (  # a line repeated in the test split
            lambda f: (f / "Ebay_test.txt").write_text(
                (f / "Ebay_test.txt").read_text()
                + (f / "Ebay_test.txt").read_text().splitlines()[1]
                + "\n"
            ),
            r"1 images are listed more than once .*11319_0.JPG",
        ),
    ],
)
def test_a_sop_folder_off_the_protocol_is_named(fake_sop: Path, edit, match) -> None:
    edit(_sop(fake_sop))
    with pytest.raises(FileNotFoundError, match=match):
        check_dataset_folder("sop", fake_sop)


def test_a_non_utf8_byte_deep_in_an_index_file_is_named_by_line(fake_cub: Path) -> None:
    """The decoder's byte offset counted from its ~8 KB chunk, not from the file."""
    index = _cub(fake_cub) / "images.txt"
    text = index.read_text()
    filler = "".join(f"{900 + i} 001.Bird_1/pad_{i}.jpg\n" for i in range(2000))
    index.write_bytes((text + filler).encode() + b"2901 001.Bird_1/\xe9.jpg\n")
    lines = len(text.splitlines()) + 2001
    with pytest.raises(FileNotFoundError, match=rf"images.txt is not UTF-8 text \(line {lines}:"):
        check_dataset_folder("cub", fake_cub)


def test_the_sop_header_may_follow_a_byte_order_mark(fake_sop: Path) -> None:
    index = _sop(fake_sop) / "Ebay_train.txt"
    index.write_bytes(b"\xef\xbb\xbf" + index.read_bytes())
    check_dataset_folder("sop", fake_sop)


@pytest.mark.parametrize("which", ["first", "test"])
def test_an_unreadable_image_is_one_line_naming_it(fake_cub: Path, tmp_path: Path, which) -> None:
    """The first training image (opened for the input shape) gave a traceback."""
    name = "001.Bird_1/Bird_1_0.jpg" if which == "first" else "101.Bird_101/Bird_101_1.jpg"
    (_cub(fake_cub) / "images" / name).write_bytes(b"not a jpeg")
    argv = ["bench", "--dataset", "cub", "--data-root", str(fake_cub), *CUB]
    with pytest.raises(SystemExit, match=rf"error: .*{name}"):
        run_cli([*argv, "--out", str(tmp_path / "out")])


def test_a_truncated_image_names_its_file(fake_cub: Path) -> None:
    path = _cub(fake_cub) / "images" / "102.Bird_102/Bird_102_0.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the header reads; the pixels do not
    from pml_margins.bench.data import ImageToTensor

    with pytest.raises(
        ValueError, match=r"cannot read image .*Bird_102_0.jpg: image file is trunc"
    ):
        ImageToTensor(8)(Image.open(path))
    with pytest.raises(ValueError, match=r"cannot read image .*Bird_102_0.jpg"):
        open_image(str(path))


def test_a_dataloader_workers_error_keeps_its_own_line() -> None:
    wrapped = ValueError(
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\nValueError: cannot read image a.jpg: bad\n'
    )
    assert one_line(wrapped) == "cannot read image a.jpg: bad"  # (as without workers)
    assert one_line(ValueError("first\nsecond")) == "first"


def test_an_output_that_cannot_be_written_stops_before_training(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "results.json").mkdir(parents=True)  # found after training before
    argv = ["bench", "--dataset", "digits", "--epochs", "1", "--repeats", "1", "--no-progress"]
    with pytest.raises(SystemExit, match=r"error: --out .*: results.json is a folder"):
        run_cli([*argv, "--out", str(out)])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image-size", "33"], "--image-size must be a multiple of 16 for the glyph CNN"),
        (
            ["--dataset", "digits", "--losses", "center", "--loss-arg", "center.lambda_=-1"],
            "center: lambda_ must be >= 0, got -1.0",
        ),
        (["--dataset", "digits", "--train-classes", "0,0"], "--train-classes must be distinct"),
    ],
)
def test_bad_options_are_named_before_any_work(tmp_path: Path, flags, message) -> None:
    with pytest.raises(SystemExit, match=message):
        run_cli(["bench", *flags, "--epochs", "1", "--no-progress", "--out", str(tmp_path)])


def test_a_cub_folder_without_test_classes_names_the_metric_learning_split(fake_cub) -> None:
    """Classes 1-100 / 101-200 is the metric-learning papers' split (PML's), not CUB's
    official image-level train_test_split.txt: the message called it "official" (review)."""
    from pml_margins.bench.data import DatasetFolderError, load_image_dataset

    labels = _cub(fake_cub) / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace(" 101\n", " 1\n").replace(" 102\n", " 2\n"))
    with pytest.raises(DatasetFolderError) as raised:
        load_image_dataset("cub", fake_cub, image_size=8, progress=False)
    message = str(raised.value)
    assert "no test images" in message and "official" not in message
    assert "the metric-learning split, PML's: classes 1-100 train, 101-200 test" in message
