"""Loss name -> factory, with hyper-parameters chosen for small retrieval benchmarks.

The digits benchmark has 5 training classes, 64-D embeddings and batches of 128,
far from face recognition (10k+ identities, 512-D), so the papers' face settings
(``s = 64``, ArcFace ``m = 0.5`` rad) are scaled down. ``s = 16`` is well above
CosFace's lower bound for 5 classes
(:func:`pml_margins.functional.cosface_scale_lower_bound`: 4.8 for a 0.99 target
probability). The margins sit mid-range of what the loss docstrings give for
CUB/SOP: CosFace ``m = 0.2``, ArcFace ``m = 0.3`` rad (17 degrees).

They were not tuned on the held-out digits. On this small open-set task larger
margins fit the 5 training classes more tightly and transfer slightly worse
(10 epochs: ArcFace 0.5 rad P@1 94.1 vs 95.4 at 0.3; CosFace 0.35: 95.0 vs 96.0 at
0.2), and NSL without a margin transfers best; the papers' gains come from
thousands of classes.

Center loss: ``lambda = 0.01``, mid-range of the paper's 0.003-0.1, with the
paper's centre update (``alpha = 0.5``). Circle loss: the paper's setting for
fine-grained retrieval (``m = 0.4, gamma = 80``, also PML's default) with PML's
``MultiSimilarityMiner``. Proxy Circle (not in the default list): ``gamma = 32``,
the face setting 256 scaled down like ``s`` above.

Units: CosFace ``m`` is a cosine, ArcFace ``m`` radians, SphereFace ``m`` an
integer multiplier, Circle ``m`` a cosine relaxation and ``gamma`` a scale.

Every factory takes ``(num_classes, embedding_size, **overrides)`` and returns a
:class:`LossSetup`; ``overrides`` replace the documented defaults (``--loss-args``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DEFAULT_LOSSES",
    "LOSSES",
    "LossSetup",
    "build_loss",
    "loss_names",
]


@dataclass
class LossSetup:
    """What one benchmark entry trains with.

    Attributes:
        loss: a PML loss (``BaseMetricLossFunction`` or ``MultipleLosses``); its
            parameters (class weights, centres) get their own optimizer group.
        miner: a PML miner called on each batch, or ``None``.
        label: the name shown in tables and plots.
        hyperparameters: the settings used, for ``results.json``.
    """

    loss: torch.nn.Module
    miner: torch.nn.Module | None
    label: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)


Factory = Callable[..., LossSetup]


def _softmax(num_classes: int, embedding_size: int, **kw: Any) -> LossSetup:
    from pml_margins.losses import SoftmaxLoss

    hp = {"bias": True, **kw}
    return LossSetup(SoftmaxLoss(num_classes, embedding_size, **hp), None, "Softmax", hp)


def _nsl(num_classes: int, embedding_size: int, **kw: Any) -> LossSetup:
    from pml_margins.losses import NormSoftmaxLoss

    hp = {"scale": 16.0, **kw}
    return LossSetup(NormSoftmaxLoss(num_classes, embedding_size, **hp), None, "NSL", hp)


def _sphereface(num_classes: int, embedding_size: int, **kw: Any) -> LossSetup:
    from pml_margins.losses import SphereFaceLoss

    # lambda_ = 5: the paper's final annealing value, used from the start for a short run
    hp = {"margin": 4, "scale": None, "lambda_": 5.0, **kw}
    return LossSetup(SphereFaceLoss(num_classes, embedding_size, **hp), None, "SphereFace", hp)


def _cosface(num_classes: int, embedding_size: int, **kw: Any) -> LossSetup:
    from pml_margins.losses import CosFaceLoss

    hp = {"margin": 0.2, "scale": 16.0, **kw}
    return LossSetup(CosFaceLoss(num_classes, embedding_size, **hp), None, "CosFace", hp)


def _arcface(num_classes: int, embedding_size: int, **kw: Any) -> LossSetup:
    from pml_margins.losses import ArcFaceLoss

    hp = {"margin": 0.3, "scale": 16.0, **kw}
    return LossSetup(ArcFaceLoss(num_classes, embedding_size, **hp), None, "ArcFace", hp)


def _combined(num_classes: int, embedding_size: int, **kw: Any) -> LossSetup:
    from pml_margins.losses import CombinedMarginLoss

    hp = {"m1": 1.0, "m2": 0.3, "m3": 0.2, "scale": 16.0, **kw}
    return LossSetup(CombinedMarginLoss(num_classes, embedding_size, **hp), None, "Combined", hp)


def _center(num_classes: int, embedding_size: int, **kw: Any) -> LossSetup:
    from pytorch_metric_learning.losses import MultipleLosses

    from pml_margins.losses import CenterLoss, SoftmaxLoss

    lam = kw.pop("lambda", 0.01)
    hp = {"alpha": 0.5, "update": "ema", **kw}
    loss = MultipleLosses(
        [SoftmaxLoss(num_classes, embedding_size), CenterLoss(num_classes, embedding_size, **hp)],
        weights=[1.0, lam],
    )
    return LossSetup(loss, None, "Softmax+Center", {"lambda": lam, **hp})


def _circle(num_classes: int, embedding_size: int, **kw: Any) -> LossSetup:
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    from pml_margins.losses import CircleLoss

    epsilon = kw.pop("miner_epsilon", 0.1)
    hp = {"m": 0.4, "gamma": 80.0, **kw}
    miner = MultiSimilarityMiner(epsilon=epsilon)
    return LossSetup(
        CircleLoss(**hp), miner, "Circle+MS miner", {**hp, "miner": f"MS(eps={epsilon})"}
    )


def _proxy_circle(num_classes: int, embedding_size: int, **kw: Any) -> LossSetup:
    from pml_margins.losses import ProxyCircleLoss

    hp = {"m": 0.25, "gamma": 32.0, **kw}
    loss = ProxyCircleLoss(num_classes, embedding_size, **hp)
    return LossSetup(loss, None, "Proxy Circle", hp)


#: name -> factory. ``num_classes`` / ``embedding_size`` are ignored by pair losses.
LOSSES: dict[str, Factory] = {
    "softmax": _softmax,
    "nsl": _nsl,
    "sphereface": _sphereface,
    "cosface": _cosface,
    "arcface": _arcface,
    "center": _center,
    "circle": _circle,
    "combined": _combined,
    "proxy_circle": _proxy_circle,
}

#: what ``pml-margins bench`` trains when ``--losses`` is not given.
DEFAULT_LOSSES: tuple[str, ...] = (
    "softmax",
    "nsl",
    "sphereface",
    "cosface",
    "arcface",
    "center",
    "circle",
)


def loss_names() -> list[str]:
    """All registered names."""
    return list(LOSSES)


def build_loss(name: str, num_classes: int, embedding_size: int, **overrides: Any) -> LossSetup:
    """Build the registered loss ``name`` (with ``overrides`` replacing its defaults).

    Raises:
        ValueError: unknown name.
        ImportError: the loss is not available in this version of ``pml_margins``.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    try:
        return LOSSES[name](num_classes, embedding_size, **overrides)
    except ImportError as err:
        raise ImportError(f"loss {name!r} is not available: {err}") from err
