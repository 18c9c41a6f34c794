"""``RetrievalAccuracyCalculator``: PML's ``AccuracyCalculator`` with exact blocked k-nn.

The class only converts and checks inputs, runs :func:`~.knn.exact_knn` and hands
the resulting label-match matrix to the pure functions of :mod:`.metrics`.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from pytorch_metric_learning.distances import (
    BaseDistance,
    BatchedDistance,
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
)
from pytorch_metric_learning.utils import common_functions
from pytorch_metric_learning.utils.accuracy_calculator import (
    EQUALITY,
    AccuracyCalculator,
    nan_accuracy,
)
from pytorch_metric_learning.utils.inference import CustomKNN, FaissKMeans, FaissKNN

from pml_margins.evaluation import metrics as M
from pml_margins.evaluation.inputs import (
    as_comparable_labels,
    as_embeddings,
    as_int,
    as_labels,
    as_pml_label_sets,
    as_pml_labels,
    at_common_precision,
    check_int,
)
from pml_margins.evaluation.knn import Backend, Metric, check_num_threads, exact_knn, uses_faiss
from pml_margins.evaluation.label_matching import compared, custom_relevance, label_positions
from pml_margins.evaluation.metric_kwargs import checked_metric_kwargs, checked_query_mask
from pml_margins.losses.pml_calls import runs_as_its_class
from pml_margins.validation import check_bool, check_flag

__all__ = [
    "RetrievalAccuracyCalculator",
    "check_metric_names",
    "check_recall_ks",
    "common_float",
    "describe_distance",
    "describe_knn",
    "resolve_distance",
    "resolve_faiss_knn",
]

LOGGER = logging.getLogger(__name__)
#: a Recall@K metric's name
_RECALL_NAME = re.compile(r"recall_at_[1-9][0-9]*")


class _SilencedWithPML(logging.Filter):
    """Drops a record below the level set on PML's own logger or a parent of it but the
    root (or all, when it is disabled), so that what silences PML's ``AccuracyCalculator``
    (``logging.getLogger("PML").setLevel(logging.ERROR)``, the logger of
    ``set_logger_name``) silences this calculator too; this module's logger and its
    parents' levels and handlers apply as usual."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger = common_functions.LOGGER  # (read each time: set_logger_name rebinds it)
        if logger.disabled:
            return False
        while logger is not None and logger is not logging.root:  # a level set on it or a
            if logger.level != logging.NOTSET:  # parent (the root's applies to ours as well)
                return record.levelno >= logger.level
            logger = logger.parent
        return True


LOGGER.addFilter(_SilencedWithPML())

#: above this many classes AMI gets a warning: scikit-learn's AMI is quadratic in it
AMI_SLOW_NUM_CLASSES = 1000

#: per thread, the label matches of each calculator's get_accuracy call in progress
#: (``id(calculator) -> _Matches``), for _kept: not in the metrics' kwargs (a subclass's
#: metric may pass those on whole), nor on the calculator (one shared by threads, or
#: copied during a call, would carry another call's)
_CALLS = threading.local()


def _reference_count(kwargs: dict[str, Any]) -> int | None:
    """How many references the kwargs of a ``calculate_*`` call describe: the length of
    PML's ``reference_labels`` (or ``reference``) where passed, else ``None`` (unknown)."""
    for name in ("reference_labels", "reference"):
        given = kwargs.get(name)
        if given is not None and hasattr(given, "__len__"):
            return len(given)
    return None


def _check_recall_depth(recall_k: int, knn_labels: torch.Tensor, kwargs: dict[str, Any]) -> None:
    """``ValueError`` where ``knn_labels`` (given to a ``calculate_recall_at_K``) may hold
    fewer neighbours than Recall@K reads: ``min(K, references)``, less the query itself
    when the reference set includes it. The number of references is that of
    ``reference_labels`` (or ``reference``), which PML's ``get_accuracy`` hands its
    metrics; without them it is unknown, and a list narrower than ``K`` is refused (a
    query's missed neighbour would count as a miss). ``label_counts`` cannot tell: they
    count the references that match each query label, not the references."""
    width = knn_labels.shape[1] if knn_labels.ndim > 1 else 1
    if width >= recall_k:
        return
    references = _reference_count(kwargs)
    if references is not None:
        available = references - int(bool(kwargs.get("ref_includes_query", False)))
        if width >= available:
            return
        raise ValueError(
            f"recall_at_{recall_k} reads each query's {min(recall_k, available)} nearest "
            f"references, but knn_labels holds {width} (PML's k): pass the knn_labels of a "
            f"k >= {recall_k}, or the ones get_accuracy hands its metrics (they reach every "
            "Recall@K)"
        )
    raise ValueError(
        f"recall_at_{recall_k} reads each query's {recall_k} nearest references, but "
        f"knn_labels holds {width} (PML's k) and the number of references is unknown: pass "
        f"the knn_labels of a k >= {recall_k}, or reference_labels (as get_accuracy hands "
        "its metrics) where the reference set has fewer references"
    )


def _calls_in_progress() -> dict[int, Any]:
    calls = getattr(_CALLS, "matches", None)
    if calls is None:
        calls = _CALLS.matches = {}
    return calls


#: PML's k-nn metrics that read only a query's first R neighbours (R: its relevant count)
FIRST_R_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
#: an attribute deleted (``del calc.k``): not a value read back
_DELETED = object()
#: the constructor's settings that are attributes too, checked when assigned later (the
#: ones the constructor derives state from re-derive it; see ``__setattr__``)
LATER_SETTINGS = (
    "avg_of_avgs",
    "return_per_class",
    "k",
    "label_comparison_fn",
    "device",
    "knn_func",
    "recall_ks",
    "distance",
    "block_rows",
    "num_threads",
    "backend",
)


def describe_distance(distance: object) -> str:
    """A PML distance with the settings that decide its ranking, e.g.
    ``LpDistance(p=1, power=1, normalize_embeddings=True)``."""
    if isinstance(distance, BatchedDistance):
        hooked = "" if runs_as_its_class(distance) else " with a hook or a method replaced on it"
        own = f", is_inverted={distance.is_inverted}" if _own_inversion(distance) else ""
        return f"BatchedDistance({describe_distance(distance.distance)}{own}){hooked}"
    if not isinstance(distance, BaseDistance):
        return repr(distance)
    settings = {"p": getattr(distance, "p", None), "power": distance.power}
    settings["normalize_embeddings"] = distance.normalize_embeddings
    similarity = isinstance(distance, DotProductSimilarity)  # (CosineSimilarity: one too)
    if bool(distance.is_inverted) != similarity:  # (changed in place: it ranks the other way)
        settings["is_inverted"] = distance.is_inverted
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)
    hooked = "" if runs_as_its_class(distance) else " with a hook or a method replaced on it"
    return f"{type(distance).__name__}({shown}){hooked}"


def _own_inversion(wrapper: BatchedDistance) -> bool:
    """Whether a ``BatchedDistance`` ranks otherwise than its distance: an ``is_inverted``
    set on the wrapper (PML's ``CustomKNN`` reads the wrapper's)."""
    return bool(wrapper.is_inverted) != bool(wrapper.distance.is_inverted)


def resolve_distance(distance: BaseDistance | None) -> tuple[Metric, bool] | None:
    """Map a PML distance to ``(metric, normalize)`` of :func:`exact_knn`, or None.

    The metric reproduces what PML's k-nn returns as ``knn_distances``: ``None``
    is PML's default ``FaissKNN`` (``IndexFlatL2``: squared Euclidean on the raw
    embeddings); ``LpDistance(p=2)`` gives the distance (``power=1``) or its
    square (``power=2``); ``CosineSimilarity`` and ``DotProductSimilarity`` the
    similarity. Any other distance (other ``p``, ``power``, SNR, ...) gives
    ``None``: it is run by PML's own ``CustomKNN``.

    Raises:
        TypeError: ``distance`` is not a PML ``BaseDistance``.
    """
    if distance is None:
        return "sqeuclidean", False
    if isinstance(distance, BatchedDistance):
        if not runs_as_its_class(distance) or _own_inversion(distance):  # (the wrapper is
            return None  # what PML's CustomKNN calls and reads is_inverted from)
        distance = distance.distance
    if not isinstance(distance, BaseDistance):
        raise TypeError(f"distance must be a PML BaseDistance, got {type(distance).__name__}")
    if not runs_as_its_class(distance):  # a hook or a method replaced on it: PML's call
        return None  # (CustomKNN) runs it, and so gives what it changes
    normalize = bool(distance.normalize_embeddings)
    similarity = type(distance) in (CosineSimilarity, DotProductSimilarity)
    if bool(distance.is_inverted) != similarity:  # (PML's constructors set it; one changed
        return None  # in place ranks the other way: PML's CustomKNN then runs it)
    if similarity and distance.power == 1 and (not normalize or distance.p == 2):
        return "dot", normalize
    if type(distance) is LpDistance and distance.p == 2 and distance.power in (1, 2):
        return ("euclidean" if distance.power == 1 else "sqeuclidean"), normalize
    return None


def describe_knn(knn_func: object) -> str:
    """A k-nn function (or a distance) as a message shows it: its distance; a ``FaissKNN``
    with its index and reset settings, e.g. ``FaissKNN(index_init_fn=IndexHNSWFlat,
    reset_after=False)``; else its class's name."""
    if isinstance(knn_func, (BaseDistance, BatchedDistance)):
        return describe_distance(knn_func)
    distance = getattr(knn_func, "distance", None)
    if isinstance(distance, (BaseDistance, BatchedDistance)):
        return describe_distance(distance)
    if isinstance(knn_func, FaissKNN):
        init = knn_func.index_init_fn
        shown = [f"index_init_fn={getattr(init, '__name__', repr(init))}"] if init else []
        shown += [
            f"{flag}=False"
            for flag in ("reset_before", "reset_after")
            if not getattr(knn_func, flag)
        ]
        return f"{type(knn_func).__name__}({', '.join(shown)})"
    return type(knn_func).__name__


def resolve_faiss_knn(knn_func: FaissKNN) -> tuple[Metric, bool] | None:
    """``(metric, normalize)`` of a PML ``FaissKNN`` whose index is a flat L2 or
    inner-product index made afresh for each search and dropped after it; ``None`` for
    any other index, with ``reset_before=False``, where PML searches the index the user
    put in ``knn_func.index``, and with ``reset_after=False``, where PML leaves the
    reference's index in ``knn_func.index`` for the user (run by faiss as in PML)."""
    import faiss

    if _changes_index(knn_func):
        return None
    init = knn_func.index_init_fn
    if init in (None, faiss.IndexFlatL2):
        return "sqeuclidean", False
    if init is faiss.IndexFlatIP:
        return "dot", False
    return None


#: PML's positional parameters of its k-nn metrics (P@1 and MRR; R-Precision, MAP@R, MAP)
_PML_ARGS_AT_1 = ("knn_labels", "query_labels", "not_lone_query_mask", "label_counts")
_PML_ARGS_AT_R = (
    "knn_labels",
    "query_labels",
    "not_lone_query_mask",
    "ref_includes_query",
    "label_counts",
)


def _pml_positional(*names: str):
    """Let a ``calculate_*`` method take PML's positional arguments (a subclass may call
    ``super().calculate_x(knn_labels, query_labels, ...)``), as keywords; each of them is
    required, as in PML's signature (``TypeError`` naming those left out)."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args: Any, **kwargs: Any):
            if len(args) > len(names):
                raise TypeError(
                    f"{method.__name__}() takes at most {len(names)} positional arguments "
                    f"({', '.join(names)}), got {len(args)}"
                )
            for name, value in zip(names, args, strict=False):
                if name in kwargs:
                    raise TypeError(f"{method.__name__}() got multiple values for {name!r}")
                kwargs[name] = value
            missing = [name for name in names if name not in kwargs]
            if missing:  # PML's signature requires each (no default)
                raise TypeError(
                    f"{method.__name__}() missing required argument(s): "
                    + ", ".join(repr(name) for name in missing)
                )
            return method(self, **kwargs)

        return wrapper

    return decorate


class RetrievalAccuracyCalculator(AccuracyCalculator):
    """Exact retrieval accuracy: PML's metrics plus Recall@K, on any data and device.

    A drop-in :class:`pytorch_metric_learning.utils.accuracy_calculator.AccuracyCalculator`
    (testers and hooks accept it) whose k-nn equals a float64 brute force, ties
    to the lower index (:func:`~.knn.exact_knn`; under a cosine, ties of the
    normalized rows' values). Recall@K is the papers'
    definition: a query counts if one of its ``K`` nearest references shares its
    label. A negative index from a user's ``knn_func`` (faiss's ``-1``, the padding
    of a list an approximate index could not fill) is no neighbour.

    .. math::

        \\mathrm{Recall@K} = \\frac{1}{Q} \\sum_i \\max_{j < K} [y_{n_{ij}} = y_i]

    The k-nn depth is what the requested metrics need: PML's ``k`` rule
    (``None``: every reference, ``"max_bin_count"``: the largest class) when one
    of PML's k-nn metrics is requested, else the largest requested Recall@K. When
    those metrics are only P@1, R-Precision and MAP@R, which read a query's first
    ``R`` neighbours, a ``k`` beyond the largest ``R`` is cut to it: the same values
    (the exact lists are prefixes of each other), so PML's default ``k=None`` costs
    what ``"max_bin_count"`` does (MAP and MRR over the whole list still rank it all);
    P@1 alone is cut to one neighbour.

    Args:
        include, exclude, avg_of_avgs, return_per_class, kmeans_func: as in PML.
        k: as in PML; beyond the references available (``N``, or ``N - 1`` when the
            reference set holds the queries) it is cut to them, where PML's faiss pads
            the lists with index ``-1`` (which reads the last reference's label).
        label_comparison_fn: as in PML: ``f(a, b)`` compares a ``(Q, 1[, L])`` with a
            ``(Q, k[, L])`` label tensor and returns ``(Q, k)`` booleans (and, for the
            relevant counts, one distinct query label ``(1[, L])`` with the reference
            labels ``(N[, L])``, as PML calls it); labels may then be ``(N, L)`` or
            real-valued. Relevant counts, lone queries and per-class
            averages follow PML's rules (:mod:`.label_matching`), but for one case: a
            comparison that is not reflexive may keep a query with no relevant
            reference, whose at-``R`` metrics are then NaN or inf; that spoils only its
            own class's average here, where PML's masked product spoils every class's.
            Clustering metrics are refused, as in PML. ``None``: labels compared for
            equality.
        device: where to compute; ``None`` means the device of the query.
        knn_func: as in PML. ``None``, a ``FaissKNN`` with a flat L2 or inner-product index, or
            a ``CustomKNN`` over ``LpDistance(p=2)``, ``CosineSimilarity`` or
            ``DotProductSimilarity`` run the exact k-nn with that k-nn's ``knn_distances`` (squared
            L2 for faiss's ``IndexFlatL2``); any other callable, subclasses of those two classes and
            a ``FaissKNN`` with ``reset_before=False`` (which searches its own ``index``) or
            ``reset_after=False`` (which keeps the reference's index in ``knn_func.index`` after the
            call) included, is used as PML uses it (on float32 copies of the embeddings). Which
            search runs is decided again at each ``get_accuracy`` (PML calls the object each time: a
            distance or ``knn_func`` changed in place after it was given counts). When a Recall@K
            needs deeper lists than PML's ``k``, such a ``knn_func`` is called at both depths, PML's
            metrics getting the call at PML's ``k`` as in PML; a ``FaissKNN(reset_before=False)``,
            whose index is state, is called once, and PML's metrics read its first ``k``; every
            column a user's k-nn returns is read, as in PML, and its distances are passed on as it
            returns them. Metrics, a subclass's own included, get float32
            ``query``/``reference`` and the exact k-nn's ``knn_distances`` as in PML, and the
            labels as float32 (as PML casts them) where float32 holds every value; else
            float64: labels beyond 2^24, which float32 would merge, and real values such as 0.1,
            which PML rounds (a tolerance comparison at its threshold may then differ from PML's:
            2.13 - 1.13 is 1.0000001 in float32), also in ``label_comparison_fn``; a subclass's own
            ``calculate_recall_at_K`` replaces ours.
        recall_ks: the cut-offs ``K`` of the ``recall_at_K`` metrics.
        distance: a PML distance instead of ``knn_func`` (same mapping as a
            ``CustomKNN`` of it); default PML's default k-nn.
        block_rows: tile side of the exact k-nn (memory, not results).
        num_threads: torch CPU threads during the k-nn (default: unchanged).
        progress: show a tqdm bar over the k-nn tiles.
        backend: the exact k-nn's candidate selection, as in
            :func:`~pml_margins.evaluation.exact_knn`: ``"faiss"`` (binary heaps, CPU),
            ``"torch"`` (``torch.topk``, any device) or ``"auto"`` (faiss on CPU when
            installed). The results do not depend on it; a ``knn_func`` that runs as
            PML's (not the exact k-nn) takes only ``"auto"``.

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
        num_threads: int | None = None,
        progress: bool = False,
        backend: Backend = "auto",
    ) -> None:
        self.__dict__["_built"] = False  # (assignments below: the constructor's own)
        if label_comparison_fn is not None and not callable(label_comparison_fn):
            raise TypeError(
                "label_comparison_fn must be callable (a, b) -> booleans, "
                f"got {type(label_comparison_fn).__name__}"
            )
        self.recall_ks = check_recall_ks(recall_ks)
        # found by PML's calculate_<name> discovery in __init__; a subclass's own
        # calculate_recall_at_K stays (a metric of its own, by PML's k rule)
        self._own_recall_ks = self._own_recall_ks_of(self.recall_ks)
        self._bind_recall_methods()
        if isinstance(k, (bool, np.bool_)):  # (PML checks the rest)
            check_pml_k(k)
        avg_of_avgs = check_bool(avg_of_avgs, "avg_of_avgs")  # ("no" was taken as true)
        return_per_class = check_bool(return_per_class, "return_per_class")
        check_metric_names(include, exclude)
        block_rows = None if block_rows is None else check_int(block_rows, "block_rows")
        num_threads = None if num_threads is None else check_num_threads(num_threads)
        if distance is not None and knn_func is not None:
            raise ValueError("pass either distance or knn_func, not both")
        self.exact, custom = _resolve_search(distance, knn_func)
        self._device = None if device is None else _as_device(device)
        uses_faiss(backend, self._device or torch.device("cpu"))  # its checks
        if self._device is not None:
            _check_available(self._device)
        _check_backend_with(backend, custom)
        self.backend = backend
        self.distance = distance
        self.block_rows = block_rows
        self.num_threads = num_threads
        self.progress = progress
        #: the default k-means, the one whose input may be rescaled (see _kmeans_input)
        self._own_kmeans = None
        if kmeans_func is None:
            kmeans_func = FaissKMeans(niter=20, gpu=_faiss_gpu_usable(self._device))
            self._own_kmeans = kmeans_func
        super().__init__(
            include=tuple(include),
            exclude=tuple(exclude),
            avg_of_avgs=avg_of_avgs,
            return_per_class=return_per_class,
            k=k,
            label_comparison_fn=label_comparison_fn,  # PML refuses it with clustering metrics
            device=self._device or torch.device("cpu"),
            knn_func=custom,
            kmeans_func=kmeans_func,
        )
        self.custom_comparison = label_comparison_fn  # None: labels are compared for equality
        self.device = self._device
        self._custom_knn = custom  # None: the exact k-nn with ``self.exact``
        self.knn_func = knn_func  # as given (read back as PML's: the user's object)
        self._recall_ks_built = self.recall_ks  # (the metrics' names: see __setattr__)
        self.check_search(self.exact, custom)
        self._built = True

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A calculator pickled by an earlier version unpickles as it ran, later settings
        checked (:meth:`__setattr__`): before the search moved to ``_custom_knn``, its
        ``knn_func`` held the search (``None`` for the exact k-nn, whose ``knn_func`` given
        is lost: its ``distance`` is then the exact search's, so that either assigned as
        read back changes nothing); before later settings were checked, no ``_built``."""
        state = dict(state)
        if "_custom_knn" not in state:
            state["_custom_knn"] = custom = state.get("knn_func")
            state["knn_func"] = None if state.get("distance") is not None else custom
            if custom is None and state.get("distance") is None:
                state["distance"] = _distance_of(state.get("exact"))
        recall_ks = state.get("recall_ks", ())
        state.setdefault("_recall_ks_built", recall_ks)
        state.setdefault("_own_recall_ks", self._own_recall_ks_of(recall_ks))
        state.setdefault("backend", "auto")
        state.setdefault("_own_kmeans", None)  # (a later device then keeps its k-means)
        state.setdefault("_built", True)
        self.__dict__.update(state)
        # copy.copy hands over the state as it is: the metric methods (PML's function
        # dicts, our Recall@K partials) were the original's, with its settings, and did not
        # find the copy's call (Recall@K was cut at PML's k)
        self._bind_recall_methods()
        for name in ("original_function_dict", "curr_function_dict"):
            methods = self.__dict__.get(name)
            if isinstance(methods, dict):
                self.__dict__[name] = {m: getattr(self, f"calculate_{m}") for m in methods}

    def _bind_recall_methods(self) -> None:
        """This calculator's ``calculate_recall_at_K`` for each of its own cut-offs (found
        by PML's ``calculate_<name>`` discovery)."""
        for kk in self.__dict__.get("_own_recall_ks", ()):
            self.__dict__[f"calculate_recall_at_{kk}"] = functools.partial(self._recall, kk)

    def _own_recall_ks_of(self, recall_ks: Sequence[int]) -> tuple[int, ...]:
        """The cut-offs whose ``recall_at_K`` this class computes: all but those a subclass
        defines ``calculate_recall_at_K`` for (a metric of its own, by PML's k rule)."""
        return tuple(k for k in recall_ks if not hasattr(type(self), f"calculate_recall_at_{k}"))

    def check_search(self, exact: tuple[str, bool] | None, knn_func: Any) -> None:
        """``ValueError`` for a search that a subclass cannot run (default: any): the exact
        k-nn's ``(metric, normalize)`` with ``knn_func=None``, or ``exact=None`` and the
        ``knn_func`` run as PML's. Called at the end of the constructor, and after each
        setting assigned later (:data:`LATER_SETTINGS`; a refusal puts the calculator
        back as it was)."""

    def __setattr__(self, name: str, value: Any) -> None:
        """A constructor setting assigned after construction (:data:`LATER_SETTINGS`) is
        checked as the constructor checks it, and what the constructor derived from it
        follows (a bad value changes nothing): ``distance`` and ``knn_func`` (each
        replacing the other; either assigned as read back changes nothing), ``device``,
        ``label_comparison_fn``, ``k``, ``backend``, ``block_rows``, ``num_threads``,
        ``avg_of_avgs``/``return_per_class``. ``recall_ks`` names the
        calculator's metrics (PML lists them at construction): only its own value is
        taken (``AttributeError`` otherwise; build another calculator). A comparison
        assigned as read back (PML's ``EQUALITY`` where none was given) changes nothing;
        any other is the user's, as in the constructor. A new ``device`` moves the
        default k-means with it. A later ``recall_ks`` or ``distance`` was ignored,
        ``k = -3`` taken (P@1 0.0)."""
        built = self.__dict__.get("_built")
        if built and name in ("include", "exclude"):
            raise AttributeError(
                f"{name} is chosen at construction (PML's original_function_dict) or per "
                f"call (get_accuracy({name}=...)); a later assignment would be ignored"
            )
        if not (built and name in LATER_SETTINGS):
            super().__setattr__(name, value)
            return
        before = dict(self.__dict__)
        if name not in ("distance", "knn_func"):  # (those resolve the search themselves)
            self._follow_search()
        try:
            super().__setattr__(name, self._later_setting(name, value))
            state = self.__dict__  # (a subclass's check, on the new settings)
            self.check_search(state.get("exact"), state.get("_custom_knn"))
        except BaseException:
            self.__dict__.clear()  # a refused value changes nothing
            self.__dict__.update(before)
            raise

    def _later_setting(self, name: str, value: Any) -> Any:
        """The value an assigned setting ``name`` is held as, checked; derived state set."""
        state = self.__dict__
        if name == "recall_ks":
            built = state["_recall_ks_built"]
            if check_recall_ks(value) != built:
                raise AttributeError(
                    f"recall_ks is fixed at construction ({built}): it names the "
                    "calculator's metrics; build another calculator for other cut-offs"
                )
            return built
        if name == "k":
            return check_pml_k(value)
        if name in ("avg_of_avgs", "return_per_class"):
            value = check_bool(value, name)
            other = "return_per_class" if name == "avg_of_avgs" else "avg_of_avgs"
            if value and state.get(other):
                raise ValueError("avg_of_avgs and return_per_class are mutually exclusive")
            return value
        if name == "label_comparison_fn":
            if value is state.get(name, _DELETED):  # as read back (PML's EQUALITY when none
                return value  # was given)
            if value is not None and not callable(value):
                raise TypeError(f"label_comparison_fn must be callable, got {type(value).__name__}")
            # PML's rule, on the calculator's metrics (not a get_accuracy's include)
            if value is not None and set(self.requires_clustering()) & set(
                self.original_function_dict
            ):
                raise NotImplementedError("Unsupported: clustering + custom label comparison")
            state["custom_comparison"] = value
            return EQUALITY if value is None else value
        if name == "device":
            device = None if value is None else _as_device(value)
            uses_faiss(state.get("backend", "auto"), device or torch.device("cpu"))
            if device is not None:
                _check_available(device)
            own = state.get("_own_kmeans")
            if own is not None and state.get("kmeans_func") is own:  # the default k-means:
                own = FaissKMeans(niter=20, gpu=_faiss_gpu_usable(device))  # for the device
                state.update(kmeans_func=own, _own_kmeans=own)
            state["_device"] = device
            return device
        if name == "backend":
            uses_faiss(value, state.get("_device") or torch.device("cpu"))
            _check_backend_with(value, state.get("_custom_knn"))
            return value
        if name == "block_rows":
            return None if value is None else check_int(value, "block_rows")
        if name == "num_threads":
            return None if value is None else check_num_threads(value)
        # distance / knn_func: each replaces the other; None, as in the constructor, leaves
        # the other one's search -- so either assigned as read back changes nothing
        if value is None:
            distance = state.get("distance") if name == "knn_func" else None
            knn_func = state.get("knn_func") if name == "distance" else None
        else:
            distance, knn_func = (value, None) if name == "distance" else (None, value)
        exact, custom = _resolve_search(distance, knn_func)  # (again: a distance changed
        _check_backend_with(state.get("backend", "auto"), custom)  # in place: another search)
        state.update(exact=exact, distance=distance, knn_func=knn_func, _custom_knn=custom)
        return distance if name == "distance" else knn_func

    def refresh_search(self) -> None:
        """The search as ``distance``/``knn_func`` ask for it now (PML calls them at each
        search: one changed in place after it was given, ``LpDistance``'s
        ``normalize_embeddings`` set, a ``CustomKNN``'s ``distance`` replaced, counts),
        checked as the constructor checks it; a refused one changes nothing."""
        state = self.__dict__
        exact, custom = _resolve_search(state.get("distance"), state.get("knn_func"))
        _check_backend_with(state.get("backend", "auto"), custom)
        self.check_search(exact, custom)
        state.update(exact=exact, _custom_knn=custom)

    def _follow_search(self) -> None:
        """The search as ``distance``/``knn_func`` ask for it now (one changed in place),
        for a later setting's checks; left as it was where they cannot be resolved (the
        next ``get_accuracy`` names that; another setting, or a new ``distance`` or
        ``knn_func`` that replaces them, is still taken)."""
        state = self.__dict__
        try:
            exact, custom = _resolve_search(state.get("distance"), state.get("knn_func"))
        except (TypeError, ValueError):
            return
        state.update(exact=exact, _custom_knn=custom)

    def requires_knn(self) -> list[str]:
        return [*super().requires_knn(), *self._own_knn_metrics()]

    def _own_knn_metrics(self) -> list[str]:
        """The k-nn metrics this class adds to PML's."""
        return [
            "mean_reciprocal_rank",
            "num_excluded_queries",
            *(f"recall_at_{kk}" for kk in self._own_recall_ks),
        ]

    def _knn_metrics(self) -> set[str]:
        """Every metric that needs the k-nn: ``requires_knn`` (a subclass may list it
        without ``super()``, as PML's own list) and this class's own."""
        return {*self.requires_knn(), *self._own_knn_metrics()}

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
            TypeError: embeddings neither floating nor integer, labels complex,
                ``include``/``exclude`` not a tuple or list, ``ref_includes_query`` not
                a truth value (a bool, 0 or 1; a string such as ``"False"`` is refused).
            ValueError: empty sets, NaN/Inf, mismatched lengths or widths, or
                ``ref_includes_query`` with a reference that does not start with
                the query.
        """
        ref_includes_query = check_flag(ref_includes_query, "ref_includes_query")
        self._check_call_metrics(include, exclude)
        self.refresh_search()
        ignored = None
        if reference is None:  # PML then ignores reference_labels: the query's own, or an error
            if reference_labels is not None and reference_labels is not query_labels:
                ignored = reference_labels
            reference, reference_labels, ref_includes_query = query, query_labels, True
        elif reference_labels is None:
            raise ValueError("reference given without reference_labels")
        query_in = query
        query, device = self._checked_query(query)
        same = reference is query_in and reference_labels is query_labels
        if same:  # query = reference: check and compare once
            reference = query
        else:
            reference = as_embeddings(reference, "reference", query.shape[1]).to(device)
        query_labels = self.checked_labels(query_labels, len(query), "query_labels").to(device)
        reference_labels = (
            query_labels
            if same
            else self.checked_labels(reference_labels, len(reference), "reference_labels").to(
                device
            )
        )
        if not same:  # one dtype for both, the narrower (as PML's float32 cast compares)
            query_labels, reference_labels = at_common_precision(query_labels, reference_labels)
        if ignored is not None:
            self._check_ignored_reference_labels(ignored, query_labels)
        if ref_includes_query and not same:
            n = len(query)
            if len(reference) < n or not (
                torch.allclose(*common_float(query, reference[:n]))
                and torch.equal(query_labels, reference_labels[:n])
            ):
                raise ValueError(
                    "ref_includes_query=True needs the first len(query) rows of reference and "
                    "reference_labels to equal query and query_labels"
                )

        return self._compute(
            query, reference, query_labels, reference_labels, ref_includes_query, include, exclude
        )

    def _check_call_metrics(self, include: Sequence[str], exclude: Sequence[str]) -> None:
        """A call's ``include``/``exclude`` checked: their type (:func:`check_metric_names`),
        then ``ValueError`` for a name in ``include`` that this calculator does not compute
        (its construction's ``include``/``exclude``/``recall_ks``) or in ``exclude`` that
        no metric has (any ``recall_at_K`` allowed: another calculator's cut-off): PML drops
        them silently (``include=("recall_at_10",)`` with the default ``recall_ks``
        returned ``{}``)."""
        check_metric_names(include, exclude)
        computed = list(self.original_function_dict)
        unknown = [name for name in include if name not in computed]
        if unknown:
            self._refuse_call_metrics("include", unknown, computed)
        unknown = [
            name
            for name in exclude
            if name not in computed and not _RECALL_NAME.fullmatch(str(name))
        ]
        if unknown:  # (the class's calculate_* names, read only for such a name)
            prefix = "calculate_"
            known = {name[len(prefix) :] for name in dir(self) if name.startswith(prefix)}
            unknown = [name for name in unknown if name not in known]
        if unknown:
            self._refuse_call_metrics("exclude", unknown, computed)

    @staticmethod
    def _refuse_call_metrics(what: str, unknown: list, computed: list[str]) -> None:
        raise ValueError(
            f"get_accuracy's {what} names {unknown}, which this calculator does not "
            f"compute; it computes {computed} (set at construction by include, "
            "exclude and recall_ks)"
        )

    def _check_ignored_reference_labels(self, given: Any, query_labels: torch.Tensor) -> None:
        """``reference_labels`` given without ``reference``: PML ignores them; here they
        must equal the (checked) ``query_labels``, else a ``ValueError``."""
        given = self.checked_labels(given, len(query_labels), "reference_labels")
        if not torch.equal(*at_common_precision(given.to(query_labels.device), query_labels)):
            raise ValueError(
                "reference_labels given without reference, unlike query_labels (the "
                "query is its own reference set: pass reference too, or no labels)"
            )

    def checked_labels(self, labels: Any, length: int, name: str) -> torch.Tensor:
        """Labels as PML takes them: integer-valued ``(N,)`` for equality; with a custom
        ``label_comparison_fn``, ``(N,)`` or ``(N, L)`` numbers."""
        if self.custom_comparison is None:
            return as_labels(labels, length, name)
        return as_comparable_labels(labels, length, name)

    def _checked_query(self, query: Any) -> tuple[torch.Tensor, torch.device]:
        """The query as a checked tensor on the compute device, and that device."""
        query = as_embeddings(query, "query")
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
        # from here on the labels are PML's float32 (the user's comparison and metrics get them)
        same_labels = reference_labels is query_labels
        if same_labels:
            query_labels = reference_labels = as_pml_labels(query_labels)
        else:  # one dtype for both, which holds every label of both
            query_labels, reference_labels = as_pml_label_sets(query_labels, reference_labels)
        kwargs: dict[str, Any] = {
            "query": query,
            "reference": reference,
            "query_labels": query_labels,
            "reference_labels": reference_labels,
            "ref_includes_query": ref_includes_query,
            "label_comparison_fn": self.label_comparison_fn,
        }
        metrics = self.get_curr_metrics()
        matches = None
        if any(x in self._knn_metrics() for x in metrics):
            knn_kwargs, matches = self._knn_kwargs(**kwargs)
            kwargs.update(knn_kwargs)
        # the metrics (PML's k-means, a subclass's own) get float32 embeddings, as in PML
        # (the k-nn above ran on the given values)
        kwargs["query"] = query.float()
        kwargs["reference"] = kwargs["query"] if reference is query else reference.float()
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
            clustering = kwargs
            if (
                self.kmeans_func is not None
                and self.kmeans_func is self._own_kmeans
                and type(self).get_cluster_labels is AccuracyCalculator.get_cluster_labels
            ):  # our faiss k-means through PML's method: the input it can take
                clustering = {**kwargs, "query": _kmeans_input(query, kwargs["query"])}
            kwargs["cluster_labels"] = self.get_cluster_labels(**clustering)
        calls = _calls_in_progress()
        outer = calls.get(id(self))  # a metric that calls get_accuracy: its call's own
        calls[id(self)] = matches
        try:
            return self._get_accuracy(self.curr_function_dict, **kwargs)
        finally:
            if outer is None:
                calls.pop(id(self), None)
            else:
                calls[id(self)] = outer

    def knn_depth(self, bin_counts: torch.Tensor, num_reference: int, ref_includes_query: bool):
        """``(k_pml, k_total)``: PML's k for its metrics (``None`` if none is requested;
        it may be 0) and the depth of the k-nn (also covering the requested Recall@K)."""
        metrics = self.get_curr_metrics()
        available = num_reference - int(ref_includes_query)
        recalls = {f"recall_at_{kk}" for kk in self._own_recall_ks}
        other_knn = self._knn_metrics() - recalls - {"num_excluded_queries"}
        pml_rule = [m for m in metrics if m in other_knn]  # PML's and a subclass's own
        # what reads the lists PML's rule gives: every metric but ours and the clustering
        # ones (a subclass's metric that reads knn_labels without being in requires_knn too)
        not_readers = {*recalls, "num_excluded_queries", *self.requires_clustering()}
        readers = [m for m in metrics if m not in not_readers]
        k_pml = 0 if pml_rule else None
        wanted = [int(m.rsplit("_", 1)[1]) for m in metrics if m in recalls]
        if pml_rule and len(bin_counts):
            k_pml = min(self.determine_k(bin_counts, num_reference, ref_includes_query), available)
            if self._reads_first_r_only(readers):  # same values from the first max R
                if set(readers) == {"precision_at_1"}:  # the first (and what Recall@K reads:
                    first = max([1, *wanted])  # the lists handed over reach it)
                else:
                    first = max(1, int(bin_counts.max()) - int(ref_includes_query))
                k_pml = min(k_pml, first)
            k_pml = max(k_pml, 0)
        return k_pml, max(0, min(max([k_pml or 0, *wanted]), available))

    def _reads_first_r_only(self, metrics: list[str]) -> bool:
        """Whether every metric given is one of ours that reads a query's first ``R``
        neighbours only (:data:`FIRST_R_METRICS`, not overridden) and the k-nn is the
        exact one: any ``k >= max R`` then gives the values of ``max R`` (PML's
        ``k=None`` the same as ``"max_bin_count"``), since its lists of a shorter
        depth are prefixes of the longer ones; P@1 alone reads the first neighbour only
        (:meth:`knn_depth` then ranks one)."""
        if self._custom_knn is not None:  # a user's k-nn: its shorter lists need not be prefixes
            return False
        base = RetrievalAccuracyCalculator
        return all(
            m in FIRST_R_METRICS
            and getattr(type(self), f"calculate_{m}") is getattr(base, f"calculate_{m}")
            for m in metrics
        )

    def _knn_kwargs(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        query_labels: torch.Tensor,
        reference_labels: torch.Tensor,
        ref_includes_query: bool,
        **_: Any,
    ) -> tuple[dict[str, Any], _Matches]:
        """PML's k-nn kwargs for the metrics, and this call's label matches, which
        :meth:`_kept` reuses for exactly these ``knn_labels`` and ``query_labels`` (a
        subclass may pass its own to the ``calculate_*`` methods); the full list for
        Recall@K."""
        if self.custom_comparison is None:
            label_count, relevant = M.relevant_counts(
                query_labels, reference_labels, ref_includes_query
            )
            not_lone = relevant > 0
            unique_query_labels, first = torch.unique(query_labels, return_inverse=True)
            bin_counts = torch.zeros(
                len(unique_query_labels), dtype=torch.long, device=query.device
            )
            bin_counts[first] = label_count
            lone_labels = unique_query_labels[bin_counts - int(ref_includes_query) <= 0]
        else:  # PML's rules under the user's comparison (label_matching)
            unique_query_labels, first, bin_counts, lone = custom_relevance(
                query_labels, reference_labels, ref_includes_query, self.custom_comparison
            )
            relevant = bin_counts[first] - int(ref_includes_query)
            not_lone = ~lone[first]
            lone_labels = unique_query_labels[lone]
        k_pml, k_total = self.knn_depth(bin_counts, len(reference), ref_includes_query)
        if not bool(not_lone.any()):
            LOGGER.warning("None of the query labels are in the reference set.")
        elif not bool(not_lone.all()):
            LOGGER.warning(
                "%d of %d queries have no other reference with their label and are excluded",
                int((~not_lone).sum()),
                len(query),
            )
        distances, indices = self._knn(query, reference, k_total, ref_includes_query)
        knn_labels = reference_labels[indices.to(reference_labels.device)]
        user_knn = self._custom_knn is not None  # (ours never pads with -1)
        match = self._matches(query_labels, knn_labels)
        if user_knn:
            match = _found(match, indices)
        shown = k_total if k_pml is None else k_pml  # PML's k, even 0, when its metrics are asked
        second_call = user_knn and shown < k_total and not _keeps_state(self._custom_knn)
        if user_knn and shown == k_total:  # PML's metrics read every column a user's k-nn
            shown = knn_labels.shape[1]  # returns, more or fewer than asked
        if not second_call and isinstance(distances, (torch.Tensor, np.ndarray)):
            distances = distances[:, :shown]
        shown_labels, shown_match, shown_indices = knn_labels[:, :shown], None, indices[:, :shown]
        if second_call:
            # a user's k-nn: its list at PML's k need not start its longer one (ties, an
            # approximate index), so PML's metrics get a call at PML's k, as in PML (not a
            # k-nn that keeps state between calls: its one list serves both)
            distances, indices = self._knn(query, reference, shown, ref_includes_query)
            shown_labels = reference_labels[indices.to(reference_labels.device)]
            shown_match = _found(self._matches(query_labels, shown_labels), indices)
            shown_indices = indices
        absent = shown_indices.to(match.device) < 0 if user_knn else None
        if self._custom_knn is None:  # PML's k-nn runs in float32, and so gives its distances
            distances = distances.float()
        knn_kwargs = {
            "label_counts": (unique_query_labels, bin_counts),
            "knn_labels": shown_labels,
            "knn_distances": distances,
            "lone_query_labels": lone_labels,
            "not_lone_query_mask": not_lone,
        }
        matches = _Matches(
            match,
            shown_match,
            relevant,
            query_labels,
            shown_labels,
            _versions(query_labels, shown_labels, unique_query_labels, bin_counts),
            (unique_query_labels, bin_counts),
            ref_includes_query,
            absent if absent is not None and bool(absent.any()) else None,
        )
        return knn_kwargs, matches

    def _matches(self, query_labels: torch.Tensor, knn_labels: torch.Tensor) -> torch.Tensor:
        """``(Q, k)``: whether each neighbour's label matches its query's (PML's argument order)."""
        if self.custom_comparison is None:
            return knn_labels == query_labels[:, None]
        a = query_labels[:, None]
        return compared(self.custom_comparison, a, knn_labels, tuple(knn_labels.shape[:2]))

    def _knn(
        self, query: torch.Tensor, reference: torch.Tensor, k: int, ref_includes_query: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        faiss_knn = type(self._custom_knn) is FaissKNN  # (a subclass's call is its own)
        if faiss_knn and k == 0 and not _changes_index(self._custom_knn):
            return _no_neighbours(query)  # no search (faiss refuses k=0), no state to change
        if self._custom_knn is not None:  # PML casts every input to float32
            query32 = _float32_for_knn_func(query, "query")
            reference = query32 if reference is query else _float32_for_knn_func(reference)
            # PML calls it even for k=0 (a FaissKNN then builds or adds to its index, kept
            # or dropped; a user's function may keep state too), and reads nothing of the
            # result then (every query is alone): faiss's at k=1
            asked = 1 if faiss_knn and k == 0 else k
            found = self._custom_knn(query32, asked, reference, ref_includes_query)
            if k == 0:
                return _no_neighbours(query)
            distances, indices = found  # the distances as returned (PML's metrics read
            return distances, _as_indices(indices)  # none), numpy indices as PML's indexing
        metric, normalize = self.exact
        return exact_knn(
            query,
            reference,
            k,
            metric=metric,
            normalize=normalize,
            exclude_self=ref_includes_query,
            block_rows=self.block_rows,
            num_threads=self.num_threads,
            backend=self.backend,
            progress=self.progress,
        )

    def _kept(self, kwargs: dict[str, Any], full_k: int = 0):
        """Match matrix, relevant counts and labels of the queries that are not lone.

        Works from this class's k-nn or from the kwargs PML documents for its
        ``calculate_*`` methods (``knn_labels``, ``query_labels``,
        ``not_lone_query_mask``, ``label_counts``, ``ref_includes_query``). ``full_k``:
        Recall@``full_k``'s depth, which lists of PML's ``k`` may not reach (``ValueError``).
        """
        labels, mask, knn_labels = (
            kwargs["query_labels"],
            kwargs["not_lone_query_mask"],
            kwargs["knn_labels"],
        )
        own = _calls_in_progress().get(id(self))
        if own is not None and own.describes(kwargs, trust_inference=full_k):
            match, relevant = own.full, own.relevant
            if not full_k:
                match = match[:, : knn_labels.shape[1]] if own.shown is None else own.shown
        else:  # a direct call (or a subclass's changed kwargs): PML's kwargs, checked
            given = checked_metric_kwargs(kwargs)
            labels, knn_labels = given.query_labels, given.knn_labels
            mask = checked_query_mask(mask, len(labels), labels.device)
            match = self._matches(labels, knn_labels)
            if own is not None and own.absent is not None and knn_labels is own.knn_labels:
                match = match & ~own.absent.to(match.device)  # (inference tensors, say)
            # a label absent from the counts: 0 (PML only zips them: sequences work too)
            counts = torch.cat([given.counts, given.counts.new_zeros(1)])
            relevant = counts[label_positions(given.unique, labels)]
            # never below 0 (a label absent from the counts: its at-R metrics are NaN)
            relevant = (relevant - int(given.ref_includes_query)).clamp_(min=0)
            if full_k:
                _check_recall_depth(full_k, knn_labels, kwargs)
        if mask.dtype == torch.bool and bool(mask.all()):
            return match, relevant, labels
        return match[mask], relevant[mask], labels[mask]

    def _aggregate(self, per_query_fn, kwargs: dict[str, Any], full_k: int = 0, **fn_kw):
        match, relevant, labels = self._kept(kwargs, full_k)
        if len(labels) == 0:
            return nan_accuracy(kwargs["label_counts"][0], self.return_per_class)
        per_query = per_query_fn(match, relevant, **fn_kw)
        return M.aggregate(per_query, labels, self.avg_of_avgs, self.return_per_class)

    def _recall(self, recall_k: int, **kwargs: Any) -> float | list[float]:
        return self._aggregate(
            lambda m, _r, k: M.recall_at_k(m, k), kwargs, full_k=recall_k, k=recall_k
        )

    @_pml_positional(*_PML_ARGS_AT_1)
    def calculate_precision_at_1(self, **kwargs: Any) -> float | list[float]:
        return self._aggregate(lambda m, _r: M.precision_at_1(m), kwargs)

    @_pml_positional(*_PML_ARGS_AT_R)
    def calculate_r_precision(self, **kwargs: Any) -> float | list[float]:
        return self._aggregate(M.r_precision, kwargs)

    @_pml_positional(*_PML_ARGS_AT_R)
    def calculate_mean_average_precision_at_r(self, **kwargs: Any) -> float | list[float]:
        return self._aggregate(M.average_precision_at_r, kwargs)

    @_pml_positional(*_PML_ARGS_AT_R)
    def calculate_mean_average_precision(self, **kwargs: Any) -> float | list[float]:
        return self._aggregate(M.average_precision, kwargs)

    @_pml_positional(*_PML_ARGS_AT_1)
    def calculate_mean_reciprocal_rank(self, **kwargs: Any) -> float | list[float]:
        """PML's ``mean_reciprocal_rank``, in float64 (PML's sums float32: the two differ
        in the 8th digit on large sets)."""
        return self._aggregate(lambda m, _r: M.reciprocal_rank(m), kwargs)

    def calculate_num_excluded_queries(self, not_lone_query_mask: torch.Tensor, **_: Any) -> int:
        """Queries left out of the k-nn metrics: no other reference has their label."""
        return int((~not_lone_query_mask).sum())

    def extra_repr(self) -> str:
        knn = self.exact if self._custom_knn is None else self._custom_knn
        return f"knn={knn}, k={self.k}, recall_ks={self.recall_ks}, device={self.device}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class _Matches(NamedTuple):
    """This class's label matches of one ``get_accuracy`` call, for :meth:`_kept`."""

    full: torch.Tensor  # (Q, k_total): every neighbour's match, Recall@K included
    shown: torch.Tensor | None  # (Q, k_pml) from a call at PML's k (a user's k-nn), or None
    relevant: torch.Tensor  # (Q,) relevant counts R
    query_labels: torch.Tensor  # the labels these are for
    knn_labels: torch.Tensor  # the knn_labels handed to the metrics
    versions: tuple[int, ...]  # of the four tensors when handed (in-place changes void reuse)
    label_counts: tuple[torch.Tensor, torch.Tensor]  # the label_counts handed to the metrics
    ref_includes_query: bool
    absent: torch.Tensor | None  # (Q, k_pml): knn_labels' padding (-1 indices), or None

    def describes(self, kwargs: dict[str, Any], trust_inference: bool = False) -> bool:
        """Whether these are the matches of the PML kwargs a ``calculate_*`` method got:
        the same objects, unchanged, that this class handed out (a subclass may pass its
        own ``knn_labels``, ``label_counts`` or ``ref_includes_query``). Inference tensors
        (``torch.inference_mode``) count no in-place changes: they are taken as unchanged
        only if ``trust_inference`` (Recall@K, which needs the lists beyond PML's ``k``
        that only these matches hold, and which only this class calls with them)."""
        labels, knn_labels, counts = (
            kwargs["query_labels"],
            kwargs["knn_labels"],
            kwargs["label_counts"],
        )
        tensors = (labels, knn_labels, *counts) if isinstance(counts, tuple) else ()
        if not trust_inference and any(t.is_inference() for t in tensors):
            return False
        return (
            labels is self.query_labels
            and knn_labels is self.knn_labels
            and isinstance(counts, tuple)
            and len(counts) == 2
            and all(a is b for a, b in zip(counts, self.label_counts, strict=True))
            and _versions(labels, knn_labels, *counts) == self.versions
            and bool(kwargs.get("ref_includes_query", False)) == self.ref_includes_query
        )


def _found(match: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``match`` false where ``indices`` is negative: faiss's ``-1``, the padding of a list
    an approximate index (a user's ``knn_func``) could not fill, is no neighbour (its
    label lookup reads the last reference's label, which PML's metrics count)."""
    found = indices.to(match.device) >= 0
    return (
        match
        if bool(found.all())
        else match & found.reshape(match.shape[:2] + (1,) * (match.ndim - 2))
    )


def _versions(*tensors: torch.Tensor) -> tuple[int, ...]:
    """The tensors' version counters (autograd's count of in-place changes); 0 for
    inference tensors (``torch.inference_mode``, Lightning's validation), which have none
    (see :meth:`_Matches.describes`)."""
    return tuple(0 if t.is_inference() else t._version for t in tensors)


def _float32_for_knn_func(x: torch.Tensor, name: str = "reference") -> torch.Tensor:
    """``x`` in float32, as PML's calculator hands it to a ``knn_func``; ``ValueError``
    where float64 values do not survive the cast: beyond float32's range anywhere (they
    would be +-inf), or every one below its normal range (0 or a few bits)."""
    if x.dtype == torch.float64 and x.numel():
        largest = float(x.abs().max())
        info = torch.finfo(torch.float32)
        if largest > info.max or 0 < largest < info.tiny:
            raise ValueError(
                f"{name}'s values (largest |x| {largest:.3g}) are outside float32's range "
                f"[{info.tiny:.3g}, {info.max:.3g}], and a knn_func gets them in float32 (as "
                "PML's calculator gives them): rescale the embeddings, or leave knn_func out "
                "for the exact k-nn (which takes float64)"
            )
    return x.float()


#: largest coordinate of the embeddings that faiss's float32 k-means takes as they are
#: (PML's input): inside, their squares and distances neither overflow nor underflow
KMEANS_RANGE = (2.0**-40, 2.0**40)


def check_metric_names(include: object, exclude: object) -> None:
    """``TypeError`` unless ``include`` and ``exclude`` are tuples or lists (PML's type: a
    str would be read letter by letter, and match no metric or every one containing it)."""
    for name, names in (("include", include), ("exclude", exclude)):
        if not isinstance(names, (tuple, list)):
            raise TypeError(f"{name} must be a tuple or list, got {type(names).__name__}")


def _kmeans_input(query: torch.Tensor, query32: torch.Tensor) -> torch.Tensor:
    """The float32 embeddings for the default faiss k-means of NMI/AMI (through PML's
    ``get_cluster_labels``; a user's ``kmeans_func`` or method gets PML's input):
    ``query32`` (``query`` in float32, as PML gives it) when its largest coordinate is in
    :data:`KMEANS_RANGE` or 0; else
    ``query`` scaled by a power of two to put it in ``[0.5, 1)`` (k-means is
    scale-equivariant and the scaling exact: the clusters of the data as given), where
    faiss's float32 sums overflowed (killing the process) or underflowed (one cluster);
    zero-width embeddings as one zero column (identical points either way: faiss divides
    by the width)."""
    if query.shape[1] == 0:
        return query32.new_zeros(len(query32), 1)
    # integers through their float32 copy: abs(-2^63) overflows int64, uint32 has no abs
    largest = float((query if query.is_floating_point() else query32).abs().max())
    if largest == 0 or KMEANS_RANGE[0] <= largest <= KMEANS_RANGE[1]:
        return query32
    exponent = math.frexp(largest)[1]
    return torch.ldexp(query.double(), torch.tensor(-exponent, device=query.device)).float()


def check_pml_k(k: object) -> int | str | None:
    """``k`` as PML takes it: a positive int, ``None`` or ``"max_bin_count"`` (not a bool)."""
    if isinstance(k, (bool, np.bool_)):
        raise TypeError(f"k must be a positive int, None or 'max_bin_count', got {k!r}")
    if not (isinstance(k, int) and k > 0) and k not in (None, "max_bin_count"):
        raise ValueError(
            f"k must be an integer greater than 0, or None, or 'max_bin_count', got {k!r}"
        )
    return k


def _distance_of(exact: Any) -> BaseDistance | None:
    """A PML distance whose exact search is ``exact`` (``(metric, normalize)``), ``None``
    for the default search (PML's ``FaissKNN``: squared L2) or an unknown one."""
    if not isinstance(exact, tuple) or exact == _resolve_search(None, None)[0]:
        return None
    metric, normalize = exact
    if metric == "dot":
        return CosineSimilarity() if normalize else DotProductSimilarity(normalize_embeddings=False)
    power = 2 if metric == "sqeuclidean" else 1
    return LpDistance(p=2, power=power, normalize_embeddings=bool(normalize))


def _resolve_search(distance: Any, knn_func: Any) -> tuple[Any, Any]:
    """``(exact, custom)``: the exact k-nn's ``(metric, normalize)`` for the search that
    ``distance`` or ``knn_func`` (at most one given) asks for, else ``None`` and the
    ``knn_func`` to run as PML's."""
    if knn_func is None and distance is not None:
        exact = resolve_distance(distance)
        return exact, None if exact else CustomKNN(distance)
    if type(knn_func) is CustomKNN:  # a subclass may search otherwise: run as given
        exact = resolve_distance(knn_func.distance)
        return exact, None if exact else knn_func
    if type(knn_func) is FaissKNN and knn_func.gpus is None:
        exact = resolve_faiss_knn(knn_func)
        return exact, None if exact else knn_func
    if knn_func is None:
        return resolve_distance(None), None
    if callable(knn_func):
        return None, knn_func
    raise TypeError(f"knn_func must be callable, got {type(knn_func).__name__}")


def _no_neighbours(query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, 0)`` distances and indices: the k-nn at ``k = 0``."""
    empty = torch.empty(len(query), 0, device=query.device)
    return empty, empty.long()


def _as_indices(indices: Any) -> torch.Tensor:
    """A user's k-nn indices as a tensor that indexes the labels as PML's indexing does:
    numpy integer arrays of any width or sign as int64 (torch takes them so when they
    index a tensor), anything else through ``torch.as_tensor``."""
    if isinstance(indices, np.ndarray) and indices.dtype.kind in "iu":
        return torch.from_numpy(indices.astype(np.int64))  # (a native, contiguous copy)
    return torch.as_tensor(indices)


def _changes_index(knn_func: Any) -> bool:
    """Whether a call of a ``knn_func`` run as PML's leaves its ``index`` other than it
    found it: a PML ``FaissKNN`` that adds the reference to the user's index
    (``reset_before=False``) or keeps the reference's index (``reset_after=False``)."""
    return isinstance(knn_func, FaissKNN) and not (knn_func.reset_before and knn_func.reset_after)


def _keeps_state(knn_func: Any) -> bool:
    """Whether a ``knn_func`` run as PML's keeps state between calls, so that
    ``get_accuracy`` calls it once, as PML does: a PML ``FaissKNN`` with
    ``reset_before=False`` adds the reference to the index the user put in it (a second
    call would search it twice over) and, with ``reset_after``, drops it after a call."""
    return isinstance(knn_func, FaissKNN) and not knn_func.reset_before


def _check_backend_with(backend: str, custom: Any) -> None:
    """``ValueError`` for a ``backend`` other than ``"auto"`` with a ``knn_func`` run as PML's."""
    if backend != "auto" and custom is not None:
        raise ValueError(
            f"backend={backend!r} selects the exact k-nn's candidate pass, but "
            f"{describe_knn(custom)} runs as PML's knn_func; leave backend='auto'"
        )


def _as_device(device: object) -> torch.device:
    """``device`` as a ``torch.device`` (what ``torch.device`` takes: a str, a device, an
    accelerator index), else ``ValueError`` (``TypeError`` for another type)."""
    if not isinstance(device, (str, torch.device)):
        index = as_int(device)  # an accelerator index (Python, numpy or 0-dim tensor)
        if index is None:
            raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
        device = index
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise _unavailable(device, error) from None


def _check_available(device: torch.device) -> None:
    """``ValueError`` with torch's reason where this build or machine lacks ``device``
    (``'cuda'`` on a CPU build: the first ``get_accuracy`` failed inside torch)."""
    if device.type == "meta":
        raise ValueError("device 'meta' holds no values: the metrics need a real device")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ImportError) as error:  # hpu: a missing module
        raise _unavailable(str(device), error) from None


def _unavailable(device: object, error: BaseException) -> ValueError:
    return ValueError(
        f"device must name an available torch device such as 'cpu' or 'cuda:0', got "
        f"{device!r} ({error})"
    )


def _faiss_gpu_usable(device: torch.device | None) -> bool:
    if device is None or device.type != "cuda":
        return False
    import faiss

    return faiss.get_num_gpus() > 0


def common_float(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in one floating dtype that holds each exactly enough to compare (at least
    float32; an integer query is not truncated to by a float reference, nor the reverse)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype)


def check_recall_ks(values: object) -> tuple[int, ...]:
    """The cut-offs ``K`` of Recall@K, sorted and without repeats, from a sequence or 1-D
    array of positive integers (Python or numpy); else ``ValueError``."""
    error = ValueError(f"recall_ks must be a sequence of positive integers, got {values!r}")
    if isinstance(values, (str, bytes)) or not (
        isinstance(values, Sequence) or (isinstance(values, np.ndarray) and values.ndim == 1)
    ):
        raise error
    try:
        return tuple(sorted({check_int(v, "recall_ks") for v in values}))
    except ValueError:
        raise error from None
