"""The dataset registry: name -> how to load it, its Recall@K cut-offs, model and settings.

``pml-margins bench --dataset NAME`` takes its choices from :data:`DATASETS`;
adding a dataset is one :class:`DatasetSpec` entry (a loader and a model builder)
and touches no other module.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from pml_margins.bench.data import RetrievalData

__all__ = ["DATASETS", "DEFAULT_DATASET", "DatasetSpec", "load_dataset", "loss_overrides"]


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark dataset.

    Attributes:
        name: the ``--dataset`` name.
        summary: one line for ``--help``.
        load: ``load(args) -> RetrievalData`` (``args``: the parsed command line).
        model: ``model(data, embedding_size, args) -> model config`` for
            :func:`pml_margins.bench.models.build_model`.
        recall_ks: the Recall@K cut-offs reported.
        defaults: ``epochs``, ``embedding_size``, ``batch_size``, ``lr``, ``repeats``,
            ``threads`` (``None``: torch's default) and ``shift`` (random translation
            of training images, pixels), used where the command line gives none.
        pixel_baseline: add a "raw pixels" row (retrieval on the flattened input).
        loss_defaults: per loss name, hyper-parameters that replace the loss table's
            defaults on this dataset (``--loss-arg`` still overrides them).
    """

    name: str
    summary: str
    load: Callable[[argparse.Namespace], RetrievalData]
    model: Callable[[RetrievalData, int, argparse.Namespace], dict[str, Any]]
    recall_ks: tuple[int, ...]
    defaults: Mapping[str, Any]
    pixel_baseline: bool = False
    loss_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


#: what each dataset's loader (and model) reads for a flag that is not given
LOADER_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "glyphs": {"image_size": 32, "min_fonts": 12},
        "digits": {"train_classes": "0,1,2,3,4"},
        "cub": {"image_size": 224, "backbone": "resnet50"},
        "sop": {"image_size": 224, "backbone": "resnet50"},
    }
)


def loader_setting(args: argparse.Namespace, dataset: str, name: str) -> Any:
    """``args.<name>``, or :data:`LOADER_DEFAULTS`' value where it is not given."""
    value = getattr(args, name, None)
    return LOADER_DEFAULTS[dataset][name] if value is None else value


def _load_glyphs(args: argparse.Namespace) -> RetrievalData:
    from pml_margins.bench.glyphs import load_glyph_split

    return load_glyph_split(
        size=loader_setting(args, "glyphs", "image_size"),
        min_fonts=loader_setting(args, "glyphs", "min_fonts"),
        max_classes=getattr(args, "max_classes", None),
    )


def _load_digits(args: argparse.Namespace) -> RetrievalData:
    from pml_margins.bench.data import load_digits_split

    text = loader_setting(args, "digits", "train_classes")
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError as err:
        raise ValueError(f"--train-classes must be comma-separated digits, got {text!r}") from err
    return load_digits_split(classes)


def _load_image_folder(name: str) -> Callable[[argparse.Namespace], RetrievalData]:
    def load(args: argparse.Namespace) -> RetrievalData:
        from pml_margins.bench.data import load_image_dataset

        if not getattr(args, "data_root", None):
            raise ValueError(f"--dataset {name} needs --data-root DIR")
        return load_image_dataset(
            name,
            args.data_root,
            download=bool(getattr(args, "download", False)),
            image_size=loader_setting(args, name, "image_size"),
            # a re-evaluation reads the test split (and one training image) only
            checked_splits=("test",) if getattr(args, "embeddings_only", False) else None,
            progress=not getattr(args, "no_progress", False),
        )

    return load


#: the glyph CNN (:class:`pml_margins.bench.models.GlyphCNN`); docs/bench_glyphs.md says why
GLYPH_MODEL: Mapping[str, Any] = MappingProxyType({"widths": (16, 32, 64), "unshuffle": 2})


def _glyph_model(data: RetrievalData, size: int, args: argparse.Namespace) -> dict[str, Any]:
    from pml_margins.bench.models import model_config

    return model_config("glyph-cnn", size, image_size=data.input_shape[-1], **GLYPH_MODEL)


def _mlp_model(data: RetrievalData, size: int, args: argparse.Namespace) -> dict[str, Any]:
    from pml_margins.bench.models import model_config

    n_in = 1
    for s in data.input_shape:
        n_in *= s
    return model_config("mlp", size, in_features=n_in, hidden=[256, 256])


def _backbone_model(data: RetrievalData, size: int, args: argparse.Namespace) -> dict[str, Any]:
    from pml_margins.bench.models import model_config

    backbone = loader_setting(args, data.name, "backbone")
    return model_config(backbone, size, weights_path=getattr(args, "weights", None))


_IMAGE_DEFAULTS = MappingProxyType(
    {
        "epochs": 20,
        "embedding_size": 512,
        "batch_size": 64,
        "lr": 1e-4,
        "repeats": 1,
        "threads": None,
        "shift": 0,
    }
)

DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        "glyphs": DatasetSpec(
            name="glyphs",
            summary="characters in matplotlib's fonts, half of the characters held out",
            load=_load_glyphs,
            model=_glyph_model,
            recall_ks=(1, 2, 4, 8),
            defaults=MappingProxyType(
                {
                    "epochs": 6,
                    "embedding_size": 128,
                    "batch_size": 128,
                    "lr": 2e-3,
                    "repeats": 1,
                    "threads": 1,  # small convolutions: 2 threads ran 2-3x slower on 2 cores
                    "shift": 2,
                }
            ),
            pixel_baseline=True,
            # 1,162 training classes: s = 30 (CosFace's lower bound is 11.6 at p = 0.99);
            # SphereFace too (normalized features): scaled by the feature norms it stayed
            # at loss log(C)
            loss_defaults=MappingProxyType(
                {
                    **{
                        name: {"scale": 30.0}
                        for name in (
                            *("nsl", "cosface", "arcface", "combined", "elasticface"),
                            *("magface", "adaface", "subcenter", "curricularface"),
                        )
                    },
                    "sphereface": {"scale": 30.0, "feature_norm": False},
                }
            ),
        ),
        "digits": DatasetSpec(
            name="digits",
            summary="scikit-learn's 8x8 digits, digits 5-9 held out",
            load=_load_digits,
            model=_mlp_model,
            recall_ks=(1, 2, 4, 8),
            defaults=MappingProxyType(
                {
                    "epochs": 10,
                    "embedding_size": 64,
                    "batch_size": 128,
                    "lr": 1e-3,
                    "repeats": 5,
                    "threads": 1,  # tiny matrices: more threads only add contention
                    "shift": 0,
                }
            ),
            pixel_baseline=True,
        ),
        "cub": DatasetSpec(
            name="cub",
            summary="CUB-200-2011 from --data-root, classes 101-200 held out",
            load=_load_image_folder("cub"),
            model=_backbone_model,
            recall_ks=(1, 2, 4, 8),
            defaults=_IMAGE_DEFAULTS,
        ),
        "sop": DatasetSpec(
            name="sop",
            summary="Stanford Online Products from --data-root, Ebay_test.txt held out",
            load=_load_image_folder("sop"),
            model=_backbone_model,
            recall_ks=(1, 10, 100, 1000),
            defaults=_IMAGE_DEFAULTS,
        ),
    }
)

#: what ``pml-margins bench`` uses without ``--dataset``
DEFAULT_DATASET = "glyphs"


def loss_overrides(dataset: str, loss: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Hyper-parameters of ``loss`` on ``dataset``: the dataset's defaults, then ``overrides``.

    ``overrides`` are the command line's ``--loss-arg`` values or a sweep point's.
    """
    return {**DATASETS[dataset].loss_defaults.get(loss, {}), **overrides}


def load_dataset(name: str, args: argparse.Namespace) -> RetrievalData:
    """Load the registered dataset ``name`` with its Recall@K cut-offs filled in.

    Raises:
        ValueError: unknown name, or bad options (e.g. ``--data-root`` missing).
        FileNotFoundError: the dataset's files are missing (the message names them).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    spec = DATASETS[name]
    return replace(spec.load(args), recall_ks=spec.recall_ks)
