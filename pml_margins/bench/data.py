"""Benchmark data: the bundled digits and CUB-200-2011 / Stanford Online Products.

The glyph set (the default) is built in :mod:`pml_margins.bench.glyphs`; the
registry of all datasets is :mod:`pml_margins.bench.datasets`.

Every dataset comes as a :class:`RetrievalData`: a training set whose labels are
remapped to ``0..C-1`` (class-weight losses index ``W`` with them) and a test set
of *other* classes (open-set retrieval, the protocol of the CUB/SOP papers).

CUB and SOP are read through PML's ``datasets.CUB`` and
``datasets.StanfordOnlineProducts`` with the class-disjoint splits of the
metric-learning papers (CUB: classes 1-100 train, 101-200 test, PML's split, not the
image-level ``train_test_split.txt`` of CUB's archive; SOP: its official
``Ebay_train.txt`` / ``Ebay_test.txt``). The folder is checked first, so that a missing
or incomplete copy fails with a message naming the files expected.
"""

from __future__ import annotations

import math
import os
import shutil
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from pml_margins.terminal import bars_reach_a_terminal

__all__ = [
    "DATASET_LAYOUTS",
    "DatasetFolderError",
    "ImageToTensor",
    "RemapLabels",
    "RetrievalData",
    "check_dataset_folder",
    "check_image_headers",
    "load_digits_all_classes",
    "load_digits_split",
    "load_image_dataset",
]


@dataclass
class RetrievalData:
    """A class-disjoint train/test pair.

    Attributes:
        name: ``"digits"``, ``"cub"`` or ``"sop"``.
        train: dataset of ``(input, label)`` with labels in ``0..num_train_classes-1``.
        test: dataset of ``(input, label)``; its classes never occur in ``train``.
        num_train_classes: number of training classes ``C`` (the width of ``W``).
        input_shape: shape of one input tensor (``(1, 8, 8)`` for the digits).
        info: what ``results.json`` records about the data besides the counts
            (e.g. the glyph set's fonts and characters).
        recall_ks: the Recall@K cut-offs, filled in from the dataset registry
            (:mod:`pml_margins.bench.datasets`).
    """

    name: str
    train: Dataset
    test: Dataset
    num_train_classes: int
    input_shape: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)
    recall_ks: tuple[int, ...] = ()


# --- digits -----------------------------------------------------------------------


def load_digits_split(
    train_classes: Sequence[int] = (0, 1, 2, 3, 4),
) -> RetrievalData:
    """scikit-learn's bundled 8x8 handwritten digits (1797 real images), split by class.

    Training uses the images of ``train_classes`` (labels remapped to ``0..C-1``);
    retrieval is evaluated on the images of the remaining digits, which the model
    never sees. Pixels are scaled from ``0..16`` to ``0..1``. No download, no
    randomness: the split is fixed by ``train_classes``.

    Raises:
        ValueError: ``train_classes`` with duplicates or outside 0-9, fewer than two of
            them or fewer than two left to retrieve (one training class gives every
            softmax loss 0, one retrieved class every metric 1).
    """
    from sklearn.datasets import load_digits

    train_set = sorted({int(c) for c in train_classes})
    if len(train_set) != len(train_classes) or not train_set:
        raise ValueError(f"train_classes must be distinct digits, got {list(train_classes)}")
    if train_set[0] < 0 or train_set[-1] > 9 or not 2 <= len(train_set) <= 8:
        raise ValueError(
            f"train_classes must be 2 to 8 of the digits 0..9 (the rest, at least two, are "
            f"retrieved), got {train_set}"
        )
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    targets = torch.as_tensor(digits.target, dtype=torch.long)
    is_train = torch.isin(targets, torch.tensor(train_set))
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(train_set)] = torch.arange(len(train_set))
    return RetrievalData(
        name="digits",
        train=TensorDataset(images[is_train], remap[targets[is_train]]),
        test=TensorDataset(images[~is_train], targets[~is_train]),
        num_train_classes=len(train_set),
        input_shape=(1, 8, 8),
    )


def load_digits_all_classes(test_fraction: float = 0.3, seed: int = 0) -> RetrievalData:
    """All ten digits, a stratified random split of the images (closed set).

    Used by ``pml-margins sphere``: the figure shows how each loss arranges the
    classes it was trained on, plotted for images held out from training.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    targets = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(targets)), test_size=test_fraction, random_state=seed, stratify=targets
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return RetrievalData(
        name="digits-all",
        train=TensorDataset(images[train_idx], targets[train_idx]),
        test=TensorDataset(images[test_idx], targets[test_idx]),
        num_train_classes=10,
        input_shape=(1, 8, 8),
    )


# --- CUB / SOP ----------------------------------------------------------------------

#: how each set's train/test split is drawn, for the messages
_SPLIT_RULE = {
    "cub": "the metric-learning split, PML's: classes 1-100 train, 101-200 test",
    "sop": "Ebay_train.txt / Ebay_test.txt",
}


class DatasetFolderError(FileNotFoundError):
    """A CUB/SOP folder is missing or incomplete; the message names the expected files."""


#: CUB's class ids (the metric-learning split, PML's: 1-100 train, 101-200 test)
CUB_CLASSES = range(1, 201)
#: the first line of SOP's index files, which PML skips
SOP_HEADER = ("image_id", "class_id", "super_class_id", "path")


def _index_lines(folder: str, name: str, header: bool = False) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of every line of an index file; a blank line is an
    error, and so is a byte-order mark unless the first line is a ``header`` (PML's
    readers take every line as it is, but SOP's header, which they skip: they fail on
    it, or misread it)."""
    path = os.path.join(folder, name)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(number, line.split()) for number, line in enumerate(f, 1)]
    except UnicodeDecodeError as err:  # its offset counts from the reader's chunk: the line
        raise ValueError(f"{path} is not UTF-8 text ({_first_undecodable(path, err)})") from None
    if lines and lines[0][1] and lines[0][1][0].startswith("\ufeff"):
        if not header:
            raise ValueError(f"{path} starts with a byte-order mark (BOM): save it without one")
        lines[0][1][0] = lines[0][1][0].removeprefix("\ufeff")
    for number, fields in lines:
        if not fields:
            raise ValueError(f"{path} line {number} is blank: remove it")
    return lines


def _first_undecodable(path: str, err: UnicodeDecodeError) -> str:
    """Where the first byte that is not UTF-8 lies: ``line N: <reason>``."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as line_err:
                return f"line {number}: {line_err.reason}"
    return err.reason


def _ints(path: str, number: int, fields: list[str], columns: str, ints: int) -> list[int]:
    """The first ``ints`` of a line's fields as ints, after checking that it has as many
    fields as ``columns`` names (``"<a> <b> ..."``)."""
    count = len(columns.split())
    if len(fields) != count:
        raise ValueError(
            f"{path} line {number} has {len(fields)} fields, expected {count} ({columns})"
        )
    try:
        return [int(v) for v in fields[:ints]]
    except ValueError:
        raise ValueError(
            f"{path} line {number}: {' '.join(fields)!r} does not read as {columns}"
        ) from None


def _cub_images(folder: str) -> list[str]:
    """Image paths (relative to ``folder``) that CUB's ``images.txt`` lists, after checking
    the official protocol: ``images.txt`` (``id path``) and ``image_class_labels.txt``
    (``id class``) list the same images line by line (PML pairs them so, and drops a pair
    whose ids differ), with class ids in 1-200 (PML's split: 1-100 train, 101-200 test),
    each image listed once."""
    images, labels = (os.path.join(folder, f) for f in ("images.txt", "image_class_labels.txt"))
    listed = _index_lines(folder, "images.txt")
    classes = _index_lines(folder, "image_class_labels.txt")
    if len(listed) != len(classes):
        raise ValueError(
            f"{images} lists {len(listed)} images but {labels} labels {len(classes)} "
            "(PML pairs them line by line)"
        )
    paths, ids = [], []
    for (number, fields), (_, label_fields) in zip(listed, classes, strict=True):
        (image_id,) = _ints(images, number, fields, "<image_id> <path>", 1)
        ids.append(image_id)
        label_id, class_id = _ints(labels, number, label_fields, "<image_id> <class_id>", 2)
        if label_id != image_id:
            raise ValueError(
                f"line {number} of {images} is image {image_id} but that of {labels} is image "
                f"{label_id}: list the images in the same order (PML pairs them line by line)"
            )
        if class_id not in CUB_CLASSES:
            raise ValueError(
                f"{labels} line {number}: class {class_id} is outside CUB's 1-200 (the "
                "metric-learning split, PML's: classes 1-100 train, 101-200 test)"
            )
        paths.append(os.path.join("images", fields[1]))
    _check_listed_once(paths, ids, f"images.txt of {folder}")
    return paths


def _first_few(values: Sequence[object], limit: int = 5) -> str:
    """The first ``limit`` of ``values``, comma-separated, and ``...`` if there are more."""
    return ", ".join(map(str, values[:limit])) + (" ..." if len(values) > limit else "")


def _check_once(values: list, what: str, where: str, fix: str) -> None:
    """``ValueError`` naming the values that occur more than once: a test image listed
    twice would find its own copy; an image id used twice is a damaged index (the
    official files number each image once)."""
    repeated = sorted(v for v, n in Counter(values).items() if n > 1)
    if repeated:
        raise ValueError(
            f"{len(repeated)} {what} more than once in {where} ({_first_few(repeated)}): {fix}"
        )


def _check_listed_once(paths: list[str], ids: list[int], where: str) -> None:
    """Each image listed once, under one id."""
    normalized = [os.path.normpath(p) for p in paths]
    _check_once(normalized, "images are listed", where, "list each image once")
    _check_once(ids, "image ids are used", where, "the official index numbers each image once")


def _sop_images(folder: str) -> list[str]:
    """Image paths (relative to ``folder``) that SOP's ``Ebay_{train,test}.txt`` list,
    after checking the official protocol: each file starts with the header (PML skips
    the first line), then ``image_id class_id super_class_id path``; no class in both, and
    no image listed twice (a test image listed twice would find its own copy)."""
    paths: list[str] = []
    ids: list[int] = []
    split_classes = []
    for split in ("train", "test"):
        name = f"Ebay_{split}.txt"
        path = os.path.join(folder, name)
        lines = _index_lines(folder, name, header=True)
        if not lines or tuple(lines[0][1]) != SOP_HEADER:
            raise ValueError(
                f"{path} does not start with the header line {' '.join(SOP_HEADER)!r} "
                "(PML skips the first line: without it, an image would be lost)"
            )
        columns = "<image_id> <class_id> <super_class_id> <path>"
        numbers = [_ints(path, n, fields, columns, 2) for n, fields in lines[1:]]
        ids += [image_id for image_id, _ in numbers]
        split_classes.append({class_id for _, class_id in numbers})
        paths += [fields[3] for _, fields in lines[1:]]
    _check_listed_once(paths, ids, f"Ebay_train.txt and Ebay_test.txt of {folder}")
    shared = sorted(split_classes[0] & split_classes[1])
    if shared:
        raise ValueError(
            f"{len(shared)} classes are in both Ebay_train.txt and Ebay_test.txt of {folder} "
            f"({_first_few(shared)}): the test classes must be unseen in training"
        )
    return paths


@dataclass(frozen=True)
class _Layout:
    subdir: str
    index_files: tuple[str, ...]
    what: str
    list_images: Callable[[str], list[str]]
    pml_class: str  # the class in pytorch_metric_learning.datasets


#: What PML's dataset classes read, relative to ``--data-root``.
DATASET_LAYOUTS: dict[str, _Layout] = {
    "cub": _Layout(
        subdir="CUB_200_2011",
        index_files=("images.txt", "image_class_labels.txt"),
        what="images/<class folder>/<name>.jpg, listed in images.txt",
        list_images=_cub_images,
        pml_class="CUB",
    ),
    "sop": _Layout(
        subdir="Stanford_Online_Products",
        index_files=("Ebay_train.txt", "Ebay_test.txt"),
        what="<category>_final/<name>.JPG, listed in Ebay_train.txt / Ebay_test.txt",
        list_images=_sop_images,
        pml_class="StanfordOnlineProducts",
    ),
}


def check_dataset_folder(name: str, root: str | os.PathLike[str], max_listed: int = 5) -> None:
    """Check that ``root`` holds the files PML's ``CUB`` / ``StanfordOnlineProducts`` read.

    Raises:
        ValueError: unknown ``name``.
        DatasetFolderError: the folder, an index file, or listed images are missing;
            the message names the expected layout and up to ``max_listed`` missing files.
    """
    if name not in DATASET_LAYOUTS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASET_LAYOUTS)}")
    layout = DATASET_LAYOUTS[name]
    folder = os.path.join(os.fspath(root), layout.subdir)
    expected = ", ".join(os.path.join(folder, f) for f in layout.index_files)
    hint = (
        f"expected {expected} and {layout.what} (the layout of the official archive, "
        "unpacked into --data-root); pass --download to let PML fetch it (into a missing or "
        "empty --data-root)"
    )
    if not os.path.isdir(folder):
        raise DatasetFolderError(f"{name.upper()} folder {folder} not found: {hint}")
    missing_index = [f for f in layout.index_files if not os.path.isfile(os.path.join(folder, f))]
    if missing_index:
        raise DatasetFolderError(
            f"{name.upper()} folder {folder} is incomplete: missing {', '.join(missing_index)}; "
            + hint
        )
    try:
        listed = layout.list_images(folder)
    except ValueError as err:
        raise DatasetFolderError(
            f"{name.upper()} index files in {folder} are malformed: {err}"
        ) from None
    if not listed:
        raise DatasetFolderError(f"{name.upper()} index files in {folder} list no images; {hint}")
    missing = [p for p in listed if not os.path.isfile(os.path.join(folder, p))]
    if missing:
        raise DatasetFolderError(
            f"{name.upper()} folder {folder} is incomplete: {len(missing)} of {len(listed)} "
            f"listed images are missing ({_first_few(missing, max_listed)}); {hint}"
        )


def _eight_bit(image: Any) -> Any:
    """A 16-bit grayscale image (Pillow's ``I;16*`` modes, or ``I`` within 16 bits) as
    8-bit ``L``: Pillow's RGB conversion clips them at 255 (a 0-65535 ramp came out 98 %
    white). Other 32-bit modes (``I`` beyond 16 bits, ``F``) have no fixed range: refused."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" or values.min() < 0 or values.max() > 65535:
            name = getattr(image, "filename", "") or "an image"
            raise ValueError(
                f"cannot read image {name}: mode {image.mode} has no fixed range (not 8 or "
                "16 bits per channel); save it as an 8- or 16-bit image"
            )
        return Image.fromarray(np.round(values / 257.0).astype(np.uint8))  # mode L
    return image


class ImageToTensor:
    """PIL image -> RGB float tensor ``(3, size, size)``, ImageNet-normalized: the
    retrieval benchmarks' transforms (Musgrave et al., ECCV 2020, after Oh Song et al.,
    CVPR 2016).

    Evaluation (default): the shorter side resized to ``round(size * 256 / 224)`` and
    the centre ``size x size`` crop (``Resize(256)`` + ``CenterCrop(224)`` at 224). Training
    (``augment=True``): a random crop of 16-100 % of the image's area and aspect ratio
    3/4-4/3, resized to ``size x size``, mirrored with probability 1/2
    (``RandomResizedCrop(size, scale=(0.16, 1))`` + ``RandomHorizontalFlip``), drawn
    from torch's generator (seeded runs repeat; a DataLoader seeds its workers').

    Converting to RGB matters: CUB contains grayscale images, and one such image in
    a batch of RGB ones breaks collation. Needs only Pillow (no torchvision).
    """

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    crop_area = (0.16, 1.0)
    crop_ratio = (3 / 4, 4 / 3)

    def __init__(self, size: int = 224, augment: bool = False) -> None:
        if size < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        self.size, self.augment = size, bool(augment)

    def __call__(self, image: Any) -> torch.Tensor:
        name = getattr(image, "filename", "") or "an image"
        try:  # Pillow reads lazily: a truncated file fails here, not where it was opened
            image = _eight_bit(image)
            if image.mode == "La":  # (premultiplied alpha: Pillow converts it to LA only)
                image = image.convert("LA")
            image = image.convert("RGB")
            image = self._random_crop(image) if self.augment else self._centre_crop(image)
        except (OSError, SyntaxError) as err:
            raise ValueError(f"cannot read image {name}: {err}") from None
        except ValueError as err:  # a mode Pillow cannot convert to RGB (or _eight_bit's)
            if str(err).startswith("cannot read image"):
                raise
            raise ValueError(f"cannot read image {name}: {err}") from None
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return (tensor - self.mean) / self.std

    def _centre_crop(self, image: Any) -> Any:
        from PIL import Image

        width, height = image.size
        shorter = max(self.size, round(self.size * 256 / 224))
        scale = shorter / min(width, height)
        width, height = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        image = image.resize((width, height), Image.BILINEAR)
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def _random_crop(self, image: Any) -> Any:
        from PIL import Image

        width, height = image.size
        box = None
        for _ in range(10):  # torchvision's RandomResizedCrop: 10 tries, then the centre
            area = width * height * _uniform(*self.crop_area)
            ratio = math.exp(_uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, ()))
                top = int(torch.randint(0, height - h + 1, ()))
                box = (left, top, left + w, top + h)
                break
        if box is None:  # the whole image, cut to the nearest allowed aspect ratio
            low, high = self.crop_ratio
            w, h = width, height
            if width / height < low:
                h = min(height, round(width / low))
            elif width / height > high:
                w = min(width, round(height * high))
            left, top = (width - w) // 2, (height - h) // 2
            box = (left, top, left + w, top + h)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        if float(torch.rand(())) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, augment={self.augment})"


def _uniform(low: float, high: float) -> float:
    """A draw from ``U(low, high)`` on torch's generator."""
    return low + (high - low) * float(torch.rand(()))


class NamedImageErrors(torch.utils.data.Dataset):
    """A PML image dataset whose unreadable images raise a ValueError naming the file.

    PML's ``__getitem__`` opens each image before any transform (where
    :class:`ImageToTensor` names the file): a file truncated in its header fails there,
    with Pillow's message alone ("Truncated File Read"). Everything else (``labels``,
    ``paths``, ``target_transform``, ...) is the wrapped dataset's.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except unreadable_image_errors() as err:
            problem = _image_problem(self.dataset.paths[index], err)
            raise ValueError(f"cannot read image {problem}") from None

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class RemapLabels:
    """Maps the dataset's class ids to ``0..C-1`` in sorted order (picklable for workers)."""

    def __init__(self, labels: Sequence[int]) -> None:
        self.mapping = {label: i for i, label in enumerate(sorted(set(labels)))}

    def __call__(self, label: int) -> int:
        return self.mapping[label]

    def __len__(self) -> int:
        return len(self.mapping)


def _remove_download_leftovers(root: str, existed: bool) -> None:
    """Remove what a failed download put in ``root`` (missing or empty before it)."""
    if not os.path.isdir(root):
        return
    if not existed:
        shutil.rmtree(root, ignore_errors=True)
        return
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def load_image_dataset(
    name: str,
    root: str | os.PathLike[str],
    download: bool = False,
    image_size: int = 224,
    transform: Callable[[Any], torch.Tensor] | None = None,
    checked_splits: Sequence[str] | None = None,
    progress: bool = True,
    train_transform: Callable[[Any], torch.Tensor] | None = None,
) -> RetrievalData:
    """CUB-200-2011 or Stanford Online Products via PML's dataset classes.

    Args:
        name: ``"cub"`` or ``"sop"``.
        root: the folder holding ``CUB_200_2011/`` or ``Stanford_Online_Products/``.
        download: let PML download and unpack the archive (it does so only when
            ``root`` is missing or empty; no checksum is verified).
        image_size: side of the square RGB tensors (of the default transforms).
        transform: PIL image -> tensor of the test split (and of the training split if
            ``train_transform`` is not given); default :class:`ImageToTensor`'s evaluation
            transform (shorter side resized, centre crop).
        train_transform: that of the training split; default ``transform`` if given, else
            :class:`ImageToTensor` with ``augment=True`` (random resized crop and mirror).
        checked_splits: the splits whose images :func:`check_image_headers` reads first
            (default both; a re-evaluation reads only ``("test",)``).
        progress: that check's tqdm bar, on a terminal.

    Raises:
        DatasetFolderError: the folder is missing or incomplete (after any download).
    """
    from pytorch_metric_learning import datasets

    if name not in DATASET_LAYOUTS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASET_LAYOUTS)}")
    classes = {name: getattr(datasets, DATASET_LAYOUTS[name].pml_class)}
    root = os.fspath(root)
    folder = os.path.join(root, DATASET_LAYOUTS[name].subdir)
    empty = not os.path.isdir(root) or not os.listdir(root)
    if download and empty:
        existed = os.path.isdir(root)
        try:  # PML downloads inside the constructor, then reads the split files
            classes[name](root=root, split="train", download=True)
        except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error) as err:
            # offline, a refused connection, a full disk (URLError too), an HTML page or a
            # cut-off or corrupt archive: what this attempt left (root was missing or
            # empty) goes, or the next --download would find root not empty and skip it
            _remove_download_leftovers(root, existed)
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DatasetFolderError(
                f"{name.upper()} download into {root} failed: {reason}"
            ) from None
        except BaseException:  # Ctrl-C and anything else: the leftovers go too
            _remove_download_leftovers(root, existed)
            raise
    try:
        check_dataset_folder(name, root)
    except DatasetFolderError as err:
        if not (download and not empty):
            raise
        raise DatasetFolderError(  # (what a user passing --download would not guess)
            f"{err}. --download was skipped: {root} is not empty, and PML downloads into a "
            "missing or empty folder only (move what is there, or pass another --data-root)"
        ) from None
    test_transform = transform or ImageToTensor(image_size)
    train_transform = train_transform or transform or ImageToTensor(image_size, augment=True)
    try:
        train = classes[name](root=root, split="train", transform=train_transform)
        test = classes[name](root=root, split="test", transform=test_transform)
    except (ValueError, IndexError, KeyError) as err:  # a malformed line in an index file
        raise DatasetFolderError(
            f"{name.upper()} folder {folder}: cannot read its index files "
            f"({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    for split, data in (("train", train), ("test", test)):
        if not len(data):
            raise DatasetFolderError(
                f"{name.upper()} folder {folder} has "
                f"no {split} images (its index files list none of the {split} split: "
                f"{_SPLIT_RULE[name]})"
            )
    images_per_class = {
        split: np.unique(np.asarray(data.labels), return_counts=True)[1]
        for split, data in (("train", train), ("test", test))
    }
    for split, counts in images_per_class.items():
        if len(counts) < 2:
            raise DatasetFolderError(
                f"{name.upper()} folder {folder} has one {split} class: the split needs two "
                "at least (one training class gives every softmax loss 0, one retrieved "
                "class every metric 1)"
            )
    if images_per_class["test"].max() < 2:
        raise DatasetFolderError(
            f"{name.upper()} folder {folder}: no test class has two images, so no query has "
            "a relevant reference (every retrieval metric would be empty)"
        )
    splits = {"train": train, "test": test}
    checked = ("train", "test") if checked_splits is None else checked_splits
    checked = (checked,) if isinstance(checked, str) else tuple(checked)
    if not set(checked) <= set(splits):
        raise ValueError(f"checked_splits must name 'train' and/or 'test', got {checked_splits!r}")
    check_image_headers([p for split in checked for p in splits[split].paths], progress=progress)
    remap = RemapLabels(train.labels)
    train.target_transform = remap
    sample = test_transform(open_image(train.paths[0]))
    return RetrievalData(
        name=name,
        train=NamedImageErrors(train),
        test=NamedImageErrors(test),
        num_train_classes=len(remap),
        input_shape=tuple(sample.shape),
    )


def check_image_headers(paths: Sequence[str], max_listed: int = 3, progress: bool = True) -> None:
    """``ValueError`` naming the images Pillow cannot read, before any training (found
    while embedding the test split, such a file cost the whole training run).

    Each image's header is read (``Image.open``: not an image, a header cut short, an
    unsupported format), and a JPEG, MPO or PNG that does not end with its end marker
    (``FFD9``, the ``IEND`` chunk) -- a file cut short by an interrupted download or copy,
    or one with bytes after the marker -- is decoded in full, to tell one Pillow reads
    anyway from one it cannot. Corrupt data
    inside a complete file is found only when the image is read. About 40-60 us an image
    (SOP's 120k: a few seconds, more on a cold network disk); a tqdm bar on a terminal.
    """
    from PIL import Image

    bad = []
    quiet = not progress or not bars_reach_a_terminal()
    for path in tqdm(paths, desc="image headers", unit="image", leave=False, disable=quiet):
        try:
            with Image.open(path) as image:
                if not _has_end_marker(path, image.format):
                    image.load()  # cut short: decodable or not
        except unreadable_image_errors() as err:
            bad.append(_image_problem(path, err))
    if bad:
        listed = "; ".join(bad[:max_listed]) + ("; ..." if len(bad) > max_listed else "")
        raise ValueError(f"cannot read image {listed} ({len(bad)} of {len(paths)} images)")


#: the last bytes of a whole file, per format Pillow names (MPO: a JPEG with more
#: pictures after the first, which is all that is read): EOI; PNG's IEND chunk and its CRC
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


#: padding that encoders and copies leave after the end marker (zeros, JPEG's 0xFF fill,
#: a newline), stripped before the marker is looked for
_PADDING = b"\0\xff\r\n\t "


def _has_end_marker(path: str, image_format: str | None) -> bool:
    """Whether a JPEG/MPO/PNG file ends with its end marker, padding aside (other formats:
    ``True``, not checked). The last bytes, not any bytes near the end: an EXIF thumbnail
    holds an EOI of its own. (A vendor trailer after the marker: ``False``, and the file
    is decoded, ~1 ms.)"""
    marker = _END_MARKERS.get(image_format or "")
    if marker is None:
        return True
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 1024))
        return f.read().rstrip(_PADDING).endswith(marker)


def unreadable_image_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot read: not an image, truncated or
    unsupported (``OSError``, ``SyntaxError``), or too many pixels to decode
    (``DecompressionBombError``)."""
    from PIL import Image

    return (OSError, SyntaxError, Image.DecompressionBombError)


def open_image(path: str) -> Any:
    """The image at ``path``, loaded; ``ValueError`` naming the file when Pillow cannot
    read it (not an image, truncated, unsupported)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except unreadable_image_errors() as err:
        raise ValueError(f"cannot read image {_image_problem(path, err)}") from None


def _image_problem(path: str, err: BaseException) -> str:
    """``"<path>: <Pillow's reason>"``, the path shown once (Pillow's message may quote
    it, as its repr or in quotes)."""
    reason = str(err)
    for quoted in (f" {path!r}", f" '{path}'", f' "{path}"', str(path)):
        reason = reason.replace(quoted, "")
    return f"{path}: {reason.strip(' :')}"
