"""The seeds' figure: 2-D (circle) and 3-D (sphere) features, one column per loss."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = [
    "SpherePanel",
    "class_weight_directions",
    "plot_sphere_grid",
    "sphere_figure",
    "sub_centers_of",
]


@dataclass
class SpherePanel:
    """One trained model: held-out embeddings (``N x 2`` or ``N x 3``) and what to print."""

    label: str
    embeddings: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None  # class weight directions, ``C K x D``, or None
    precision_at_1: float
    sub_centers: int = 1  # ``K``: consecutive rows of ``weights`` per class


def class_weight_directions(loss: torch.nn.Module) -> np.ndarray | None:
    """Unit class-weight vectors ``W_j`` (``C x D``) of ``loss`` or its first sub-loss with W.

    With ``K`` sub-centres per class (Sub-center ArcFace) every sub-centre is a row: ``C K x
    D``, class ``j``'s rows ``j K .. j K + K - 1`` (``SpherePanel.sub_centers``).
    """
    for module in loss.modules():
        weight = getattr(module, "W", None)
        if isinstance(weight, torch.Tensor):
            w = torch.nn.functional.normalize(weight.detach().float().t(), dim=1)
            return w.cpu().numpy()
    return None


def sub_centers_of(loss: torch.nn.Module) -> int:
    """``K``, the rows per class of :func:`class_weight_directions` (1 without sub-centres)."""
    for module in loss.modules():
        if isinstance(getattr(module, "W", None), torch.Tensor):
            return int(getattr(module, "sub_centers", 1))
    return 1


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _circle(ax: Any, panel: SpherePanel, colors: Sequence[Any], rng: np.random.Generator) -> None:
    u = _unit(panel.embeddings)
    # radial jitter only to show density; the angle is the learned one
    radius = 1 + 0.12 * (rng.random(len(u)) - 0.5)
    theta = np.linspace(0, 2 * np.pi, 200)
    ax.plot(np.cos(theta), np.sin(theta), color="0.8", lw=0.8, zorder=0)
    if panel.weights is not None:
        for row, w in enumerate(panel.weights):
            j = row // panel.sub_centers  # the class of this (sub-centre's) direction
            ax.plot(
                [0, 1.3 * w[0]], [0, 1.3 * w[1]], color=colors[j], lw=1.2, ls="--", label=f"W_{j}"
            )
    ax.scatter(
        u[:, 0] * radius,
        u[:, 1] * radius,
        c=[colors[y] for y in panel.labels],
        s=4,
        alpha=0.7,
        linewidths=0,
        label=f"{panel.label} features",
    )
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.35)
    ax.set_aspect("equal")
    ax.set_axis_off()


def _sphere(ax: Any, panel: SpherePanel, colors: Sequence[Any]) -> None:
    u = _unit(panel.embeddings)
    a, b = np.mgrid[0 : 2 * np.pi : 24j, 0 : np.pi : 12j]
    ax.plot_wireframe(np.cos(a) * np.sin(b), np.sin(a) * np.sin(b), np.cos(b), color="0.85", lw=0.4)
    ax.scatter(
        u[:, 0],
        u[:, 1],
        u[:, 2],
        c=[colors[y] for y in panel.labels],
        s=3,
        alpha=0.8,
        label=f"{panel.label} features",
    )
    ax.view_init(elev=20, azim=35)
    ax.set_box_aspect((1, 1, 1), zoom=1.45)
    ax.set_axis_off()


def sphere_figure(circle: list[SpherePanel], sphere: list[SpherePanel]) -> Figure:
    """The figure: row 1, 2-D features on the unit circle; row 2, 3-D features on the sphere.

    Points are held-out images, L2-normalized (the angle is what every margin acts
    on); dashed lines are the class-weight directions of the 2-D models. Each
    scatter is labelled ``"<loss> features"`` and each weight line ``"W_<class>"``.

    Raises:
        ValueError: both rows are empty, or a panel's embeddings are not 2-D/3-D as its row.
    """
    from matplotlib.lines import Line2D

    if not circle and not sphere:
        raise ValueError("no panel to plot")
    for row, dim in ((circle, 2), (sphere, 3)):
        for panel in row:
            if panel.embeddings.ndim != 2 or panel.embeddings.shape[1] != dim:
                raise ValueError(
                    f"{panel.label}: embeddings of shape {panel.embeddings.shape} "
                    f"in the {dim}-D row"
                )
    cols = max(len(circle), len(sphere))
    rows = int(bool(circle)) + int(bool(sphere))
    colors = matplotlib.colormaps["tab10"].colors
    rng = np.random.default_rng(0)
    fig = Figure(figsize=(max(2.6 * cols, 6.5), 0.3 + 2.8 * rows), dpi=90)
    for i, panel in enumerate(circle):
        ax = fig.add_subplot(rows, cols, i + 1)
        _circle(ax, panel, colors, rng)
        ax.set_title(f"{panel.label}\n2-D, P@1 {100 * panel.precision_at_1:.0f}%", fontsize=9)
    offset = cols if circle else 0
    for i, panel in enumerate(sphere):
        ax = fig.add_subplot(rows, cols, offset + i + 1, projection="3d")
        _sphere(ax, panel, colors)
        title = f"3-D, P@1 {100 * panel.precision_at_1:.0f}%"
        ax.set_title(title if circle else f"{panel.label}\n{title}", fontsize=9, y=0.95)
    handles = [
        Line2D([], [], marker="o", ls="", color=colors[d], label=str(d), markersize=5)
        for d in range(10)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=10, fontsize=8, frameon=False)
    fig.suptitle(
        "Digits features by loss: angle between classes (held-out images, L2-normalized)",
        fontsize=10,
    )
    top, bottom = (0.86, 0.06) if rows == 2 else (0.78, 0.1)
    fig.subplots_adjust(left=0.01, right=0.99, top=top, bottom=bottom, wspace=0.05, hspace=0.12)
    return fig


def plot_sphere_grid(
    circle: list[SpherePanel], sphere: list[SpherePanel], path: str | os.PathLike[str]
) -> None:
    """Save :func:`sphere_figure` to ``path`` (format from its suffix, PNG without one)."""
    sphere_figure(circle, sphere).savefig(path)
