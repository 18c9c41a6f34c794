"""Input checks of the retrieval evaluation: embeddings and labels as PML accepts them.

PML's ``AccuracyCalculator`` takes torch tensors or numpy arrays, floating or
integer-valued (its own tests use ``torch.arange``). These checks accept the same
and turn everything else into a ``TypeError``/``ValueError`` naming the argument,
before any kernel sees it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

from pml_margins.validation import FLOAT_DTYPE_NAMES, FLOAT_DTYPES, check_tensor

__all__ = [
    "as_comparable_labels",
    "as_embeddings",
    "as_int",
    "as_labels",
    "as_pml_label_sets",
    "as_pml_labels",
    "as_tensor",
    "at_common_precision",
    "check_int",
    "check_k",
    "check_knn",
    "label_dtype",
]

#: the metrics of the exact k-nn (:data:`.knn.Metric`)
METRICS: tuple[str, ...] = ("euclidean", "sqeuclidean", "dot")


def as_tensor(x: object, name: str) -> torch.Tensor:
    """``x`` as a tensor (numpy arrays are wrapped without a copy, unless in another
    byte order, reversed (negative strides) or of an integer dtype torch cannot compute with).

    Raises:
        TypeError: neither a ``torch.Tensor`` nor a ``numpy.ndarray``, a sparse tensor, or
            a numpy long double.
        ValueError: ``uint64`` values that int64 cannot hold (numpy or torch).
    """
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint64 and x.size and int(x.max()) >= 2**63:
            raise ValueError(
                f"{name} has uint64 values beyond int64 (>= 2^63): map them to integers first"
            )
        if x.dtype.kind in "ui" and x.dtype != np.uint8:
            x = x.astype(np.int64)  # torch lacks uint16/32/64 arithmetic
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name} must hold numbers, got a numpy array of dtype {x.dtype}")
        if x.dtype.kind == "f" and x.dtype.itemsize > 8:  # long double: no torch dtype
            raise TypeError(
                f"{name} must be float16, float32 or float64 (or integers), got a numpy array "
                f"of dtype {x.dtype}: convert it with .astype(numpy.float64)"
            )
        if not x.dtype.isnative:  # big-endian data (torch reads native byte order only)
            x = x.astype(x.dtype.newbyteorder("="))
        if any(stride < 0 for stride in x.strides):  # a reversed view (x[::-1]): torch
            x = np.ascontiguousarray(x)  # wraps non-negative strides only
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        check_tensor(x, name)
        if x.dtype == torch.uint64 and bool(x.view(torch.int64).lt(0).any()):
            raise ValueError(  # (as numpy's: .long() wrapped them to negative numbers)
                f"{name} has uint64 values beyond int64 (>= 2^63): map them to integers first"
            )
        if x.is_floating_point() and x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must have an integer dtype or {FLOAT_DTYPE_NAMES}, got {x.dtype}"
            )
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def as_embeddings(
    x: object, name: str, width: int | None = None, width_name: str = "the query's width"
) -> torch.Tensor:
    """A checked ``(N, D)`` real tensor: floating or integer (bool as 0/1), finite, non-empty.

    Raises:
        TypeError: not a tensor/array, or a complex dtype.
        ValueError: not 2-D, no rows, wrong width, or NaN/Inf values.
    """
    t = as_tensor(x, name)
    if t.is_complex():
        raise TypeError(f"{name} must have a floating, integer or bool dtype, got {t.dtype}")
    if t.dtype == torch.bool:  # binary codes: 0/1, as PML's cast to float gives
        t = t.to(torch.uint8)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_embeddings, dim), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: it has no rows")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"{name} has width {t.shape[1]} but {width_name} is {width}")
    # min and max propagate NaN and are finite only if every value is (one pass, no mask)
    if (
        t.is_floating_point()
        and t.numel()
        and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())
    ):
        raise ValueError(f"{name} contains NaN or Inf values")
    return t.detach()


def as_labels(x: object, length: int, name: str) -> torch.Tensor:
    """Checked ``(length,)`` labels for equality, as PML compares them: integers as int64;
    floats (whole or not: ``3.0``, ``0.5``) as given, float16/bfloat16 as float32, which
    holds them exactly. The dtype follows the input's alone (not its values), so that
    every rank of a sharded evaluation gathers the same.

    Raises:
        TypeError: not a tensor/array, or a complex dtype (bool labels are 0/1).
        ValueError: not 1-D, a length other than ``length``, or NaN/Inf.
    """
    t = _label_tensor(x, length, name, (1,), "hold real numbers")
    if t.is_floating_point():
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
        return t.float() if torch.finfo(t.dtype).bits < 32 else t
    return t.long()


def label_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype in which labels of these dtypes are compared: the narrowest floating
    dtype among them, float32 at the least (PML compares every label in float32: a
    float32 ``0.2`` and a float64 ``0.2`` match there, and a float32 label cannot tell
    apart the values that round to it), or int64 when none is floating."""
    floats = [d for d in dtypes if d.is_floating_point]
    if not floats:
        return torch.int64
    return max(min(floats, key=_bits), torch.float32, key=_bits)


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def at_common_precision(*labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Checked labels (query, reference) in :func:`label_dtype` of theirs."""
    dtype = label_dtype([t.dtype for t in labels])
    return tuple(t.to(dtype) for t in labels)


def as_comparable_labels(x: object, length: int, name: str) -> torch.Tensor:
    """Checked labels for a custom ``label_comparison_fn``: ``(length,)`` or ``(length, L)``
    finite numbers (PML hands them to the user's function; integers come as int64).

    Raises:
        TypeError: not a tensor/array, or a complex dtype (bool labels are 0/1).
        ValueError: not 1-D or 2-D, a length other than ``length``, or NaN/Inf values.
    """
    t = _label_tensor(x, length, name, (1, 2), "hold real numbers")
    if t.is_floating_point():
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
        return t
    return t.long()


def as_pml_labels(labels: torch.Tensor) -> torch.Tensor:
    """Checked labels as PML hands them to the metrics and to ``label_comparison_fn``:
    float32 (PML casts them so), where every value stays exact; else float64 where every
    value does (labels beyond 2^24, which float32 would merge, and real values such as
    0.1, which it would round); else unchanged (int64 labels beyond 2^53). Comparisons
    and counts are those of the labels as given."""
    return as_pml_label_sets(labels)[0]


def as_pml_label_sets(*labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Label sets of one dtype (query and reference) in the one dtype of
    :func:`as_pml_labels` that holds every value of every set exactly, so that they stay
    comparable (an int64 set beyond 2^53 keeps the others int64)."""
    for dtype, whole in ((torch.float32, 2**24), (torch.float64, 2**53)):
        if all(_exact_in(t, dtype, whole) for t in labels):
            return tuple(t.to(dtype) for t in labels)
    return labels


def _exact_in(labels: torch.Tensor, dtype: torch.dtype, whole: int) -> bool:
    """Whether every label keeps its value in ``dtype`` (``whole``: its exact integers)."""
    if labels.dtype == dtype or labels.numel() == 0:
        return True
    if labels.is_floating_point():
        if torch.finfo(labels.dtype).bits <= torch.finfo(dtype).bits:
            return True
        return bool((labels.to(dtype).to(labels.dtype) == labels).all())
    return -whole <= int(labels.min()) and int(labels.max()) <= whole


def _label_tensor(
    x: object, length: int, name: str, dims: tuple[int, ...], kind: str
) -> torch.Tensor:
    """``x`` as a tensor of ``length`` rows with ``ndim`` in ``dims``, not bool or complex;
    else a ``ValueError``/``TypeError`` that says which (``kind``: what its dtype must)."""
    t = as_tensor(x, name)
    if t.ndim not in dims:
        shape = " or ".join(f"{d}-D" for d in dims) + (" (one row per sample)" if 2 in dims else "")
        raise ValueError(f"{name} must be {shape}, got shape {tuple(t.shape)}")
    if t.shape[0] != length:
        raise ValueError(f"{name} has length {t.shape[0]} but there are {length} embeddings")
    if t.is_complex():
        raise TypeError(f"{name} must {kind}, got {t.dtype}")
    return t.long() if t.dtype == torch.bool else t  # two classes, as PML's 0./1.


def check_int(value: object, name: str, low: int = 1, high: float = math.inf) -> int:
    """``value`` as an ``int`` if it is an integer (Python, numpy or a 0-dim integer
    tensor; not a bool) in ``[low, high]``, else ``ValueError``."""
    number = as_int(value)
    if number is None or not low <= number <= high:
        if high < math.inf:
            span = f"an integer in [{low}, {high}]"
        else:
            span = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {span}, got {value!r}")
    return number


def as_int(value: object) -> int | None:
    """``value`` as an ``int`` when it is an integer other than a bool, else ``None``."""
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, torch.Tensor) and (value.dtype == torch.bool or value.ndim)
    ):
        return None
    try:
        return operator.index(value)  # int, numpy integers, 0-dim integer tensors
    except TypeError:
        return None


def check_k(k: object, available: int) -> int:
    """``k`` as an int in ``[0, available]``, else ``ValueError``."""
    return check_int(k, "k", 0, available)


def check_knn(
    k: object,
    metric: object,
    exclude_self: bool,
    num_queries: int,
    num_references: int,
    block_rows: object = None,
) -> tuple[int, int | None]:
    """The arguments of an exact k-nn (:mod:`.knn`, single-process or sharded) besides
    the embeddings: ``ValueError`` for a metric not in :data:`METRICS`, ``exclude_self``
    with fewer references than queries, ``k`` outside ``[0, num_references -
    exclude_self]`` or a ``block_rows`` neither ``None`` nor a positive int; else
    ``(k, block_rows)`` as Python ints (numpy and 0-dim tensor integers accepted)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if exclude_self and num_references < num_queries:
        raise ValueError("exclude_self needs the reference set to start with the query set")
    k = check_k(k, num_references - int(exclude_self))
    return k, None if block_rows is None else check_int(block_rows, "block_rows")
