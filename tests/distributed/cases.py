"""Inputs shared by the workers and the parent: built from seeds, identical in both."""

from __future__ import annotations

import torch

from pml_margins.losses import ClassWeightLoss
from tests.losses.specs import SPECS, LossSpec

NUM_CLASSES = 11  # uneven shards: 6/5 on two ranks, 4/4/3 on three
SAMPLED_CLASSES = 23
EMBEDDING_SIZE = 5
SAMPLE_RATE = 0.5
LR = 0.1
SPEC_BY_ID = {s.id: s for s in SPECS}
SAMPLED_SPECS = ("arcface", "cosface", "softmax")
NUM_QUERIES, NUM_REFERENCES = 9, 17


def batch_sizes(world_size: int, equal: bool = False) -> list[int]:
    """Uneven per-rank batches (2, 3, 4, ...), like a last batch of an epoch; or 3 each."""
    return [3 if equal else 2 + r for r in range(world_size)]


def rows(world_size: int, rank: int, equal: bool = False) -> slice:
    sizes = batch_sizes(world_size, equal)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def batch(
    world_size: int,
    num_classes: int,
    seed: int = 1,
    dtype: torch.dtype = torch.float64,
    equal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gathered batch ``(N, D)`` and its labels; rank ``r`` owns ``rows(world_size, r)``."""
    g = torch.Generator().manual_seed(seed)
    n = sum(batch_sizes(world_size, equal))
    x = torch.randn(n, EMBEDDING_SIZE, generator=g, dtype=torch.float64).to(dtype)
    # few distinct labels, so that sampled shards also have negatives
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


def reference_loss(
    spec: LossSpec, num_classes: int = NUM_CLASSES, dtype: torch.dtype = torch.float64
) -> ClassWeightLoss:
    """The single-process loss whose W (and bias) the shards are cut from."""
    torch.manual_seed(1234)
    return spec.build(num_classes, EMBEDDING_SIZE).to(dtype)


def retrieval_data() -> dict[str, torch.Tensor]:
    """Queries and references: continuous (no ties) and small integers (many exact ties)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(NUM_QUERIES, 4, generator=g)
    r = torch.randn(NUM_REFERENCES, 4, generator=g)
    qi = torch.randint(-1, 2, (NUM_QUERIES, 3), generator=g).float()
    ri = torch.randint(-1, 2, (NUM_REFERENCES, 3), generator=g).float()
    ri[ri.abs().sum(1) == 0] = 1.0  # no zero rows
    qi[qi.abs().sum(1) == 0] = 1.0
    ql = torch.randint(0, 4, (NUM_QUERIES,), generator=g)
    rl = torch.randint(0, 4, (NUM_REFERENCES,), generator=g)
    return {"q": q, "r": r, "qi": qi, "ri": ri, "ql": ql, "rl": rl}
