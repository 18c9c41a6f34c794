"""Losses, each a ``pytorch_metric_learning.losses.BaseMetricLossFunction``."""

from pml_margins.losses.adacos import AdaCosLoss
from pml_margins.losses.adaface import AdaFaceLoss
from pml_margins.losses.arcface import ArcFaceLoss
from pml_margins.losses.center import CenterLoss
from pml_margins.losses.circle import CircleLoss
from pml_margins.losses.class_weight_loss import ClassWeightLoss
from pml_margins.losses.combined_margin import CombinedMarginLoss
from pml_margins.losses.cosface import CosFaceLoss
from pml_margins.losses.curricularface import CurricularFaceLoss
from pml_margins.losses.elasticface import ElasticFaceLoss
from pml_margins.losses.magface import MagFaceLoss
from pml_margins.losses.norm_softmax import NormSoftmaxLoss
from pml_margins.losses.proxy_circle import ProxyCircleLoss
from pml_margins.losses.softmax import SoftmaxLoss
from pml_margins.losses.sphereface import SphereFaceLoss
from pml_margins.losses.step_statistics import StepStatistics
from pml_margins.losses.subcenter_arcface import SubCenterArcFaceLoss

__all__ = [
    "AdaCosLoss",
    "AdaFaceLoss",
    "ArcFaceLoss",
    "CenterLoss",
    "CircleLoss",
    "ClassWeightLoss",
    "CombinedMarginLoss",
    "CosFaceLoss",
    "CurricularFaceLoss",
    "ElasticFaceLoss",
    "MagFaceLoss",
    "NormSoftmaxLoss",
    "ProxyCircleLoss",
    "SoftmaxLoss",
    "SphereFaceLoss",
    "StepStatistics",
    "SubCenterArcFaceLoss",
]
