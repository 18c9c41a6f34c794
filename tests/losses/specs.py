"""One entry per class-weight loss: how to build it and how to compute its reference."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from pml_margins.losses import (
    AdaCosLoss,
    AdaFaceLoss,
    ArcFaceLoss,
    ClassWeightLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    CurricularFaceLoss,
    ElasticFaceLoss,
    MagFaceLoss,
    NormSoftmaxLoss,
    SoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)
from tests.losses.reference import reference_per_sample


@dataclass(frozen=True)
class LossSpec:
    id: str
    cls: type[ClassWeightLoss]
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = ""
    ref_hp: dict[str, Any] = field(default_factory=dict)

    def build(self, num_classes: int, embedding_size: int, **extra: Any) -> ClassWeightLoss:
        return self.cls(num_classes, embedding_size, **{**self.kwargs, **extra})

    @property
    def columns_per_class(self) -> int:
        """Columns of ``W`` per class (sub-centres)."""
        return int(self.ref_hp.get("sub_centers", 1))

    def hp_for(self, loss: ClassWeightLoss) -> dict[str, Any]:
        """The reference's hyper-parameters, with what ``loss`` drew in its last forward.

        ElasticFace: the ``(B,)`` margins (``last_margins``; ``m`` everywhere when
        ``sigma = 0``), read after the forward, so the reference draws nothing itself.
        AdaCos: the scale of the step (set from the batch before it is used). AdaFace:
        the norm statistics of the step (likewise). CurricularFace: the step's ``t``.
        """
        if self.kind == "adacos":  # the scale this step used (its update: test_adacos.py)
            return {**self.ref_hp, "scale": float(loss.scale)}
        if self.kind == "adaface":  # the statistics this step used (updated: test_adaface.py)
            stats = {"batch_mean": float(loss.batch_mean), "batch_std": float(loss.batch_std)}
            return {**self.ref_hp, **stats}
        if self.kind == "curricular":  # the t this step used (updated first in training)
            return {**self.ref_hp, "t": float(loss.t)}
        if not self.kind.startswith("elastic"):
            return self.ref_hp
        drawn = loss.last_margins
        margins = torch.full((1,), self.ref_hp["margin"]) if drawn is None else drawn
        return {**self.ref_hp, "margins": margins.cpu().double()}

    def reference(self, loss: ClassWeightLoss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bias = getattr(loss, "bias", None)
        return reference_per_sample(self.kind, x, loss.W, y, bias=bias, **self.hp_for(loss))


MAGFACE_PAPER = {
    "scale": 64.0,
    "l_a": 10.0,
    "u_a": 110.0,
    "l_m": 0.45,
    "u_m": 0.8,
    "lambda_g": 35.0,
}
#: a norm range that the tests' embeddings (norms ~0.5-10) fall into: margins vary per row
MAGFACE_SMALL_NORMS = {
    "scale": 16.0,
    "l_a": 1.0,
    "u_a": 6.0,
    "l_m": 0.3,
    "u_m": 1.2,
    "lambda_g": 2.0,
}
ADAFACE_PAPER = {"margin": 0.4, "h": 0.333, "scale": 64.0, "t_alpha": 0.01, "eps": 1e-3}
#: this batch's statistics only, h = 1: the normalized norms spread over [-1, 1] (some clipped)
ADAFACE_SPREAD = {"h": 1.0, "t_alpha": 1.0, "scale": 16.0}

SPECS = [
    LossSpec("softmax", SoftmaxLoss, {}, "softmax"),
    LossSpec("softmax_nobias", SoftmaxLoss, {"bias": False}, "softmax"),
    LossSpec("nsl", NormSoftmaxLoss, {"scale": 30.0}, "nsl", {"scale": 30.0}),
    LossSpec("cosface", CosFaceLoss, {}, "cosface", {"margin": 0.35, "scale": 64.0}),
    LossSpec("arcface", ArcFaceLoss, {}, "arcface", {"margin": 0.5, "scale": 64.0}),
    LossSpec(
        "arcface_big_margin",
        ArcFaceLoss,
        {"margin": 1.2, "scale": 16.0},
        "arcface",
        {"margin": 1.2, "scale": 16.0},
    ),
    LossSpec(
        "arcface_easy",
        ArcFaceLoss,
        {"easy_margin": True, "scale": 32.0},
        "arcface",
        {"margin": 0.5, "scale": 32.0, "easy_margin": True},
    ),
    LossSpec("sphereface", SphereFaceLoss, {}, "sphereface", {"margin": 4}),
    LossSpec(
        "sphereface_lambda",
        SphereFaceLoss,
        {"margin": 3, "lambda_": 5.0},
        "sphereface",
        {"margin": 3, "lambda_": 5.0},
    ),
    LossSpec(
        "sphereface_fixed_scale",
        SphereFaceLoss,
        {"margin": 2, "scale": 16.0, "feature_norm": False},
        "sphereface",
        {"margin": 2, "scale": 16.0, "feature_norm": False},
    ),
    LossSpec(  # PML's scale: s times the feature norm
        "sphereface_norm_scale",
        SphereFaceLoss,
        {"margin": 3, "scale": 0.5},
        "sphereface",
        {"margin": 3, "scale": 0.5},
    ),
    LossSpec(
        "combined",
        CombinedMarginLoss,
        {"m1": 1.0, "m2": 0.3, "m3": 0.2, "scale": 32.0},
        "combined",
        {"m1": 1.0, "m2": 0.3, "m3": 0.2, "scale": 32.0},
    ),
    LossSpec(
        "combined_general",
        CombinedMarginLoss,
        {"m1": 1.35, "m2": 0.25, "m3": 0.1, "scale": 16.0},
        "combined",
        {"m1": 1.35, "m2": 0.25, "m3": 0.1, "scale": 16.0},
    ),
    LossSpec(
        "combined_integer_m1",
        CombinedMarginLoss,
        {"m1": 2.0, "m2": 0.2, "m3": 0.0, "scale": 16.0},
        "combined",
        {"m1": 2.0, "m2": 0.2, "m3": 0.0, "scale": 16.0},
    ),
    LossSpec(
        "subcenter",
        SubCenterArcFaceLoss,
        {"scale": 32.0},
        "subcenter",
        {"margin": 0.5, "scale": 32.0, "sub_centers": 3},
    ),
    LossSpec(
        "subcenter_k2_big_margin",
        SubCenterArcFaceLoss,
        {"margin": 1.2, "scale": 16.0, "sub_centers": 2},
        "subcenter",
        {"margin": 1.2, "scale": 16.0, "sub_centers": 2},
    ),
    LossSpec(
        "elasticface_arc",
        ElasticFaceLoss,
        {"sigma": 0.1, "scale": 32.0},
        "elastic_arc",
        {"margin": 0.5, "scale": 32.0},
    ),
    LossSpec(
        "elasticface_cos",
        ElasticFaceLoss,
        {"variant": "cos", "sigma": 0.05, "scale": 32.0},
        "elastic_cos",
        {"margin": 0.35, "scale": 32.0},
    ),
    LossSpec(
        "elasticface_arc_big_margin",
        ElasticFaceLoss,
        {"margin": 2.0, "sigma": 0.5, "scale": 16.0},
        "elastic_arc",
        {"margin": 2.0, "scale": 16.0},
    ),
    LossSpec("adacos", AdaCosLoss, {}, "adacos"),
    LossSpec("adacos_fixed", AdaCosLoss, {"dynamic": False}, "adacos"),
    # first of its class, so the dtype matrix runs the norm-dependent margin
    LossSpec(
        "magface_small_norms",
        MagFaceLoss,
        MAGFACE_SMALL_NORMS,
        "magface",
        {**MAGFACE_PAPER, **MAGFACE_SMALL_NORMS},
    ),
    LossSpec("magface", MagFaceLoss, {}, "magface", MAGFACE_PAPER),
    LossSpec(  # the official code's default: no margin where cos(theta_y) <= 0
        "magface_easy_margin",
        MagFaceLoss,
        {**MAGFACE_SMALL_NORMS, "easy_margin": True},
        "magface",
        {**MAGFACE_PAPER, **MAGFACE_SMALL_NORMS, "easy_margin": True},
    ),
    # first of its class, so the dtype matrix runs margins that differ per row
    LossSpec(
        "adaface_spread",
        AdaFaceLoss,
        ADAFACE_SPREAD,
        "adaface",
        {**ADAFACE_PAPER, **ADAFACE_SPREAD},
    ),
    LossSpec("adaface", AdaFaceLoss, {}, "adaface", ADAFACE_PAPER),
    # first of its class (the dtype matrix): a fast t, so the step's t is far from 0
    LossSpec(
        "curricularface_fast_t",
        CurricularFaceLoss,
        {"momentum": 0.5, "scale": 32.0},
        "curricular",
        {"margin": 0.5, "scale": 32.0},
    ),
    LossSpec(
        "curricularface", CurricularFaceLoss, {}, "curricular", {"margin": 0.5, "scale": 64.0}
    ),
]

SPEC_IDS = [s.id for s in SPECS]

RADIANS_28_6 = math.radians(28.6)
