r"""Center loss (Wen et al., ECCV 2016) as pure functions.

.. math::
    L_C = \frac12 \sum_{i=1}^{B} \lVert x_i - c_{y_i} \rVert_2^2

and the paper's center update (its Eq. 4 and Algorithm 1):

.. math::
    \Delta c_j = \frac{\sum_{i} \delta(y_i = j)\,(c_j - x_i)}{1 + \sum_i \delta(y_i = j)},
    \qquad c_j \leftarrow c_j - \alpha\,\Delta c_j
"""

from __future__ import annotations

import torch

from pml_margins.functional.margin_softmax import compute_dtype
from pml_margins.functional.saved_inputs import outside_inference
from pml_margins.validation import (
    caller_checked,
    check_embeddings,
    check_function_inputs,
    check_function_result,
    check_unit_interval,
    function_value_checks,
)

__all__ = ["center_distances", "center_ema_update"]


def center_distances(
    embeddings: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    r"""Per-sample :math:`\tfrac12\lVert x_i - c_{y_i}\rVert^2`.

    Args:
        embeddings: ``(B, D)`` features :math:`x_i`.
        centers: ``(C, D)`` class centers.
        labels: ``(B,)`` integer labels in ``[0, C)``.

    Returns:
        ``(B,)`` losses in ``compute_dtype`` of the promoted input dtype; their sum is
        the paper's :math:`L_C`. Gradients flow to ``embeddings`` and to ``centers``
        (only the gathered rows).
    """
    _check_centers(embeddings, centers, labels)
    dtype = compute_dtype(torch.promote_types(embeddings.dtype, centers.dtype))
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        index = outside_inference(labels.long())  # (autograd saves an index)
        diff = embeddings.to(dtype) - centers.to(dtype).index_select(0, index)
        # d (d / 2): the bits of d^2 / 2 (halving is exact), without d^2 overflowing first
        losses = (diff * (0.5 * diff)).sum(dim=1)
    check_function_result(losses, _overflow_error("center_distances", "1/2 |x - c|^2"))
    return losses


def _overflow_error(function: str, what: str):
    """The error of a result that overflowed from finite input."""
    return lambda: ValueError(
        f"{function} gave non-finite values from finite embeddings and centers: {what} "
        "overflowed the compute dtype; scale them down"
    )


def _check_centers(embeddings: object, centers: object, labels: object) -> None:
    """``(C, D)`` finite centers; ``(B, D)`` finite embeddings with ``(B,)`` labels in
    ``[0, C)`` (values: see :func:`~pml_margins.validation.check_function_inputs`)."""
    if caller_checked():  # a CenterLoss forward checked them (and its centres are its own)
        return
    checks = function_value_checks()  # the centers' values and the batch's, in one read
    centers = check_embeddings(centers, "centers", checks=checks, norms_taken=False)
    num_classes, width = centers.shape
    check_function_inputs(  # (no norm is taken: the result's own check, for overflow)
        embeddings,
        labels,
        num_classes,
        width,
        width_name="the centers' width",
        checks=checks,
        norms_taken=False,
    )
    checks.run()


def center_ema_update(
    centers: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, alpha: float
) -> torch.Tensor:
    r"""The paper's center update on one mini-batch; returns the new centers.

    Args:
        centers: ``(C, D)`` current centers :math:`c_j`.
        embeddings: ``(B, D)`` features of the batch (used as constants).
        labels: ``(B,)`` integer labels in ``[0, C)``.
        alpha: the centers' learning rate :math:`\alpha \in (0, 1]`.

    Returns:
        ``(C, D)`` centers, in ``centers.dtype``, :math:`c_j - \alpha\Delta c_j`. Classes
        absent from the batch (:math:`n_j = 0`) are unchanged. Pure: ``centers`` is not
        modified, and nothing is differentiated (the inputs are detached).
    """
    alpha = check_unit_interval(alpha, "alpha")
    _check_centers(embeddings, centers, labels)
    c = centers.detach()
    # the embeddings' precision too (float64 gaps of a float32 centre), the centres' at the end
    dtype = compute_dtype(torch.promote_types(c.dtype, embeddings.dtype))
    with torch.autocast(device_type=c.device.type, enabled=False):
        c32 = c.to(dtype)
        idx = labels.long()
        # the paper's sum of (c_j - x_i): no n_j c_j - sum x_i, which overflows (or
        # cancels) where embeddings and centres are large and close
        gaps = c32.index_select(0, idx) - embeddings.detach().to(dtype)
        sums = torch.zeros_like(c32).index_add(0, idx, gaps)  # (out of place: vmap batches it)
        # (index_add of ones: torch.bincount reads the labels' maximum back to size its
        # result, a host sync per step on a GPU, and vmap has no batching rule for it)
        ones = torch.ones_like(idx, dtype=dtype).unsqueeze(1)
        counts = torch.zeros(c.shape[0], 1, dtype=dtype, device=c.device).index_add(0, idx, ones)
        new = (c32 - alpha * (sums / (1 + counts))).to(c.dtype)
    check_function_result(new, _overflow_error("center_ema_update", "a sum of c_j - x_i"))
    return new
