r"""Hyper-parameter bounds from the CosFace paper (Wang et al., 2018, Sec. 3.4).

Both assume class weights spread uniformly over the unit hypersphere, the
optimum of the softmax objective.
"""

from __future__ import annotations

import math

from pml_margins.validation import check_count, check_real

__all__ = ["cosface_margin_upper_bound", "cosface_scale_lower_bound"]


def cosface_scale_lower_bound(num_classes: int, target_probability: float) -> float:
    r"""Smallest scale :math:`s` that lets class centres reach posterior :math:`P_W`.

    .. math::
        s \ge \frac{C-1}{C} \log\frac{(C-1)\,P_W}{1-P_W}

    Args:
        num_classes: :math:`C \ge 2`.
        target_probability: :math:`P_W \in (0, 1)`, the expected minimum posterior
            probability of the class centre (e.g. 0.9).

    Returns:
        The lower bound on ``s`` (unitless; the paper uses s = 64 for ~10k identities).
        It is negative, hence no constraint, when :math:`P_W \le 1/C`.

    Raises:
        ValueError: ``num_classes < 2`` or ``target_probability`` outside (0, 1).
    """
    c = _at_least_two(num_classes, "num_classes")
    target_probability = check_real(target_probability, "target_probability")
    if not 0 < target_probability < 1:
        raise ValueError(f"target_probability must lie in (0, 1), got {target_probability!r}")
    # log of each factor: math.log takes integers of any size, where a float of C overflows
    odds = math.log(target_probability) - math.log1p(-target_probability)
    return (c - 1) / c * (math.log(c - 1) + odds)


def cosface_margin_upper_bound(num_classes: int, embedding_size: int) -> float:
    r"""Largest cosine margin :math:`m` that uniformly spread classes can satisfy.

    .. math::
        m \le 1 - \cos\frac{2\pi}{C} \; (d = 2), \qquad
        m \le \frac{C}{C-1} \; (C \le d + 1), \qquad
        m \ll \frac{C}{C-1} \; (C > d + 1)

    With :math:`C \le d+1` the weights can form a regular simplex, whose pairwise
    cosine is :math:`-1/(C-1)`. For :math:`C > d+1` the paper gives no closed
    form, only that the bound is much smaller than :math:`C/(C-1)`; that value
    is returned as a strict, unattainable ceiling (CosFace uses m = 0.35).

    Args:
        num_classes: :math:`C \ge 2`.
        embedding_size: feature dimension :math:`d \ge 2`.

    Raises:
        ValueError: ``num_classes < 2`` or ``embedding_size < 2``.
    """
    num_classes = _at_least_two(num_classes, "num_classes")
    if _at_least_two(embedding_size, "embedding_size") == 2:
        # 2 sin^2(pi / C): 1 - cos(2 pi / C) without its cancellation at large C
        try:
            return 2 * math.sin(math.pi / num_classes) ** 2
        except OverflowError:  # C beyond a float: the bound underflows to 0, as it tends to
            return 0.0
    return num_classes / (num_classes - 1)


def _at_least_two(value: object, name: str) -> int:
    """``value`` as an ``int >= 2``: a Python or numpy integer or a one-element integer
    tensor, else ``ValueError``."""
    try:
        number = check_count(value, name)
    except (TypeError, ValueError):
        number = None
    if number is None or number < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
    return number
