"""bench/sphere/ablate corners found by review: every bad input is one error line (status
2) found before the work it would spoil, and what a run writes says what it did."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from tests.bench.conftest import run_cli

TINY = ["--dataset", "digits", "--epochs", "1", "--repeats", "1", "--no-progress"]
TINY += ["--threads", "1", "--no-baseline"]
CUB = ["--backbone", "small-cnn", "--image-size", "16", "--batch-size", "4"]
CUB += ["--embedding-size", "8", "--losses", "nsl", "--epochs", "1", "--repeats", "1"]
CUB += ["--no-progress", "--threads", "1"]


def test_a_bad_loss_argument_stops_before_any_loss_trains(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["bench", *TINY, "--losses", "softmax,arcface", "--loss-arg", "arcface.margin=-1"]
    with pytest.raises(SystemExit, match="error: arcface: margin must be >= 0"):
        run_cli([*argv, "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "-1"], r"--seed must lie in \[0, 2\^32 - 1\], got -1"),
        (["--seed", str(2**32 - 1), "--repeats", "2"], r"and --seed \+ 1 for the repeats"),
        (["--device", "mps"], "--device mps: mps is not available here"),
        (["--device", "meta"], "--device meta: meta is not available here"),
    ],
)
def test_bench_seed_and_device(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        run_cli(["bench", *TINY, *argv, "--out", str(tmp_path / "out")])


def test_a_diverging_run_is_one_error_line(tmp_path: Path) -> None:
    argv = ["bench", *TINY, "--losses", "nsl", "--lr", "1e30"]
    with pytest.raises(SystemExit, match="NSL: the model's embeddings became NaN, Inf or too"):
        run_cli([*argv, "--out", str(tmp_path / "out")])


def test_a_scale_whose_logits_overflow_is_refused_before_training(tmp_path: Path) -> None:
    argv = ["bench", *TINY, "--losses", "nsl", "--loss-arg", "nsl.scale=1e38"]
    with pytest.raises(SystemExit, match=r"nsl: scale must be at most 1e\+15"):
        run_cli([*argv, "--out", str(tmp_path / "out")])


def test_sphere_and_ablate_check_their_output_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="is a file"):
        run_cli(["sphere", "--out", str(blocker / "sub" / "x.png")])
    with pytest.raises(SystemExit, match=r"--seed must lie in \[0, 2\^32 - 1\]"):
        run_cli(["sphere", "--seed", "-1", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="--device xpu: xpu is not available here"):
        run_cli(["sphere", "--device", "xpu", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="exists and is not a folder"):
        run_cli(["ablate", "--out", str(blocker)])
    with pytest.raises(SystemExit, match="is a file"):
        run_cli(["ablate", "--out", str(blocker / "sub")])


def test_a_malformed_cub_index_file_is_named(fake_cub: Path, tmp_path: Path) -> None:
    labels = fake_cub / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace(" 101\n", " abc\n", 1))
    argv = ["bench", "--dataset", "cub", "--data-root", str(fake_cub), *CUB]
    with pytest.raises(
        SystemExit, match=r"image_class_labels.txt line \d+: '\d+ abc' does not read as"
    ):
        run_cli([*argv, "--out", str(tmp_path / "out")])


def test_a_failed_download_is_one_line_and_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytorch_metric_learning import datasets

    def offline(root: str, **_: object) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)  # as PML does before it fetches
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(datasets, "CUB", offline)
    root = tmp_path / "dl"
    argv = ["bench", "--dataset", "cub", "--data-root", str(root), "--download", *CUB]
    with pytest.raises(SystemExit, match=r"CUB download into .*dl failed: .*no network"):
        run_cli([*argv, "--out", str(tmp_path / "out")])
    assert not root.exists()


def test_an_unreadable_test_image_is_one_error_line(fake_cub: Path, tmp_path: Path) -> None:
    image = fake_cub / "CUB_200_2011" / "images" / "101.Bird_101" / "Bird_101_0.jpg"
    image.write_bytes(b"not a jpeg")
    argv = ["bench", "--dataset", "cub", "--data-root", str(fake_cub), *CUB]
    with pytest.raises(SystemExit, match=r"Bird_101_0\.jpg"):
        run_cli([*argv, "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_test_image_truncated_in_its_header_is_named_and_leaves_no_folder(
    fake_cub: Path, tmp_path: Path, workers: str
) -> None:
    """Pillow fails in PML's Image.open, before the transform: the file is still named
    (found by review); the run fails before training (the headers are read first), and
    its empty folders go with it."""
    image = fake_cub / "CUB_200_2011" / "images" / "101.Bird_101" / "Bird_101_1.jpg"
    image.write_bytes(image.read_bytes()[:100])
    argv = ["bench", "--dataset", "cub", "--data-root", str(fake_cub), *CUB, "--epochs", "1"]
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"Bird_101_1\.jpg: Truncated File Read"):
        run_cli([*argv, "--losses", "arcface", "--num-workers", workers, "--out", str(out)])
    assert not out.exists()


def test_the_small_cnn_standing_in_for_a_backbone_is_what_the_checkpoint_records(
    fake_cub: Path, tmp_path: Path
) -> None:
    """Without timm/torchvision the small CNN stands in for resnet50; re-evaluating the
    checkpoint once they are installed must rebuild the small CNN, not a resnet50."""
    pytest.importorskip("PIL")
    if any(__import__("importlib").util.find_spec(m) for m in ("timm", "torchvision")):
        pytest.skip("timm or torchvision is installed: no stand-in")
    argv = ["bench", "--dataset", "cub", "--data-root", str(fake_cub), *CUB]
    argv[argv.index("small-cnn")] = "resnet50"
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="using the small CNN"):
        assert run_cli([*argv, "--out", str(out)]) == 0
    saved = torch.load(out / "checkpoints" / "nsl.pt", weights_only=True)
    assert saved["model_config"]["kind"] == "small-cnn"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-classes", "1", "--max-classes must be >= 4"),
        ("--max-classes", "3", "--max-classes must be >= 4"),
        ("--min-fonts", "1", "--min-fonts must be >= 2"),
        ("--image-size", "4", "--image-size must be a multiple of 16"),
    ],
)
def test_glyph_settings_are_named_by_their_flags(tmp_path: Path, flag, value, message) -> None:
    with pytest.raises(SystemExit, match=message):
        run_cli(["bench", "--dataset", "glyphs", flag, value, "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("command", ["bench", "ablate"])
def test_thread_counts_are_bounded_before_any_work(tmp_path: Path, command: str) -> None:
    """A million threads ran out of memory with a traceback (found by review)."""
    out = tmp_path / "out"
    for value in ("0", "1025", "1000000"):
        with pytest.raises(
            SystemExit, match=rf"--threads must be an integer in \[1, 1024\], got {value}$"
        ):
            run_cli([command, "--threads", value, "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("command", ["bench", "sphere"])
def test_batch_size_one_with_batchnorm_is_one_line(tmp_path: Path, command: str) -> None:
    """The digits MLP's BatchNorm1d cannot train on one row: torch's message (bench, not
    naming the flag) or a traceback (sphere) before; now one line naming --batch-size."""
    argv = [command, "--batch-size", "1", "--epochs", "1", "--losses", "arcface"]
    argv += ["--dataset", "digits"] if command == "bench" else ["--dims", "2"]
    out = tmp_path / ("out" if command == "bench" else "s.png")
    with pytest.raises(SystemExit, match=r"--batch-size 1 cannot train this model"):
        run_cli([*argv, "--no-progress", "--out", str(out)])


def test_a_model_that_diverged_at_its_last_step_is_one_line() -> None:
    """Training checks each step's embeddings before the optimizer step; a model that the
    last step made NaN reached the evaluation, whose ValueError was a traceback."""
    import argparse
    import types

    from pml_margins.bench.cli_bench import _embed_test_set

    class Diverged(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 4), float("nan"))

    test = torch.utils.data.TensorDataset(torch.zeros(6, 3), torch.arange(6) % 2)
    args = argparse.Namespace(device="cpu", amp=None, num_workers=0, no_progress=True)
    with pytest.raises(SystemExit, match=r"ArcFace: the model's test embeddings are NaN"):
        _embed_test_set(Diverged(), types.SimpleNamespace(test=test), args, "ArcFace", None)


def test_embedding_a_dataset_without_a_length() -> None:
    """The progress bar's total must not need ``len(dataset)`` (an IterableDataset)."""
    from pml_margins.bench import train

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.ones(3), 0), (torch.zeros(3), 1)] * 5)

    emb, labels = train.embed(torch.nn.Linear(3, 2), Stream(), batch_size=4, progress=True)
    assert emb.shape == (10, 2) and labels.tolist() == [0, 1] * 5


def test_an_unreadable_test_image_stops_the_run_before_any_training(
    fake_cub: Path, tmp_path: Path, monkeypatch
) -> None:
    """Found while embedding the test split, a corrupt image cost the whole training run
    (review): every listed image's header is read when the dataset loads."""
    from pml_margins.bench import train

    def no_training(*_args, **_kwargs):
        raise AssertionError("trained before the corrupt image was found")

    monkeypatch.setattr(train, "train_embedding", no_training)
    images = fake_cub / "CUB_200_2011" / "images"
    (images / "101.Bird_101" / "Bird_101_0.jpg").write_bytes(b"not a jpeg")
    (images / "102.Bird_102" / "Bird_102_0.jpg").write_bytes(b"nor this")
    argv = ["bench", "--dataset", "cub", "--data-root", str(fake_cub), *CUB, "--epochs", "1"]
    with pytest.raises(SystemExit, match=r"Bird_101_0\.jpg: .*Bird_102_0\.jpg: .*\(2 of 14"):
        run_cli([*argv, "--losses", "arcface", "--out", str(tmp_path / "out")])


def test_a_jpeg_cut_short_with_its_header_whole_stops_the_run_before_training(
    fake_cub: Path, tmp_path: Path, monkeypatch
) -> None:
    """An interrupted download keeps the header: the header check passed and training ran
    (review); a JPEG without its end marker is now decoded in full first."""
    from pml_margins.bench import train

    monkeypatch.setattr(train, "train_embedding", _no_training)
    import numpy as np
    from PIL import Image

    image = fake_cub / "CUB_200_2011" / "images" / "101.Bird_101" / "Bird_101_1.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image)  # ~3 KB: the header is the first ~600 bytes
    data = image.read_bytes()
    image.write_bytes(data[: 2 * len(data) // 3])
    with Image.open(image):  # the header alone reads fine
        pass
    argv = ["bench", "--dataset", "cub", "--data-root", str(fake_cub), *CUB, "--epochs", "1"]
    with pytest.raises(SystemExit, match=r"Bird_101_1\.jpg: image file is truncated"):
        run_cli([*argv, "--losses", "arcface", "--out", str(tmp_path / "out")])


def _no_training(*_args, **_kwargs):
    raise AssertionError("trained before the corrupt image was found")


def test_image_headers_accept_whole_files_of_other_formats(tmp_path: Path) -> None:
    from PIL import Image

    from pml_margins.bench.data import check_image_headers

    paths = []
    for mode, name in (("RGB", "a.jpg"), ("L", "b.png"), ("CMYK", "c.jpg"), ("P", "d.gif")):
        path = tmp_path / name
        Image.new(mode, (5, 3)).save(path)
        paths.append(str(path))
    tail = tmp_path / "e.jpg"  # 2 KB after the end marker: decoded in full, and fine
    Image.new("RGB", (5, 3)).save(tail)
    tail.write_bytes(tail.read_bytes() + b"\0" * 2048)
    check_image_headers([*paths, str(tail)])


def test_a_reevaluation_reads_no_training_image_but_the_first(fake_cub: Path) -> None:
    """--embeddings-only reads the test split (and one training image for the shapes):
    a bad training image elsewhere must not stop it (review: it did)."""
    import argparse

    from pml_margins.bench import datasets

    bad = fake_cub / "CUB_200_2011" / "images" / "002.Bird_2" / "Bird_2_1.jpg"
    bad.write_bytes(b"junk")
    args = argparse.Namespace(data_root=str(fake_cub), download=False, image_size=16)
    data = datasets.load_dataset("cub", argparse.Namespace(**vars(args), embeddings_only=True))
    assert len(data.test) > 0
    with pytest.raises(ValueError, match=r"Bird_2_1\.jpg: cannot identify image file"):
        datasets.load_dataset("cub", argparse.Namespace(**vars(args), embeddings_only=False))


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        (
            "/data/train_classes/x.jpg is missing; train_classes must be >= 2",
            "/data/train_classes/x.jpg is missing; --train-classes must be >= 2",
        ),
        (
            r"C:\data\train_classes\x.jpg is missing (train_classes)",
            r"C:\data\train_classes\x.jpg is missing (--train-classes)",
        ),
    ],
    ids=["posix", "windows"],
)
def test_loader_names_in_messages_become_flags_but_paths_stay(
    monkeypatch, message: str, shown: str
) -> None:
    import argparse

    from pml_margins.bench import cli_bench, datasets

    def fail(*_args):
        raise ValueError(message)

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(SystemExit) as err:
        cli_bench._load_data(argparse.Namespace(dataset="cub"))
    assert str(err.value) == f"error: {shown}"


def test_embedding_a_chain_dataset() -> None:
    """torch's ChainDataset has a __len__ that raises: no total, no error."""
    from pml_margins.bench import train

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.ones(3), 0), (torch.zeros(3), 1)] * 2)

    chained = torch.utils.data.ChainDataset([Stream(), Stream()])
    for progress in (False, True):
        emb, _ = train.embed(torch.nn.Linear(3, 2), chained, batch_size=3, progress=progress)
        assert emb.shape == (8, 2)


def test_end_markers_are_the_last_bytes(tmp_path: Path) -> None:
    """An EOI anywhere in the last kilobyte passed for a whole file (an EXIF thumbnail
    holds one of its own); MPO (a JPEG with more pictures) was not checked (review)."""
    import io

    import numpy as np
    from PIL import Image

    from pml_margins.bench.data import _has_end_marker, check_image_headers

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    whole = buffer.getvalue()
    cases = {
        "whole.jpg": (whole, True),
        "padded.jpg": (whole + b"\0" * 100, True),
        "filled.jpg": (whole + b"\xff" * 16 + b"\r\n", True),
        "inner-eoi.jpg": (whole[:-600] + b"\xff\xd9" + whole[-600:-300], False),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert _has_end_marker(str(tmp_path / name), "JPEG") is expected, name
    png = tmp_path / "a.png"
    Image.fromarray(noise).save(png)
    assert _has_end_marker(str(png), "PNG")
    png.write_bytes(png.read_bytes()[:-3])
    assert not _has_end_marker(str(png), "PNG")
    mpo = tmp_path / "two.jpg"
    frames = [Image.fromarray(noise), Image.fromarray(255 - noise)]
    frames[0].save(mpo, format="MPO", save_all=True, append_images=frames[1:])
    with Image.open(mpo) as image:
        assert image.format == "MPO"
    check_image_headers([str(mpo)])
    cut = mpo.read_bytes()
    mpo.write_bytes(cut[: len(cut) // 4])
    with pytest.raises(ValueError, match=r"two\.jpg: image file is truncated"):
        check_image_headers([str(mpo)])


def test_checked_splits_take_a_name_or_names(fake_cub: Path) -> None:
    from pml_margins.bench.data import load_image_dataset

    bad = fake_cub / "CUB_200_2011" / "images" / "002.Bird_2" / "Bird_2_1.jpg"
    bad.write_bytes(b"junk")
    for checked in ("test", ["test"], ("test",)):
        assert len(load_image_dataset("cub", fake_cub, image_size=8, checked_splits=checked).test)
    with pytest.raises(ValueError, match="checked_splits must name 'train' and/or 'test'"):
        load_image_dataset("cub", fake_cub, image_size=8, checked_splits=("validation",))


def test_a_path_pillow_quotes_as_its_repr_is_shown_once(tmp_path: Path) -> None:
    """Pillow names the file by its repr (backslashes doubled): it was shown twice."""
    from pml_margins.bench.data import check_image_headers

    bad = tmp_path / "C:\\data\\x.jpg"  # (a backslash in a POSIX file name)
    bad.write_bytes(b"junk")
    with pytest.raises(ValueError) as err:
        check_image_headers([str(bad)])
    assert str(err.value) == f"cannot read image {bad}: cannot identify image file (1 of 1 images)"


@pytest.mark.parametrize(
    "failure",
    [
        zipfile.BadZipFile("File is not a zip file"),
        tarfile.ReadError("not a gzip file"),
        EOFError("Compressed file ended before the end-of-stream marker was reached"),
        zlib.error("Error -3 while decompressing data: invalid distance too far back"),
        ConnectionResetError("connection reset"),
    ],
    ids=["html-page", "not-gzip", "cut-off", "corrupt-deflate", "reset"],
)
def test_a_failed_download_of_any_kind_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    """An HTML page or a cut-off archive was a traceback (status 1); a partial archive
    stayed in --data-root, so the next --download was skipped (root not empty) and the
    error told the user to pass --download."""
    from pytorch_metric_learning import datasets

    def broken(root: str, **_: object) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "CUB_200_2011.tgz").write_bytes(b"<html>partial")
        raise failure

    monkeypatch.setattr(datasets, "CUB", broken)
    for root in (tmp_path / "new", tmp_path / "empty"):
        if root.name == "empty":
            root.mkdir()
        argv = ["bench", "--dataset", "cub", "--data-root", str(root), "--download", *CUB]
        with pytest.raises(SystemExit, match=r"CUB download into .* failed: "):
            run_cli([*argv, "--out", str(tmp_path / "out")])
        assert not root.exists() or not list(root.iterdir())


def test_a_test_split_without_any_pair_is_refused(fake_sop: Path, tmp_path: Path) -> None:
    """Every test class with one image: the run exited 0 with all-empty metrics."""
    listing = fake_sop / "Stanford_Online_Products" / "Ebay_test.txt"
    lines = listing.read_text().splitlines()
    seen, kept = set(), [lines[0]]
    for line in lines[1:]:
        if line.split()[1] not in seen:
            seen.add(line.split()[1])
            kept.append(line)
    listing.write_text("\n".join(kept) + "\n")
    argv = ["bench", "--dataset", "sop", "--data-root", str(fake_sop), *CUB]
    with pytest.raises(SystemExit, match="no test class has two images"):
        run_cli([*argv, "--out", str(tmp_path / "out")])


def test_sixteen_bit_grayscale_images_keep_their_values(tmp_path: Path) -> None:
    """Pillow's RGB conversion clipped a 0-65535 ramp at 255 (98 % white)."""
    import numpy as np
    from PIL import Image

    from pml_margins.bench.data import ImageToTensor

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "r16.png")
    Image.fromarray(np.round(ramp / 257).astype(np.uint8)).save(tmp_path / "r8.png")
    wide = ImageToTensor(8)(Image.open(tmp_path / "r16.png"))
    narrow = ImageToTensor(8)(Image.open(tmp_path / "r8.png"))
    torch.testing.assert_close(wide, narrow)
    with pytest.raises(ValueError, match="mode F has no fixed range"):
        ImageToTensor(8)(Image.fromarray(np.zeros((4, 4), dtype=np.float32)))


def test_an_interrupted_download_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C left the partial archive: the next --download was skipped."""
    from pytorch_metric_learning import datasets

    from pml_margins.bench.data import load_image_dataset

    def interrupted(root: str, **_: object) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "CUB_200_2011.tgz").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "CUB", interrupted)
    root = tmp_path / "dl"
    with pytest.raises(KeyboardInterrupt):
        load_image_dataset("cub", root, download=True)
    assert not root.exists()


def test_a_worker_error_line_reads_as_without_workers() -> None:
    """With --num-workers 2 a corrupt image's line kept the worker's "ValueError: "
    prefix, which the same error without workers has not."""
    from pml_margins.bench.cli_bench import one_line

    wrapped = RuntimeError(
        "Caught ValueError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "data.py", line 1, in __getitem__\n'
        "ValueError: cannot read image a.jpg: broken data stream"
    )
    assert one_line(wrapped) == "cannot read image a.jpg: broken data stream"
    assert one_line(ValueError("cannot read image a.jpg: x")) == "cannot read image a.jpg: x"
    odd = RuntimeError("Caught KeyError in DataLoader worker process 1.\nTraceback\nKeyError: 3")
    assert one_line(odd) == "3"


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_a_terminated_run_cleans_up_as_an_interrupted_one(tmp_path: Path) -> None:
    """``SIGTERM`` (``timeout``, ``kill``, a batch scheduler) ended ``bench`` without its
    clean-up: the staged ``.checkpoints-*`` folder stayed in ``--out`` (6 checkpoints
    after a killed default run). It now ends as Ctrl-C does, leaving nothing."""
    out = tmp_path / "out"
    argv = [*TINY, "--epochs", "1000", "--losses", "nsl", "--out", str(out)]
    command = [sys.executable, "-m", "pml_margins", "bench", *argv]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".checkpoints-*")):  # training has started
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never staged its checkpoints"
            time.sleep(0.05)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.wait()
    assert not out.exists()  # nor an empty --out of its own


def test_terminate_cleanly_restores_the_handler_and_skips_other_threads() -> None:
    from pml_margins.cli import _terminate_cleanly

    before = signal.getsignal(signal.SIGTERM)
    with _terminate_cleanly():
        assert signal.getsignal(signal.SIGTERM) is not before
        with pytest.raises(SystemExit) as stop:
            signal.raise_signal(signal.SIGTERM)
        assert stop.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_enter_in_thread(_terminate_cleanly)))
    thread.start()
    thread.join()
    assert seen == [True]


def _enter_in_thread(manager) -> bool:
    with manager():  # signal.signal would raise ValueError outside the main thread
        return True


@pytest.mark.parametrize(("split", "keep"), [("train", 1), ("test", 1)])
def test_a_split_with_one_class_is_refused(
    fake_sop: Path, tmp_path: Path, split: str, keep: int
) -> None:
    """One training class gives every softmax loss 0 (nothing trains), one retrieved class
    every metric 1.0: the run exited 0 with a table of those (found by review)."""
    listing = fake_sop / "Stanford_Online_Products" / f"Ebay_{split}.txt"
    lines = listing.read_text().splitlines()
    first = lines[1].split()[1]
    listing.write_text(
        "\n".join([lines[0]] + [x for x in lines[1:] if x.split()[1] == first]) + "\n"
    )
    argv = ["bench", "--dataset", "sop", "--data-root", str(fake_sop), *CUB]
    with pytest.raises(SystemExit, match=f"has one {split} class: the split needs two"):
        run_cli([*argv, "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("classes", ["3", "0", "0,1,2,3,4,5,6,7,8"])
def test_a_digit_split_with_one_class_on_a_side_is_refused(tmp_path: Path, classes: str) -> None:
    """``--train-classes 0`` trained nothing (every softmax loss 0) and 0..8 left one digit
    to retrieve (every metric 1.0); both exited 0."""
    argv = ["bench", "--dataset", "digits", "--train-classes", classes, "--epochs", "1"]
    with pytest.raises(SystemExit, match="--train-classes must be 2 to 8 of the digits"):
        run_cli([*argv, "--out", str(tmp_path / "out")])


def test_a_glyph_set_with_fewer_than_four_characters_is_refused(monkeypatch) -> None:
    """Three characters split into two training and one retrieved class (every metric
    1.0): refused, naming the count and the setting to change."""
    from pml_margins.bench import glyphs

    real = glyphs.build_glyph_set
    monkeypatch.setattr(
        glyphs, "build_glyph_set", lambda **kwargs: real(characters="ABC", **kwargs)
    )
    with pytest.raises(ValueError, match="only 3 characters are drawn by at least 2 fonts"):
        glyphs.load_glyph_split(size=16, min_fonts=2)


def test_an_unknown_loss_arg_of_a_loss_class_names_the_key_and_the_class() -> None:
    """It called the dataset's own default a bad hyper-parameter and named PML's
    ``ModuleWithRecords.__init__`` (found by review)."""
    from pml_margins.bench.registry import build_loss

    with pytest.raises(ValueError) as caught:
        build_loss("arcface", 10, 8, scale=30.0, foo=1)
    assert str(caught.value) == (
        "loss 'arcface' (ArcFaceLoss) has no hyper-parameter foo; it takes margin, scale, "
        "easy_margin and the keyword options of its base class"
    )


def test_an_unreadable_checkpoint_names_the_unpicklers_reason(
    tmp_path: Path,
) -> None:
    from pml_margins.bench.cli_bench import _read_checkpoint

    garbage = tmp_path / "bad.pt"
    garbage.write_text("garbage\n")
    with pytest.raises(SystemExit, match=r"failed \(Unsupported operand 103\): not a torch"):
        _read_checkpoint(str(garbage))

    import argparse  # (an object weights_only does not load)

    torch.save({"a": argparse.Namespace(b=1)}, tmp_path / "object.pt")
    with pytest.raises(SystemExit, match=r"failed \(Unsupported global: GLOBAL argparse"):
        _read_checkpoint(str(tmp_path / "object.pt"))
