"""Pure functions: the margin-softmax core, target-logit functions, hyper-parameter bounds."""

import sys as _sys

from pml_margins.functional.autograd_switch import (
    autograd_only,
    autograd_only_enabled,
    backward_once,
)
from pml_margins.functional.center import center_distances, center_ema_update
from pml_margins.functional.circle import (
    circle_loss_dense,
    circle_loss_dense_negatives,
    circle_loss_masked,
    circle_loss_pairs,
    circle_loss_whole,
    circle_negative_logits,
    circle_positive_logits,
    segment_logsumexp,
)
from pml_margins.functional.fused_margin_softmax import (
    DENSE_MAX_ELEMENTS,
    MATERIALIZE_MAX_ELEMENTS,
    FusedLogits,
    NonTargetLogitFn,
    ScaleFromCosines,
    auto_chunk_size,
    class_columns,
    fused_margin_softmax_cross_entropy,
    sample_classes,
)
from pml_margins.functional.hyperparameters import (
    cosface_margin_upper_bound,
    cosface_scale_lower_bound,
)
from pml_margins.functional.margin_softmax import (
    TargetLogitFn,
    compute_dtype,
    margin_softmax_cross_entropy,
)
from pml_margins.functional.target_logits import (
    TargetWithSlope,
    angle_cosine,
    arcface_target,
    arcface_value_and_slope,
    combined_margin_target,
    combined_margin_value_and_slope,
    cos_multiple_angle,
    cosface_target,
    cosface_value_and_slope,
    safe_sine,
    sphereface_psi,
    sphereface_value_and_slope,
)

__all__ = [
    "DENSE_MAX_ELEMENTS",
    "MATERIALIZE_MAX_ELEMENTS",
    "FusedLogits",
    "NonTargetLogitFn",
    "ScaleFromCosines",
    "TargetLogitFn",
    "TargetWithSlope",
    "angle_cosine",
    "arcface_target",
    "arcface_value_and_slope",
    "auto_chunk_size",
    "autograd_only",
    "autograd_only_enabled",
    "backward_once",
    "center_distances",
    "center_ema_update",
    "circle_loss_dense",
    "circle_loss_dense_negatives",
    "circle_loss_masked",
    "circle_loss_pairs",
    "circle_loss_whole",
    "circle_negative_logits",
    "circle_positive_logits",
    "class_columns",
    "combined_margin_target",
    "combined_margin_value_and_slope",
    "compute_dtype",
    "cos_multiple_angle",
    "cosface_margin_upper_bound",
    "cosface_scale_lower_bound",
    "cosface_target",
    "cosface_value_and_slope",
    "fused_margin_softmax_cross_entropy",
    "margin_softmax_cross_entropy",
    "safe_sine",
    "sample_classes",
    "segment_logsumexp",
    "sphereface_psi",
    "sphereface_value_and_slope",
]

# the former path of the autograd_switch module (renamed: as a submodule, its name hid the
# class autograd_only from the API reference); old imports and pickles still find it
_sys.modules.setdefault(__name__ + ".autograd_only", _sys.modules[__name__ + ".autograd_switch"])
