"""The loss table: one line per loss (name, label, class, defaults), and :func:`build_loss`.

Hyper-parameters are chosen for small retrieval benchmarks, far from face
recognition (10k+ identities, 512-D embeddings), so the papers' face settings
(``s = 64``, ArcFace ``m = 0.5`` rad) are scaled down: ``s = 16`` is above
CosFace's lower bound for every default dataset
(:func:`pml_margins.functional.cosface_scale_lower_bound`, target probability
0.99: 4.8 for the 5 digit classes, 11.6 for the 1,162 training glyphs); the glyph
set raises it to ``s = 30`` (its ``loss_defaults`` in :mod:`pml_margins.bench.datasets`),
as 16 sits too close to that bound for short runs. The
margins sit mid-range of what the loss docstrings give for CUB/SOP: CosFace
``m = 0.2``, ArcFace ``m = 0.3`` rad (17 degrees). SphereFace uses the paper's
final annealing value ``lambda_ = 5`` from the start (short runs). Center loss:
``lambda = 0.01``, mid-range of the paper's 0.003-0.1, with the paper's centre update
(``alpha = 0.5``). Circle loss: the paper's fine-grained setting (``m = 0.4,
gamma = 80``, PML's default) with PML's ``MultiSimilarityMiner``. Proxy Circle:
``gamma = 32``, the face setting 256 scaled down like ``s``. Sub-center ArcFace:
ArcFace's ``m = 0.3`` rad and ``s = 16``, the paper's ``K = 3`` sub-centres.
ElasticFace-Arc: ArcFace's ``m = 0.3`` rad and ``s = 16``, ``sigma = 0.03`` rad (the
paper's ratio sigma/m = 0.1). AdaCos: the paper's dynamic scale, nothing to set. MagFace: the
paper's ``lambda_g = 35`` and margin ratio ``u_m / l_m`` about 2, centred on ArcFace's
0.3 rad (0.2-0.4 rad), with the norm range scaled to a small model's features (1-20,
the paper's 10-110 is for a face backbone) and ``s = 16``. AdaFace: the paper's
``m = 0.4``, ``h = 0.333`` and ``t_alpha = 0.01`` with ``s = 16``; its norm statistics
are self-normalising (running mean and deviation of the batch's norms), so, unlike
MagFace, no norm range is scaled to the model. CurricularFace: ArcFace's
``m = 0.3`` rad and ``s = 16`` (``s = 30`` on the glyph set, as ArcFace), the paper's
``momentum = 0.01`` for ``t``. How the
defaults were checked on the glyph benchmark: ``docs/bench_glyphs.md``.

Units: CosFace ``m`` is a cosine, ArcFace ``m`` radians, SphereFace ``m`` an integer
multiplier, Circle ``m`` a cosine relaxation and ``gamma`` a scale.

Adding a loss is one :class:`LossSpec` line in :data:`LOSS_TABLE`. A default that
depends on the dataset (e.g. AdaCos's scale from the number of classes) is a
:class:`FromData` whose function receives the :class:`LossContext`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from pml_margins.validation import check_non_negative

__all__ = [
    "DEFAULT_LOSSES",
    "LOSSES",
    "LOSS_TABLE",
    "FromData",
    "LossContext",
    "LossSetup",
    "LossSpec",
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
        schedule: ``schedule(loss, total_steps)`` -> an object whose ``step()`` is
            called after every optimizer step (e.g. a
            :class:`~pml_margins.schedules.MarginScheduler`), or ``None``.
    """

    loss: torch.nn.Module
    miner: torch.nn.Module | None
    label: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    schedule: Callable[[torch.nn.Module, int], Any] | None = None


@dataclass(frozen=True)
class LossContext:
    """What a dataset-dependent default may depend on."""

    num_classes: int
    embedding_size: int


@dataclass(frozen=True)
class FromData:
    """A default computed per dataset, e.g. ``FromData(lambda ctx: ctx.num_classes)``."""

    function: Callable[[LossContext], Any]


@dataclass(frozen=True)
class LossSpec:
    """One line of the loss table.

    Attributes:
        name: the ``--losses`` name.
        label: shown in tables and plots.
        target: a class of :mod:`pml_margins.losses` given by name (imported when
            built, so that a loss missing from this version only fails when asked
            for), or a builder ``f(context, **hyperparameters) -> (loss, miner)``.
        defaults: keyword defaults; :class:`FromData` values are computed per dataset.
        class_weights: the constructor takes ``(num_classes, embedding_size)`` first.
    """

    name: str
    label: str
    target: str | Callable[..., tuple[torch.nn.Module, torch.nn.Module | None]]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    class_weights: bool = True


def _loss_class(name: str) -> Any:
    losses = importlib.import_module("pml_margins.losses")
    if not hasattr(losses, name):
        raise ImportError(f"pml_margins.losses has no {name}")
    return getattr(losses, name)


def _softmax_center(ctx: LossContext, *, lambda_: float, **center: Any) -> tuple[Any, None]:
    """Softmax + lambda * Center loss, through PML's ``MultipleLosses``; ``lambda_`` >= 0
    (the paper's weight: a negative one pushes features away from their centres)."""
    from pytorch_metric_learning.losses import MultipleLosses

    from pml_margins.validation import check_non_negative

    lambda_ = check_non_negative(lambda_, "lambda_")

    softmax = _loss_class("SoftmaxLoss")(ctx.num_classes, ctx.embedding_size)
    center_loss = _loss_class("CenterLoss")(ctx.num_classes, ctx.embedding_size, **center)
    return MultipleLosses([softmax, center_loss], weights=[1.0, lambda_]), None


def _circle_ms(ctx: LossContext, *, miner_epsilon: float, **circle: Any) -> tuple[Any, Any]:
    """Circle loss on the pairs PML's ``MultiSimilarityMiner`` picks (``miner_epsilon``: its
    ``epsilon``, a finite number >= 0; PML takes any value: NaN or a negative one mines
    no pair, and the loss, 0 at every step, trains nothing)."""
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    epsilon = check_non_negative(miner_epsilon, "miner_epsilon")
    return _loss_class("CircleLoss")(**circle), MultiSimilarityMiner(epsilon=epsilon)


#: one line per loss, in table order
# fmt: off
LOSS_TABLE: tuple[LossSpec, ...] = (
    LossSpec("softmax", "Softmax", "SoftmaxLoss", {"bias": True}),
    LossSpec("nsl", "NSL", "NormSoftmaxLoss", {"scale": 16.0}),
    LossSpec("sphereface", "SphereFace", "SphereFaceLoss", {"margin": 4, "scale": 1.0, "lambda_": 5.0}),  # noqa: E501
    LossSpec("cosface", "CosFace", "CosFaceLoss", {"margin": 0.2, "scale": 16.0}),
    LossSpec("arcface", "ArcFace", "ArcFaceLoss", {"margin": 0.3, "scale": 16.0}),
    LossSpec("center", "Softmax+Center", _softmax_center, {"lambda_": 0.01, "alpha": 0.5, "update": "ema"}),  # noqa: E501
    LossSpec("circle", "Circle+MS miner", _circle_ms, {"m": 0.4, "gamma": 80.0, "miner_epsilon": 0.1}, class_weights=False),  # noqa: E501
    LossSpec("combined", "Combined", "CombinedMarginLoss", {"m1": 1.0, "m2": 0.3, "m3": 0.2, "scale": 16.0}),  # noqa: E501
    LossSpec("proxy_circle", "Proxy Circle", "ProxyCircleLoss", {"m": 0.25, "gamma": 32.0}),
    LossSpec("elasticface", "ElasticFace-Arc", "ElasticFaceLoss", {"margin": 0.3, "sigma": 0.03, "scale": 16.0}),  # noqa: E501
    LossSpec("adacos", "AdaCos", "AdaCosLoss", {"dynamic": True}),
    LossSpec("magface", "MagFace", "MagFaceLoss", {"scale": 16.0, "l_a": 1.0, "u_a": 20.0, "l_m": 0.2, "u_m": 0.4, "lambda_g": 35.0}),  # noqa: E501
    LossSpec("adaface", "AdaFace", "AdaFaceLoss", {"margin": 0.4, "h": 0.333, "scale": 16.0, "t_alpha": 0.01}),  # noqa: E501
    LossSpec("subcenter", "Sub-center ArcFace", "SubCenterArcFaceLoss", {"margin": 0.3, "scale": 16.0, "sub_centers": 3}),  # noqa: E501
    LossSpec("curricularface", "CurricularFace", "CurricularFaceLoss", {"margin": 0.3, "scale": 16.0, "momentum": 0.01}),  # noqa: E501
)
# fmt: on

#: name -> spec
LOSSES: Mapping[str, LossSpec] = MappingProxyType({spec.name: spec for spec in LOSS_TABLE})

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
    """All registered names, in table order."""
    return list(LOSSES)


def build_loss(name: str, num_classes: int, embedding_size: int, **overrides: Any) -> LossSetup:
    """Build the registered loss ``name``; ``overrides`` replace its defaults.

    Raises:
        ValueError: unknown name, or an override the loss does not have.
        ImportError: the loss is not available in this version of ``pml_margins``.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    spec = LOSSES[name]
    unknown = sorted(set(overrides) - set(spec.defaults))
    if unknown and not isinstance(spec.target, str):
        raise ValueError(
            f"loss {name!r} has no hyper-parameter {', '.join(unknown)}; "
            f"it takes {', '.join(spec.defaults)}"
        )
    ctx = LossContext(num_classes, embedding_size)
    hp = {
        key: value.function(ctx) if isinstance(value, FromData) else value
        for key, value in {**spec.defaults, **overrides}.items()
    }
    try:
        if isinstance(spec.target, str):
            cls = _loss_class(spec.target)
            args = (num_classes, embedding_size) if spec.class_weights else ()
            loss, miner = cls(*args, **hp), None
        else:
            loss, miner = spec.target(ctx, **hp)
    except ImportError as err:
        raise ImportError(f"loss {name!r} is not available: {err}") from err
    except TypeError as err:
        unexpected = [key for key in overrides if f"keyword argument '{key}'" in str(err)]
        if unexpected and isinstance(spec.target, str):  # (a class: its own and PML's)
            raise ValueError(
                f"loss {name!r} ({spec.target.rsplit('.', 1)[-1]}) has no hyper-parameter "
                f"{', '.join(unexpected)}; it takes {', '.join(_named_parameters(cls))} "
                "and the keyword options of its base class"
            ) from None
        raise ValueError(f"loss {name!r}: bad hyper-parameters {overrides}: {err}") from err
    return LossSetup(loss, miner, spec.label, hp)


def _named_parameters(cls: type) -> list[str]:
    """The keyword parameters a loss class names (not ``num_classes``, ``embedding_size``
    nor its ``**kwargs``)."""
    parameters = inspect.signature(cls).parameters.values()
    skipped = {"self", "num_classes", "embedding_size"}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in kinds and p.name not in skipped]
