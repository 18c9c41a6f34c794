r"""Partial FC (An et al., "Partial FC: Training 10 Million Identities on a Single Machine", 2021).

Each rank keeps the classes of its shard that occur among the gathered labels
(the positives) and a uniform random subset, without replacement, of its other
classes, so that it keeps ``max(#positives, round(sample_rate * C_local), 1)``
columns (:func:`num_sampled`). The loss is then the margin softmax over the *union of the kept
classes of all ranks* -- every target is in it:

.. math::
    L_i = -\log\frac{e^{s\psi(z_{i,y_i})}}
                    {e^{s\psi(z_{i,y_i})} + \sum_{j \in K\setminus\{y_i\}} e^{s z_{ij}}}

The draw is the single-process Partial FC's
(:func:`pml_margins.functional.fused_margin_softmax.sample_classes`) applied to
each shard: on one rank, with the same random stream, both keep the same
classes. With fewer negatives in the normalizer this is a lower bound on the full
loss, not an unbiased estimate of it; the paper finds that ``sample_rate=0.1``
keeps the accuracy of full training on face data while cutting the logits and
their gradients tenfold. Only the kept columns of ``W`` get a (non-zero) gradient. With
``sample_rate == 1`` no sampling happens at all and the full loss is computed.
"""

from __future__ import annotations

import torch

from pml_margins.functional.fused_margin_softmax import kept_columns
from pml_margins.validation import (
    check_generator,
    check_labels,
    check_non_negative_int,
    check_sample_rate,
)

__all__ = ["num_sampled", "sample_local_classes"]


def num_sampled(sample_rate: float, num_local: int) -> int:
    """``round(sample_rate * num_local)`` (Python's rounding, as the single-process
    :func:`~pml_margins.functional.fused_margin_softmax.sample_classes`), at least 1."""
    return max(1, min(num_local, round(sample_rate * num_local)))


def sample_local_classes(
    labels: torch.Tensor,
    class_start: int,
    num_local: int,
    sample_rate: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the columns of the local shard that take part in this step.

    Args:
        labels: the ``N`` gathered global labels.
        class_start: first global class of this rank's shard.
        num_local: number of classes in the shard.
        sample_rate: fraction in ``(0, 1]`` of the shard to keep.
        generator: random source for the negatives (on any device: the draw is made there
            and moved to the labels').

    Returns:
        ``index``: the kept local columns, sorted ascending (shape ``(K,)``), and
        ``target``: for each of the ``N`` rows the position of its label in
        ``index``, or ``-1`` where another rank owns the label.
    """
    sample_rate = check_sample_rate(sample_rate)  # (0, -1 and 7 were taken)
    rows = labels.shape[0] if isinstance(labels, torch.Tensor) and labels.ndim else 0
    labels = check_labels(labels, rows)  # (float labels were truncated, a list failed)
    class_start = check_non_negative_int(class_start, "class_start")
    num_local = check_non_negative_int(num_local, "num_local")  # (0: an empty shard)
    generator = check_generator(generator)
    local = labels.long() - class_start
    owned = (local >= 0) & (local < num_local)
    # each row's slot: its local class, or one past them where another rank owns it
    # (integer indices, no boolean indexing: no host read beyond the count below)
    slot = torch.where(owned, local, num_local)
    positive = torch.zeros(num_local + 1, dtype=torch.bool, device=labels.device)
    positive[slot] = True
    positive = positive[:num_local]
    sampled = num_sampled(sample_rate, num_local)
    keep = max(int(positive.sum()), sampled)
    if sampled >= num_local:  # no draw (sample_classes draws nothing either)
        index = torch.arange(num_local, device=labels.device)
    else:  # a draw even when the positives fill the shard: the same stream as sample_classes
        index = kept_columns(num_local, positive, keep, generator, labels.device)
    position = torch.full((num_local + 1,), -1, dtype=torch.long, device=labels.device)
    position[index] = torch.arange(index.numel(), device=labels.device)
    return index, position[slot]  # (the last slot stays -1)
