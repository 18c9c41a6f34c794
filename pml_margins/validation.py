"""Input checks shared by every loss and evaluator.

Every check raises a ``TypeError`` (wrong kind of object or dtype) or a
``ValueError`` (wrong shape, range or value) whose message names the argument
and what was expected, so that bad input never reaches a kernel where it would
become a device-side assert or a silent NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import torch

__all__ = [
    "check_choice",
    "check_class_labels",
    "check_embeddings",
    "check_in_interval",
    "check_indices_tuple",
    "check_labels",
    "check_non_negative",
    "check_positive",
    "check_reference",
]


def check_embeddings(
    embeddings: object,
    name: str = "embeddings",
    width: int | None = None,
    width_name: str = "embedding_size",
) -> torch.Tensor:
    """Check a ``(N, D)`` floating tensor with finite values and return it.

    ``width_name`` names what ``width`` comes from in the error message (for
    example the width of the query set when checking a reference set).

    Raises:
        TypeError: not a tensor, or not a floating dtype.
        ValueError: not 2-D, empty, wrong width, or containing NaN/Inf.
    """
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}")
    if not embeddings.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {embeddings.dtype}")
    if embeddings.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (batch_size, embedding_size), got shape {tuple(embeddings.shape)}"
        )
    if embeddings.shape[0] == 0:
        raise ValueError(f"{name} is empty: the batch has no rows")
    if width is not None and embeddings.shape[1] != width:
        raise ValueError(f"{name} has width {embeddings.shape[1]} but {width_name} is {width}")
    # A finite sum implies finite elements (NaN/Inf propagate); only a non-finite sum,
    # which may also be an overflow of finite values, needs the element-wise check.
    if not bool(torch.isfinite(embeddings.detach().sum())) and not bool(
        torch.isfinite(embeddings).all()
    ):
        raise ValueError(f"{name} contains NaN or Inf values")
    return embeddings


def check_labels(labels: object, length: int, name: str = "labels") -> torch.Tensor:
    """Check a 1-D integer label tensor of the given length and return it.

    Raises:
        TypeError: not a tensor, or not an integer dtype.
        ValueError: not 1-D, or its length differs from ``length``.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != length:
        raise ValueError(f"{name} has length {labels.shape[0]} but there are {length} embeddings")
    return labels


def check_class_labels(
    labels: object, length: int, num_classes: int, name: str = "labels"
) -> torch.Tensor:
    """Check integer class labels in ``[0, num_classes)``.

    Raises:
        TypeError / ValueError: as :func:`check_labels`, and ``ValueError`` when a
        label lies outside ``[0, num_classes)``.
    """
    labels = check_labels(labels, length, name)
    if labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes}) for num_classes={num_classes}, "
                f"got values in [{lo}, {hi}]"
            )
    return labels


def check_indices_tuple(
    indices_tuple: object,
    batch_size: int,
    ref_size: int | None = None,
) -> tuple[torch.Tensor, ...] | None:
    """Check a PML miner output: ``(a, p, n)`` triplets or ``(a1, p, a2, n)`` pairs.

    Anchors index the batch (``batch_size``); positives and negatives index the
    reference set (``ref_size``, the batch itself when ``None``).

    Raises:
        TypeError: not a tuple/list of integer tensors.
        ValueError: arity other than 3 or 4, mismatched lengths within a group,
            or an index out of range.
    """
    if indices_tuple is None:
        return None
    if not isinstance(indices_tuple, Sequence) or isinstance(indices_tuple, (str, bytes)):
        raise TypeError(
            "indices_tuple must be a tuple of tensors (a, p, n) or (a1, p, a2, n), "
            f"got {type(indices_tuple).__name__}"
        )
    if len(indices_tuple) not in (3, 4):
        raise ValueError(
            "indices_tuple must have 3 elements (anchors, positives, negatives) or 4 "
            f"(anchors1, positives, anchors2, negatives), got {len(indices_tuple)}"
        )
    ref_size = batch_size if ref_size is None else ref_size
    roles = ("a", "p", "n") if len(indices_tuple) == 3 else ("a1", "p", "a2", "n")
    for role, idx in zip(roles, indices_tuple, strict=True):
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"indices_tuple[{role}] must be a tensor, got {type(idx).__name__}")
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(f"indices_tuple[{role}] must be integer, got {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"indices_tuple[{role}] must be 1-D, got shape {tuple(idx.shape)}")
        bound = batch_size if role.startswith("a") else ref_size
        if idx.numel() > 0:
            lo, hi = (int(v) for v in torch.aminmax(idx))
            if lo < 0 or hi >= bound:
                raise ValueError(
                    f"indices_tuple[{role}] has indices in [{lo}, {hi}] "
                    f"but must lie in [0, {bound})"
                )
    groups = [indices_tuple] if len(indices_tuple) == 3 else [indices_tuple[:2], indices_tuple[2:]]
    for group in groups:
        if len({int(t.numel()) for t in group}) != 1:
            raise ValueError(
                "indices_tuple tensors that form one tuple must have equal lengths, got "
                f"{[int(t.numel()) for t in group]}"
            )
    return tuple(indices_tuple)


def check_reference(
    ref_emb: object,
    ref_labels: object,
    width: int,
    labels_required: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check the reference set of a pair-based loss (``ref_emb``, ``ref_labels``).

    ``ref_emb`` must be ``(R, width)`` like :func:`check_embeddings`; ``ref_labels``,
    when given, a 1-D integer tensor of length ``R``. ``ref_labels`` without
    ``ref_emb`` is an error, and so is ``ref_emb`` without ``ref_labels`` when the
    pairs have to be formed from labels (``labels_required``).

    Raises:
        TypeError / ValueError: as :func:`check_embeddings` and :func:`check_labels`,
        and ``ValueError`` for the missing halves described above.
    """
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels was given without ref_emb")
        return None, None
    ref_emb = check_embeddings(ref_emb, name="ref_emb")
    if ref_emb.shape[1] != width:
        raise ValueError(
            f"ref_emb has width {ref_emb.shape[1]} but the embeddings have width {width}"
        )
    if ref_labels is None:
        if labels_required:
            raise ValueError(
                "ref_emb was given without ref_labels: pass ref_labels, or an indices_tuple "
                "whose positives/negatives index ref_emb"
            )
        return ref_emb, None
    if not isinstance(ref_labels, torch.Tensor):
        raise TypeError(f"ref_labels must be a torch.Tensor, got {type(ref_labels).__name__}")
    if ref_labels.ndim == 1 and ref_labels.shape[0] != ref_emb.shape[0]:
        raise ValueError(
            f"ref_labels has length {ref_labels.shape[0]} but ref_emb has {ref_emb.shape[0]} rows"
        )
    return ref_emb, check_labels(ref_labels, ref_emb.shape[0], name="ref_labels")


def check_in_interval(
    value: object,
    name: str,
    low: float,
    high: float,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` as a float after checking it lies in the given interval.

    Raises:
        TypeError: not a real number.
        ValueError: NaN/Inf, or outside the interval (the message shows it).
    """
    value = _check_real(value, name)
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (above and below):
        lb, hb = ("[" if low_inclusive else "("), ("]" if high_inclusive else ")")
        raise ValueError(f"{name} must lie in {lb}{low}, {high}{hb}, got {value}")
    return value


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` after checking it is one of the strings ``choices``.

    Raises:
        TypeError: not a string.
        ValueError: not one of ``choices``.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_count(value: object, name: str) -> int:
    """Return ``value`` after checking it is an ``int`` >= 1 (``TypeError``/``ValueError``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_class_loss_input(
    loss_name: str,
    compared_with: str,
    num_classes: int,
    embedding_size: int,
    embeddings: object,
    labels: object,
    indices_tuple: object,
    ref_emb: object,
    ref_labels: object,
    hint: str = "",
) -> None:
    """The forward checks of a loss that compares embeddings with per-class vectors.

    Rejects ``ref_emb``/``ref_labels`` (naming what the loss compares with, then
    ``hint``), checks the embeddings' width, requires labels in ``[0, num_classes)``
    and checks a miner's ``indices_tuple`` against the batch.
    """
    if ref_emb is not None or ref_labels is not None:
        raise ValueError(
            f"{loss_name} compares embeddings with {compared_with}; ref_emb/ref_labels "
            f"are not supported{hint}"
        )
    embeddings = check_embeddings(embeddings, width=embedding_size)
    if labels is None:
        raise ValueError(f"{loss_name} requires labels")
    check_class_labels(labels, embeddings.shape[0], num_classes)
    check_indices_tuple(indices_tuple, embeddings.shape[0])


def check_positive(value: object, name: str) -> float:
    """Return ``value`` as a float after checking it is a finite real number > 0."""
    value = _check_real(value, name)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_non_negative(value: object, name: str) -> float:
    """Return ``value`` as a float after checking it is a finite real number >= 0."""
    value = _check_real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (Real, torch.Tensor)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
