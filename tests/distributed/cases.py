"""Inputs shared by the workers and the parent: built from seeds, identical in both."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity

from pml_margins.losses import ClassWeightLoss, ProxyCircleLoss
from tests.losses.specs import SPECS, LossSpec

NUM_CLASSES = 11  # uneven shards: 6/5 on two ranks, 4/4/3 on three
SAMPLED_CLASSES = 23
EMBEDDING_SIZE = 5
SAMPLE_RATE = 0.5
LR = 0.1


def _shardable(spec: LossSpec) -> bool:
    """Whether the loss takes ShardedMarginSoftmaxLoss (its ``sharding_unsupported()``).

    Every loss of SPECS does, those with batch statistics (MagFace, AdaFace, dynamic
    AdaCos, CurricularFace) through ``prepare_step``; the predicate stays for a loss that
    declines.
    """
    return spec.build(3, 2).sharding_unsupported() is None


#: every shardable class-weight loss: the foundation's (with their paper references), ProxyCircle
SPEC_BY_ID = {
    **{s.id: s for s in SPECS if _shardable(s)},
    "proxy_circle": LossSpec("proxy_circle", ProxyCircleLoss, {"m": 0.25, "gamma": 32.0}),
}
SAMPLED_SPECS = (
    "arcface",
    "cosface",
    "softmax",
    "proxy_circle",
    "subcenter",
    "magface_small_norms",
    "adaface_spread",
    "curricularface_fast_t",
)
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
    """Queries, references and labels: continuous (no ties) and small integers (many ties).

    The first ``NUM_QUERIES`` references are the queries (for ``exclude_self``).
    """
    g = torch.Generator().manual_seed(7)
    centres = 2 * torch.randn(4, 4, generator=g)
    rl = torch.randint(0, 4, (NUM_REFERENCES,), generator=g)
    r = centres[rl] + torch.randn(NUM_REFERENCES, 4, generator=g)
    ri = torch.randint(-1, 2, (NUM_REFERENCES, 3), generator=g).float()
    return {
        "q": r[:NUM_QUERIES],
        "r": r,
        "qi": ri[:NUM_QUERIES],
        "ri": ri,
        "ql": rl[:NUM_QUERIES],
        "rl": rl,
    }


KNN_CASES = [
    (metric, exclude_self, k)
    for metric in ("dot", "euclidean")
    for exclude_self in (False, True)
    for k in (0, 1, 5, NUM_REFERENCES - 1)
]

NO_CLUSTERING = {"exclude": ("NMI", "AMI")}


def labels_within_one(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A PML ``label_comparison_fn``: labels at most 1 apart match."""
    return (a - b).abs() <= 1


CALCULATOR_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "euclidean_all_k": (NO_CLUSTERING, "separate"),
    "cosine_max_bin_count_avg_of_avgs": (
        {
            **NO_CLUSTERING,
            "distance": CosineSimilarity(),
            "k": "max_bin_count",
            "avg_of_avgs": True,
        },
        "separate",
    ),
    "ref_includes_query_per_class": (
        {**NO_CLUSTERING, "return_per_class": True, "recall_ks": (1, 3)},
        "includes",
    ),
    "set_against_itself_k5": ({**NO_CLUSTERING, "k": 5}, "self"),
    "custom_label_comparison": (
        {**NO_CLUSTERING, "label_comparison_fn": labels_within_one, "return_per_class": True},
        "includes",
    ),
    # float labels (PML compares any): halves, so some ranks' slices may hold only whole
    # values and others fractions; each rank's labels keep the input's dtype
    "fractional_float_labels": ({**NO_CLUSTERING, "return_per_class": True}, "fractional"),
    # the ranks' labels differ in dtype (int64 / float32 of the same whole values; float64
    # queries of tenths against float32 / float64 references): compared as one process
    # compares them, in the narrowest floating dtype (where PML's float32 cast matches)
    "labels_of_mixed_dtypes_self": (NO_CLUSTERING, "self_mixed_dtypes"),
    "decimal_labels_of_mixed_dtypes": (NO_CLUSTERING, "decimals_mixed_dtypes"),
    "custom_label_comparison_mixed_dtypes": (
        {**NO_CLUSTERING, "label_comparison_fn": labels_within_one},
        "decimals_mixed_dtypes",
    ),
}


def rank_labels(labels: torch.Tensor, mode: str, rank: int) -> torch.Tensor:
    """A rank's reference labels as the mode hands them: odd ranks' in float32."""
    return labels.float() if mode.endswith("mixed_dtypes") and rank % 2 else labels


def calculator_inputs(mode: str) -> tuple[torch.Tensor, ...]:
    """``(query, query_labels, reference, reference_labels, ref_includes_query)``."""
    d = retrieval_data()
    if mode == "separate":  # queries that are not in the reference set
        g = torch.Generator().manual_seed(11)
        q = d["r"][:NUM_QUERIES] + 0.5 * torch.randn(NUM_QUERIES, 4, generator=g)
        return q, d["ql"], d["r"], d["rl"], False
    if mode == "decimals_mixed_dtypes":  # tenths: float64 queries, float32 references
        tenths = d["rl"].double() / 10 + 0.1
        return d["q"], tenths[:NUM_QUERIES], d["r"], tenths.float(), True
    if mode == "fractional":
        return d["q"], d["ql"] * 0.5, d["r"], d["rl"] * 0.5, True
    return d["q"], d["ql"], d["r"], d["rl"], True


def circle_losses() -> dict[str, type]:
    """PML's CircleLoss (the harness's control: PML's loss under PML's wrapper) and ours."""
    from pytorch_metric_learning.losses import CircleLoss

    import pml_margins.losses

    return {"pml": CircleLoss, "pml_margins": pml_margins.losses.CircleLoss}


def backbone() -> torch.nn.Linear:
    """A tiny float64 backbone, identical on every rank and in the parent."""
    torch.manual_seed(99)
    return torch.nn.Linear(6, EMBEDDING_SIZE).double()


def backbone_batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    n = sum(batch_sizes(world_size))
    features = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return features, torch.randint(0, NUM_CLASSES, (n,), generator=g)
