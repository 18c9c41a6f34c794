"""The seeds' ablations as data: each sweep is a list of runs (loss, hyper-parameters, x).

- ``cosface-margin``: CosFace ``m`` in 0, 0.05, ..., 0.45 at fixed ``s`` (CosFace
  paper: accuracy rises with ``m`` and saturates near 0.35);
- ``arcface-margin``: ArcFace ``m`` in 0, 0.1, ..., 0.6 radians;
- ``scale``: ``s`` in 8, 16, 32, 64, 128 for CosFace and ArcFace (the ArcFace
  article's 32-128), with CosFace's lower bound on ``s`` marked;
- ``normalization``: softmax (raw features and weights) vs NSL (normalized);
- ``warmup``: ArcFace with a fixed margin vs the margin warm-up of the ArcFace
  article (``MarginScheduler`` from 0 to ``m`` over the first half of training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SWEEPS", "Sweep", "SweepPoint", "margin_warmup"]


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: ``loss`` with ``overrides``, plotted at ``x`` in ``series``."""

    series: str
    x: float | str
    loss: str
    overrides: dict[str, Any] = field(default_factory=dict)
    warmup: bool = False


@dataclass(frozen=True)
class Sweep:
    """A named sweep: its runs and the x axis label (``categorical``: x values are names)."""

    name: str
    parameter: str
    points: tuple[SweepPoint, ...]
    categorical: bool = False
    claim: str = ""


def margin_warmup(fraction: float = 0.5) -> Callable[[Any, int], Any]:
    """A ``LossSetup.schedule``: the margin rises linearly from 0 to its value over ``fraction``."""
    from pml_margins.schedules import MarginScheduler

    def schedule(loss: Any, total_steps: int) -> Any:
        end = float(loss.margin)
        return MarginScheduler(loss, 0.0, end, max(1, round(fraction * total_steps)))

    return schedule


def _grid(start: float, stop: float, step: float) -> list[float]:
    count = round((stop - start) / step)
    return [round(start + i * step, 10) for i in range(count + 1)]


SWEEPS: dict[str, Sweep] = {
    "cosface-margin": Sweep(
        "cosface-margin",
        "CosFace margin m (cosine)",
        tuple(SweepPoint("CosFace", m, "cosface", {"margin": m}) for m in _grid(0, 0.45, 0.05)),
        claim="CosFace paper: accuracy rises with m from 0 and saturates near m = 0.35",
    ),
    "arcface-margin": Sweep(
        "arcface-margin",
        "ArcFace margin m (radians)",
        tuple(SweepPoint("ArcFace", m, "arcface", {"margin": m}) for m in _grid(0, 0.6, 0.1)),
        claim="ArcFace article: m = 0.5 for faces, start near 0.3 elsewhere",
    ),
    "scale": Sweep(
        "scale",
        "scale s",
        tuple(
            SweepPoint(label, s, name, {"scale": float(s)})
            for label, name in (("CosFace", "cosface"), ("ArcFace", "arcface"))
            for s in (8, 16, 32, 64, 128)
        ),
        claim="ArcFace article: s in 32-128; CosFace paper: s above a lower bound set by C",
    ),
    "normalization": Sweep(
        "normalization",
        "features and weights",
        (
            SweepPoint("loss", "softmax (raw)", "softmax"),
            SweepPoint("loss", "NSL (normalized)", "nsl"),
        ),
        categorical=True,
        claim="CosFace paper: normalizing features (NSL) beats plain softmax",
    ),
    "warmup": Sweep(
        "warmup",
        "ArcFace margin schedule",
        (
            SweepPoint("ArcFace", "fixed m", "arcface"),
            SweepPoint("ArcFace", "warm-up 0 → m", "arcface", warmup=True),
        ),
        categorical=True,
        claim="ArcFace article: a margin that grows during training (dynamic margin)",
    ),
}
