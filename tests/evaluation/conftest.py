"""Shared data and the numpy brute-force reference for the evaluation tests."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch


@pytest.fixture
def quiet_pml_logging():
    """PML's and the calculator's warnings (lone queries, ...) off for one test."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def make_data(kind: str, n: int, dim: int, classes: int, seed: int):
    """Random or clustered float32 embeddings with int64 labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    if kind == "random":
        x = rng.standard_normal((n, dim))
    else:  # clustered: class centres plus noise, so metrics are far from chance
        centres = rng.standard_normal((classes, dim)) * 2
        x = centres[labels] + rng.standard_normal((n, dim))
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(labels)


def brute_force_neighbours(q, r, exclude_self: bool, metric: str = "euclidean") -> np.ndarray:
    """Full ranking of references per query by (distance, index), in float64."""
    q, r = np.asarray(q, dtype=np.float64), np.asarray(r, dtype=np.float64)
    if metric == "euclidean":
        key = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    else:
        key = -(q @ r.T)
    if exclude_self:
        key[np.arange(len(q)), np.arange(len(q))] = np.inf
    order = np.lexsort((np.broadcast_to(np.arange(r.shape[0]), key.shape), key), axis=1)
    return order[:, : r.shape[0] - int(exclude_self)]


def brute_force_recall(q, ql, r, rl, exclude_self: bool, k: int) -> float:
    """Papers' Recall@K over queries that have a relevant reference."""
    ql, rl = np.asarray(ql), np.asarray(rl)
    order = brute_force_neighbours(q, r, exclude_self)
    hits = rl[order[:, :k]] == ql[:, None]
    relevant = (rl[None, :] == ql[:, None]).sum(1) - int(exclude_self)
    keep = relevant > 0
    return float(hits[keep].any(1).mean())


@pytest.fixture
def cpu() -> torch.device:
    return torch.device("cpu")
