"""``RetrievalAccuracyCalculator``: PML's ``AccuracyCalculator`` with exact blocked k-nn.

The class only converts and checks inputs, runs :func:`~.knn.exact_knn` and hands
the resulting label-match matrix to the pure functions of :mod:`.metrics`.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning.distances import (
    BaseDistance,
    BatchedDistance,
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
)
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator, nan_accuracy
from pytorch_metric_learning.utils.inference import CustomKNN, FaissKMeans

from pml_margins.evaluation import metrics as M
from pml_margins.evaluation.knn import Metric, exact_knn
from pml_margins.validation import check_embeddings, check_labels

__all__ = ["RetrievalAccuracyCalculator", "resolve_distance"]

LOGGER = logging.getLogger(__name__)

#: above this many classes AMI gets a warning: scikit-learn's AMI is quadratic in it
AMI_SLOW_NUM_CLASSES = 1000


def resolve_distance(distance: BaseDistance | None) -> tuple[Metric, bool]:
    """Map a PML distance object to ``(metric, normalize)`` for :func:`exact_knn`.

    ``None`` is PML's default k-nn (faiss ``IndexFlatL2``): Euclidean on the raw
    embeddings.

    Raises:
        ValueError: a distance other than Lp with p=2 and power=1, dot product or cosine.
    """
    if distance is None:
        return "euclidean", False
    if isinstance(distance, BatchedDistance):
        distance = distance.distance
    if isinstance(distance, (CosineSimilarity, DotProductSimilarity)):
        return "dot", bool(distance.normalize_embeddings)
    if type(distance) is LpDistance and distance.p == 2 and distance.power == 1:
        return "euclidean", bool(distance.normalize_embeddings)
    raise ValueError(
        "distance must be LpDistance(p=2, power=1), DotProductSimilarity or CosineSimilarity, "
        f"got {distance!r}"
    )


def _to_tensor(x: object, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "ui" and x.dtype != np.uint8:
            x = x.astype(np.int64)
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _to_labels(x: object, length: int, name: str, device: torch.device) -> torch.Tensor:
    labels = _to_tensor(x, name)
    if labels.is_floating_point() and labels.ndim == 1 and bool((labels == labels.round()).all()):
        labels = labels.long()  # PML accepts whole-number float labels; keep accepting them
    return check_labels(labels, length, name).to(device=device, dtype=torch.long)


class RetrievalAccuracyCalculator(AccuracyCalculator):
    """Exact retrieval accuracy: PML's metrics plus Recall@K, chunked, on any device.

    A drop-in :class:`pytorch_metric_learning.utils.accuracy_calculator.AccuracyCalculator`
    (testers and hooks accept it) that computes every k-nn metric from one exact
    blocked k-nn on the device the embeddings are on. Recall@K is the papers'
    definition: a query counts if one of its ``K`` nearest references shares its
    label.

    .. math::

        \\mathrm{Recall@K} = \\frac{1}{Q} \\sum_i \\max_{j < K} [y_{n_{ij}} = y_i]

    Args:
        include, exclude, avg_of_avgs, return_per_class, k, kmeans_func: as in PML.
        label_comparison_fn: unsupported (labels are compared for equality).
        device: where to compute; ``None`` means the device of the query.
        knn_func: ``None`` or a PML ``CustomKNN`` use the exact k-nn here (with the
            ``CustomKNN``'s distance); any other callable is used as in PML.
        recall_ks: the cut-offs ``K`` of the ``recall_at_K`` metrics.
        distance: PML distance object for ranking; default Euclidean on the raw
            embeddings, as PML's default faiss k-nn.
        block_rows, memory_budget: query rows per k-nn block (the block side
            when the query set is the reference set), or the bytes all the score
            blocks held at once may use (automatic by default, see
            :func:`~.knn.exact_knn` and :func:`~.knn.default_memory_budget`).
        progress: show a tqdm bar over the k-nn blocks.

    Besides the metrics the result holds ``num_excluded_queries``: queries whose
    label has no other instance in the reference set, left out as PML does.

    Example:
        >>> x = torch.tensor([[0.0], [0.1], [1.0], [1.1]])
        >>> calc = RetrievalAccuracyCalculator(include=("precision_at_1", "recall_at_2"))
        >>> calc.get_accuracy(x, torch.tensor([0, 0, 1, 1]))
        {'precision_at_1': 1.0, 'recall_at_2': 1.0}
    """

    def __init__(
        self,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        avg_of_avgs: bool = False,
        return_per_class: bool = False,
        k: int | str | None = None,
        label_comparison_fn: Any = None,
        device: torch.device | str | None = None,
        knn_func: Any = None,
        kmeans_func: Any = None,
        recall_ks: Sequence[int] = (1, 2, 4, 8),
        distance: BaseDistance | None = None,
        block_rows: int | None = None,
        memory_budget: int | None = None,
        progress: bool = False,
    ) -> None:
        if label_comparison_fn is not None:
            raise NotImplementedError(
                "RetrievalAccuracyCalculator compares labels for equality; for a custom "
                "label_comparison_fn use pytorch_metric_learning's AccuracyCalculator"
            )
        if (
            isinstance(recall_ks, (str, bytes))
            or not isinstance(recall_ks, Sequence)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in recall_ks)
        ):
            raise ValueError(
                f"recall_ks must be a sequence of positive integers, got {recall_ks!r}"
            )
        self.recall_ks = tuple(sorted(set(recall_ks)))
        for kk in self.recall_ks:  # found by PML's calculate_<name> discovery in __init__
            setattr(self, f"calculate_recall_at_{kk}", functools.partial(self._recall, kk))
        if isinstance(knn_func, CustomKNN):
            if distance is not None:
                raise ValueError("pass either distance or a CustomKNN knn_func, not both")
            distance, knn_func = knn_func.distance, None
        self.metric, self.normalize = resolve_distance(distance)
        self.distance = distance
        self.block_rows = block_rows
        self.memory_budget = memory_budget
        self.progress = progress
        self._device = None if device is None else torch.device(device)
        if kmeans_func is None:
            kmeans_func = FaissKMeans(niter=20, gpu=_faiss_gpu_usable(self._device))
        super().__init__(
            include=tuple(include),
            exclude=tuple(exclude),
            avg_of_avgs=avg_of_avgs,
            return_per_class=return_per_class,
            k=k,
            device=self._device or torch.device("cpu"),
            knn_func=knn_func,
            kmeans_func=kmeans_func,
        )
        self.device = self._device
        self.knn_func = knn_func  # None: exact_knn

    def requires_knn(self) -> list[str]:
        return [
            *super().requires_knn(),
            "mean_reciprocal_rank",
            "num_excluded_queries",
            *(f"recall_at_{kk}" for kk in self.recall_ks),
        ]

    def get_accuracy(
        self,
        query: Any,
        query_labels: Any,
        reference: Any = None,
        reference_labels: Any = None,
        ref_includes_query: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Compute the metrics; arguments and result as PML's ``get_accuracy``.

        Raises:
            TypeError: embeddings not floating, labels not integer (whole-number
                float labels are accepted).
            ValueError: empty sets, NaN/Inf, mismatched lengths or widths, or
                ``ref_includes_query`` with a reference that does not start with
                the query.
        """
        if reference is None:
            if reference_labels is not None:
                raise ValueError("reference_labels given without reference")
            reference, reference_labels, ref_includes_query = query, query_labels, True
        elif reference_labels is None:
            raise ValueError("reference given without reference_labels")
        query_in = query
        query, device = self._checked_query(query)
        same = reference is query_in and reference_labels is query_labels
        if same:  # query = reference: check and compare once
            reference = query
        else:
            reference = check_embeddings(
                _to_tensor(reference, "reference"), "reference", query.shape[1], "the query's width"
            ).to(device)
        query_labels = _to_labels(query_labels, len(query), "query_labels", device)
        reference_labels = (
            query_labels
            if same
            else _to_labels(reference_labels, len(reference), "reference_labels", device)
        )
        if ref_includes_query and not same:
            n = len(query)
            if len(reference) < n or not (
                torch.allclose(query, reference[:n].to(query.dtype))
                and torch.equal(query_labels, reference_labels[:n])
            ):
                raise ValueError(
                    "ref_includes_query=True needs the first len(query) rows of reference and "
                    "reference_labels to equal query and query_labels"
                )

        return self._compute(
            query, reference, query_labels, reference_labels, ref_includes_query, include, exclude
        )

    def _checked_query(self, query: Any) -> tuple[torch.Tensor, torch.device]:
        """The query as a checked tensor on the compute device, and that device."""
        query = check_embeddings(_to_tensor(query, "query"), "query")
        device = self.device if self.device is not None else query.device
        return query.to(device), device

    def _compute(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        query_labels: torch.Tensor,
        reference_labels: torch.Tensor,
        ref_includes_query: bool,
        include: Sequence[str],
        exclude: Sequence[str],
    ) -> dict[str, Any]:
        """The metrics from checked tensors (k-nn, clustering, PML's aggregation)."""
        self.curr_function_dict = self.get_function_dict(tuple(include), tuple(exclude))
        kwargs: dict[str, Any] = {
            "query": query,
            "reference": reference,
            "query_labels": query_labels,
            "reference_labels": reference_labels,
            "ref_includes_query": ref_includes_query,
            "label_comparison_fn": self.label_comparison_fn,
        }
        metrics = self.get_curr_metrics()
        if any(x in self.requires_knn() for x in metrics):
            kwargs.update(self._knn_kwargs(**kwargs))
        if any(x in self.requires_clustering() for x in metrics):
            num_classes = len(torch.unique(query_labels))
            if "AMI" in metrics and num_classes > AMI_SLOW_NUM_CLASSES:
                warnings.warn(
                    f"AMI with {num_classes} classes is very slow: scikit-learn's "
                    "adjusted_mutual_info_score is quadratic in the number of classes "
                    "(expect minutes to hours); pass exclude=('AMI',) to skip it",
                    UserWarning,
                    stacklevel=3,
                )
            kwargs["cluster_labels"] = self.get_cluster_labels(**kwargs)
        return self._get_accuracy(self.curr_function_dict, **kwargs)

    def _knn_kwargs(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        query_labels: torch.Tensor,
        reference_labels: torch.Tensor,
        ref_includes_query: bool,
        **_: Any,
    ) -> dict[str, Any]:
        label_count, relevant = M.relevant_counts(
            query_labels, reference_labels, ref_includes_query
        )
        not_lone = relevant > 0
        unique_query_labels, first = torch.unique(query_labels, return_inverse=True)
        bin_counts = torch.zeros(len(unique_query_labels), dtype=torch.long, device=query.device)
        bin_counts[first] = label_count
        available = len(reference) - int(ref_includes_query)
        k_pml = min(self.determine_k(bin_counts, len(reference), ref_includes_query), available)
        wanted_ks = [int(m.rsplit("_", 1)[1]) for m in self.get_curr_metrics() if "recall_at" in m]
        k_total = min(max([k_pml, *wanted_ks]), available)
        if not bool(not_lone.any()):
            LOGGER.warning("None of the query labels are in the reference set.")
        elif not bool(not_lone.all()):
            LOGGER.warning(
                "%d of %d queries have no other reference with their label and are excluded",
                int((~not_lone).sum()),
                len(query),
            )
        distances, indices = self._knn(query, reference, k_total, ref_includes_query)
        knn_labels = reference_labels[indices]
        return {
            "label_counts": (unique_query_labels, bin_counts),
            "knn_labels": knn_labels[:, :k_pml],
            "knn_distances": distances[:, :k_pml],
            "lone_query_labels": unique_query_labels[bin_counts - int(ref_includes_query) <= 0],
            "not_lone_query_mask": not_lone,
            "num_lone": int((~not_lone).sum()),
            "knn_match": knn_labels == query_labels[:, None],
            "relevant_counts": relevant,
            "knn_k": k_pml,
        }

    def _knn(
        self, query: torch.Tensor, reference: torch.Tensor, k: int, ref_includes_query: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.knn_func is not None:
            return self.knn_func(query, k, reference, ref_includes_query)
        if self.normalize:
            query = torch.nn.functional.normalize(query, dim=1)
            reference = torch.nn.functional.normalize(reference, dim=1)
        return exact_knn(
            query,
            reference,
            k,
            metric=self.metric,
            exclude_self=ref_includes_query,
            block_rows=self.block_rows,
            memory_budget=self.memory_budget,
            progress=self.progress,
        )

    def _kept(self, kwargs: dict[str, Any], full_k: bool = False):
        """Match matrix, relevant counts and labels of the queries that are not lone."""
        mask = kwargs["not_lone_query_mask"]
        match = kwargs["knn_match"] if full_k else kwargs["knn_match"][:, : kwargs["knn_k"]]
        relevant, labels = kwargs["relevant_counts"], kwargs["query_labels"]
        if kwargs["num_lone"] == 0:
            return match, relevant, labels
        return match[mask], relevant[mask], labels[mask]

    def _aggregate(self, per_query_fn, kwargs: dict[str, Any], full_k: bool = False, **fn_kw):
        match, relevant, labels = self._kept(kwargs, full_k)
        if len(labels) == 0:
            return nan_accuracy(kwargs["label_counts"][0], self.return_per_class)
        per_query = per_query_fn(match, relevant, **fn_kw)
        return M.aggregate(per_query, labels, self.avg_of_avgs, self.return_per_class)

    def _recall(self, recall_k: int, **kwargs: Any) -> float | list[float]:
        return self._aggregate(
            lambda m, _r, k: M.recall_at_k(m, k), kwargs, full_k=True, k=recall_k
        )

    def calculate_precision_at_1(self, **kwargs: Any) -> float | list[float]:
        return self._aggregate(lambda m, _r: M.precision_at_1(m), kwargs)

    def calculate_r_precision(self, **kwargs: Any) -> float | list[float]:
        return self._aggregate(M.r_precision, kwargs)

    def calculate_mean_average_precision_at_r(self, **kwargs: Any) -> float | list[float]:
        return self._aggregate(M.average_precision_at_r, kwargs)

    def calculate_mean_average_precision(self, **kwargs: Any) -> float | list[float]:
        return self._aggregate(M.average_precision, kwargs)

    def calculate_mean_reciprocal_rank(self, **kwargs: Any) -> float | list[float]:
        return self._aggregate(lambda m, _r: M.reciprocal_rank(m), kwargs)

    def calculate_num_excluded_queries(self, num_lone: int, **_: Any) -> int:
        """Queries left out of the k-nn metrics: no other reference has their label."""
        return num_lone

    def extra_repr(self) -> str:
        return (
            f"metric={self.metric}, normalize={self.normalize}, k={self.k}, "
            f"recall_ks={self.recall_ks}, device={self.device}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def _faiss_gpu_usable(device: torch.device | None) -> bool:
    if device is None or device.type != "cuda":
        return False
    import faiss

    return faiss.get_num_gpus() > 0
