r"""Fused margin-softmax cross-entropy: the class-weight losses without ``(B, C)`` temporaries.

Computes, for embeddings :math:`x_i`, class weights :math:`W_j` (columns of the
``(D, C)`` matrix), optional bias :math:`b_j`, scale :math:`s_i` and target-logit
function :math:`\psi`,

.. math::
    z_{ij} = \hat x_i^\top \hat W_j,\qquad
    \ell_{ij} = s_i\,\phi(z_{ij}) + b_j \;(j \ne y_i),\qquad
    \ell_{iy_i} = s_i\,\psi(z_{iy_i}) + b_{y_i},\qquad
    L_i = \log\sum_j e^{\ell_{ij}} - \ell_{iy_i}

(hats: L2-normalized, when asked; :math:`\phi` the optional non-target function,
identity by default) -- the same value as
:func:`~pml_margins.functional.margin_softmax_cross_entropy` on the materialized
logits, in one :class:`torch.autograd.Function` with an analytic backward:

* the classes are processed in column blocks; the weight normalization, the
  target masking, the block max and ``exp`` all run on one block while it is in
  cache, and the normalization's backward is analytic and per block;
* the ``B`` target logits :math:`t_i = s_i\psi(z_{iy_i}) + b_{y_i}` are formed outside
  the blocked function by ordinary autograd from the detached target cosines, so
  :math:`\psi` may depend on anything else that has a gradient (per-row margins from
  feature norms, say); the blocked function takes :math:`t` as an input and returns
  :math:`\partial L/\partial t = p_{iy_i} - 1`, while the cosines' share,
  :math:`(p_{iy_i} - 1)\,s_i\psi'(z_{iy_i})`, is folded into its own blocks (no
  ``W``-sized gradient beside them);
* the row factors of the gradient (upstream gradient, scale) are folded into the
  ``(B, D)`` operands of the two backward products, never applied to ``(B, C)``.

**Non-target function** :math:`\phi` (``non_target_logit_fn``; CurricularFace's hard
negatives, the class-level Circle loss). It maps a ``(B, k)`` block of cosines ``z`` --
every row of the batch, any subset of the columns (a block, the Partial FC sample,
or all ``C``) -- to the unscaled logits, element-wise: entry ``(i, j)`` may depend on
``z[i, j]`` and on row ``i`` only, so it may close over per-row ``(B,)`` tensors
(used as ``v.unsqueeze(1)``). Those tensors and anything else it closes over are
**constants** here: detach them. (A problem small enough to materialize runs autograd
through :math:`\phi`, as :func:`margin_softmax_cross_entropy` does, and would give one
that requires grad a gradient; the blocked path gives it none.) Its derivative
:math:`\phi'(z)` comes from its ``slope(z)`` method when it has one (same shapes; see
:class:`NonTargetLogitFn`), else from autograd on the block. The forward applies
:math:`\phi` to each block's cosines before scaling; the backward multiplies the
block's probabilities by :math:`\phi'(z)` (the target entries are replaced as before).
In default mode the forward forms :math:`\phi(z)` and :math:`\phi'(z)` together and
the saved ``(B, C)`` buffer holds the block exponentials times the slope,
:math:`e^{\ell_{ij} - m_i}\phi'(z_{ij})`: the backward is then one element-wise pass
per block, as without :math:`\phi`. With a bias or a tensor scale (whose gradients
need the probabilities without the slope) the buffer holds the **cosines** ``z``
instead, and the backward re-forms :math:`\phi(z)`, the exponential and
:math:`\phi'(z)` from it (a few element-wise passes; no fourth matrix product).
Bounded mode recomputes ``z`` as it already does. With a tensor scale,
:math:`\partial L/\partial s_i` takes one more row-sum pass,
:math:`\sum_{j\ne y_i} p_{ij}\phi(z_{ij})`.

**Sub-centres** (``sub_centers=K``; Sub-center ArcFace). ``W`` is ``(D, C*K)`` in PML's
layout, column ``j*K + k`` for sub-centre ``k`` of class ``j``, and the class cosine is
:math:`z_{ij} = \max_k \hat x_i^\top \hat W_{jK+k}` (everything above then applies to
it). Blocks hold whole classes (``k*K`` columns, ``k`` classes per block for
``chunk_size=k``); each block's product is reduced to ``(B, k)`` by the maximum before
the scale, :math:`\phi`, the bias and the softmax, and the backward sends each class's
entry to its winning column (the first maximal one, as ``torch.max`` -- PML's plain
path -- does; the target's, to the winner among the ``B`` target cosines). A block's
product runs over its columns where they lie in ``W``; only where two sub-centres of a
class may be equal (their first 8 bytes coincide) is it one product per sub-centre
plane, copied out, so that equal columns give bit-equal cosines. Default mode saves,
besides the class-level ``(B, C)`` buffer, the winners as one byte per
``(i, j)``: re-forming them would take a fourth product of ``K*C`` columns, against one
``(B, C)`` byte copy in the forward and a scatter per block in the backward. Bounded
mode recomputes each block (and its winners), as it already does; Partial FC keeps or
drops whole classes. The three products have ``K*C`` columns (the floor at that size).

Modes:

* ``chunk_size=None`` (default): the block exponentials are kept for the backward
  in **one** ``(B, C)`` buffer; three matrix products in all (the floor).
* ``chunk_size=k`` or ``"auto"`` (bounded memory): nothing of size ``(B, C)`` is
  ever held; forward is an online log-sum-exp over blocks of ``k`` classes, the
  backward recomputes each block (a fourth matrix product). Activation memory is
  ``O(B·D + (B + D)·k)``, independent of ``C``.
* ``sample_rate < 1`` (partial FC, An et al., 2021): every class present in the
  batch plus a uniform random subset of the others, ``round(sample_rate·C)`` in
  all; only the sampled columns of ``W`` get a (non-zero) gradient.

**A scale decided from the cosines** (``scale`` a :data:`ScaleFromCosines` callable;
dynamic AdaCos): default mode only. The blocks' cosines are written into the
``(B, C)`` buffer first, the callable gets them and returns the scale, then one more
element-wise pass turns them into the scaled block exponentials: the three products
of the default mode, no fourth one for the statistics.

Under autocast (bf16/fp16) the matrix products run in the autocast dtype while the
log-sum-exp, the margins and every accumulation stay in float32; the storage
dtype of ``W`` never changes.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pml_margins.function_transforms import in_function_transform, is_batched, is_compiling
from pml_margins.functional.autograd_switch import (
    SOFTMAX_REMEDY,
    backward_once,
    plain_autograd_needed,
)
from pml_margins.functional.dense_margin_softmax import (
    NORM_EPS,
    check_norm_scale_form,
    dense_margin_softmax_cross_entropy,
    target_and_slope,
)
from pml_margins.functional.margin_softmax import (
    TargetLogitFn,
    autocast_off,
    check_scale,
    compute_dtype,
    elementwise_result,
    exp_in_place,
    float16_gradient_operand,
    float16_gradient_scale,
    products_dtype,
    row_norms,
    takes_unit_columns,
)
from pml_margins.functional.saved_inputs import outside_inference, save_inputs
from pml_margins.validation import (
    CHECKED_BY_CALLER,
    FLOAT_DTYPE_NAMES,
    FLOAT_DTYPES,
    caller_checked,
    check_bool,
    check_chunk_size,
    check_count,
    check_function_inputs,
    check_function_result,
    check_generator,
    check_labels,
    check_real,
    check_sample_rate,
    check_size,
    check_tensor,
    value_checks_enabled,
)

__all__ = [
    "DENSE_MAX_ELEMENTS",
    "MATERIALIZE_MAX_ELEMENTS",
    "FusedLogits",
    "NonTargetLogitFn",
    "ScaleFromCosines",
    "auto_chunk_size",
    "class_columns",
    "fused_margin_softmax_cross_entropy",
    "sample_classes",
]

ChunkSize = int | str | None
#: a scale decided from the step's cosines: given the ``(B, C)`` cosines (no graph, the
#: compute dtype) as column blocks in order (``torch.cat(blocks, 1)`` is the matrix;
#: valid only during the call), returns a float or a ``(B,)`` tensor
ScaleFromCosines = Callable[[list[torch.Tensor]], float | torch.Tensor]

#: ``F.normalize``'s default: norms below this are clamped (the gradient then ignores the norm)
_NORM_EPS = NORM_EPS
#: elements of one ``(B, k)`` block in default mode on CPU: about 4 MiB of fp32, cache-sized
_CPU_BLOCK_ELEMENTS = 1 << 20
#: default mode: block temporaries at most 1/this of the saved (B, C) buffer (small C)
_DEFAULT_BLOCK_FRACTION = 2
#: elements of the largest ``(B or D, k)`` temporary on an accelerator: 256 MiB of fp32
_DEVICE_BLOCK_ELEMENTS = 1 << 26
#: default mode materializes the (B, C) logits (the dense function, or autograd)
#: while ``B C + D C / 4`` (the logits, and W's share: the materialized path's column
#: norm of W is a strided reduction) is at most this; above it the blocked function's
#: fewer passes outweigh its per-block overhead (14 sizes with B*C in 6k-256k, D 128 and
#: 512, timed both ways: BENCHMARKS.md)
MATERIALIZE_MAX_ELEMENTS = 1 << 18
#: ... and the dense function also while ``D <= 2 B`` and both ``B C`` and ``D C`` are at
#: most this: with a batch as wide as the embeddings its few whole-matrix passes beat the
#: blocked function up to ~1M logits (26 sizes timed both ways: BENCHMARKS.md)
DENSE_MAX_ELEMENTS = 1 << 20


def _materializes(rows: int, width: int, columns: int, dense: bool, device: torch.device) -> bool:
    """Default mode's choice: the materialized ``(B, C)`` logits, or the blocked function.

    On an accelerator the step costs its op launches more than its passes over memory
    (an H200 at 256 x 512 x 10k: the dense function 2.3 ms, the blocked one 3.8 ms, the
    three products 0.25 ms): the logits are materialized while ``B C`` and ``D C`` are
    within one block's budget (:data:`_DEVICE_BLOCK_ELEMENTS`).
    """
    if device.type != "cpu":
        return max(rows, width) * columns <= _DEVICE_BLOCK_ELEMENTS
    if (rows + width // 4) * columns <= MATERIALIZE_MAX_ELEMENTS:
        return True
    return dense and width <= 2 * rows and max(rows, width) * columns <= DENSE_MAX_ELEMENTS


def _norm_scale(embeddings: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """``(B,)`` ``scale * |x_i|`` with its graph, in the compute dtype, outside autocast."""
    norms = row_norms(
        embeddings, compute_dtype(torch.promote_types(embeddings.dtype, weight.dtype))
    )
    return norms if scale == 1.0 else norms * scale


def dense_materializes(embeddings: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether default mode runs the dense function on these embeddings and class weights
    (one column per class, no non-target function): :func:`_materializes`."""
    rows, width = embeddings.shape
    return _materializes(rows, width, weight.shape[1], True, embeddings.device)


class NonTargetLogitFn(Protocol):
    r"""A non-target function :math:`\phi` that also gives its derivative (optional protocol).

    Any element-wise callable is accepted as ``non_target_logit_fn``; one that also has
    ``slope`` spares the core an autograd pass per block in the backward, and one that
    also has ``value_and_slope(z) -> (phi(z), phi'(z))`` lets it share their common
    work (a mask, a sum) in one pass. In default mode with a float scale ``s`` and no
    bias, ``scaled_value_and_slope(z, s, target_columns) -> (s phi(z), s phi'(z))``, when
    present, is used instead: the scale folded into the same passes (the core divides it
    out of the slope in the backward's row factors, ``(B,)`` per block); the slope may be a
    0-dim tensor where it is constant over the block. ``target_columns`` (``(B,)``, ``-1``
    where a row's target is in another block) says which entries the core then replaces
    by the target logits, so ``phi`` may ignore them.
    """

    def __call__(self, cosine: torch.Tensor) -> torch.Tensor:
        r""":math:`\phi(z)`, element-wise over a ``(B, k)`` block of cosines."""
        ...

    def slope(self, cosine: torch.Tensor) -> torch.Tensor:
        r""":math:`\phi'(z)`, element-wise, same shape (what it closes over held fixed)."""
        ...


@dataclass(frozen=True)
class FusedLogits:
    r"""Base logits in the one form the fused core computes.

    .. math::
        \ell_{ij} = s_i\,\max_{k<K}\,\tilde x_i^\top \tilde W_{jK+k} + b_j

    where :math:`\tilde x_i` is :math:`x_i/\|x_i\|` when ``normalize_embeddings``
    (else :math:`x_i`), :math:`\tilde W` likewise with ``normalize_weight`` (per
    column), ``K = sub_centers`` columns of ``W`` per class (``K = 1``: one column,
    no maximum), and the target-logit function applies to the target class's maximum.

    A :class:`~pml_margins.losses.ClassWeightLoss` returns one from
    ``fused_logits`` to declare that its ``base_logits`` are exactly this.

    Attributes:
        normalize_embeddings: L2-normalize the embeddings (rows).
        normalize_weight: L2-normalize the columns of ``W``.
        scale: :math:`s`, a float or a 0-dim or ``(B,)`` tensor (may require grad).
        bias: optional ``(C,)`` per-class bias :math:`b`.
        sub_centers: ``K``, columns of ``W`` per class (PML's sub-centre layout: column
            ``j*K + k`` is sub-centre ``k`` of class ``j``); the class cosine is their
            maximum, its gradient going to the first maximal one.
        scale_by_norm: :math:`s_i = s\,\|x_i\|` (SphereFace's logits
            :math:`\|x_i\|\cos\theta_{ij}`), for a number ``scale`` with
            ``normalize_embeddings`` and no bias: the core takes the norms from its
            normalization (see ``fused_margin_softmax_cross_entropy``).
    """

    normalize_embeddings: bool
    normalize_weight: bool
    scale: float | torch.Tensor = 1.0
    bias: torch.Tensor | None = None
    sub_centers: int = 1
    scale_by_norm: bool = False


def auto_chunk_size(
    batch_size: int, embedding_size: int, device: torch.device | str = "cpu"
) -> int:
    """Classes per block in bounded mode: cache-sized on CPU, ~256 MiB temporaries elsewhere.

    ``batch_size``, ``embedding_size``: integers ``>= 0``; ``device``: a ``torch.device`` or
    a device string (``ValueError`` otherwise).
    """
    batch_size = check_size(batch_size, "batch_size")
    embedding_size = check_size(embedding_size, "embedding_size")
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device, got {device!r}") from None
    budget = _CPU_BLOCK_ELEMENTS if device_type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    return max(256, budget // max(batch_size, embedding_size, 1))


def kept_columns(
    num_columns: int,
    positives: torch.Tensor,
    keep: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Partial FC's draw: the ``keep`` columns of ``num_columns`` kept, ascending, on
    ``device``: every positive (``positives``, indices or a mask) and, for the rest,
    those with the largest uniform draws (made on ``generator``'s device, any device).
    One stream for one process and for each shard: the same draws keep the same columns."""
    draw_device = generator.device if generator is not None else device
    scores = torch.rand(num_columns, generator=generator, device=draw_device).to(device)
    if positives.dtype == torch.bool:  # (masked_fill_: a mask's indexing reads back)
        scores.masked_fill_(positives, 2.0)  # above every uniform draw: always kept
    else:
        scores[positives] = 2.0
    return torch.topk(scores, keep, sorted=False).indices.sort().values


def sample_classes(
    labels: torch.Tensor,
    num_classes: int,
    sample_rate: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Partial-FC class sampling: the batch's classes plus a uniform subset of the others.

    Args:
        labels: ``(B,)`` class indices in ``[0, num_classes)``.
        num_classes: ``C``.
        sample_rate: fraction of classes kept, in ``(0, 1]``.
        generator: optional ``torch.Generator`` (on CPU or on the labels' device).

    Returns:
        ``None`` when every class is kept; otherwise ``(index, local_labels)``: the
        sorted kept class indices (``max(round(sample_rate * C), #positives)`` of them)
        and the labels remapped into ``[0, len(index))`` (a label outside ``[0, C)``,
        which only unchecked input can hold, to ``len(index)``).
    """
    sample_rate = check_sample_rate(sample_rate)
    num_classes = check_count(num_classes, "num_classes")
    generator = check_generator(generator)
    rows = labels.shape[0] if isinstance(labels, torch.Tensor) and labels.ndim else 0
    labels = check_labels(labels, rows)
    num_sample = round(sample_rate * num_classes)
    if num_sample >= num_classes:
        return None
    device = labels.device
    positives = torch.unique(labels.long())  # (on an accelerator, its size is a sync)
    if positives.numel() and value_checks_enabled() and not caller_checked():
        low, high = positives[[0, -1]].tolist()  # one read; a checked loss has done it
        if not 0 <= low <= high < num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got values in [{low}, {high}]"
            )
    num_sample = max(num_sample, positives.numel())
    index = kept_columns(num_classes, positives, num_sample, generator, device)
    local = torch.searchsorted(index, labels.long().contiguous())
    # unchecked labels outside [0, C) (value checks off) map past the kept columns, as
    # the full loss sees them: an index error, never a row trained toward index[0]
    found = index.gather(0, local.clamp(max=num_sample - 1)) == labels
    return index, local.masked_fill(~found, num_sample)


def class_columns(classes: torch.Tensor, per_class: int) -> torch.Tensor:
    """Columns of ``W`` holding ``classes`` when each class has ``per_class`` consecutive ones.

    Class ``j`` owns columns ``[j * per_class, (j + 1) * per_class)`` (PML's sub-centre
    layout; ``per_class = 1`` for every other loss). ``classes``: integer indices ``>= 0``
    (not read back: a negative one would index from the end), ``per_class >= 1``.

    Example:
        >>> class_columns(torch.tensor([0, 2]), 3)
        tensor([0, 1, 2, 6, 7, 8])
    """
    per_class = check_count(per_class, "per_class")
    if not isinstance(classes, torch.Tensor):
        raise TypeError(f"classes must be a torch.Tensor, got {type(classes).__name__}")
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise TypeError(f"classes must have an integer dtype, got {classes.dtype}")
    classes = classes.long().reshape(-1)  # int64: a narrow dtype would overflow
    if per_class == 1:
        return classes
    offsets = torch.arange(per_class, device=classes.device, dtype=classes.dtype)
    return (classes.unsqueeze(1) * per_class + offsets).flatten()


#: the largest number scale that float16 products take folded into their operand ``s x``
#: (products up to ``s``): float16's largest. A larger one, and any per-row tensor scale
#: (not read: a host read per step), multiplies the products' cosines instead
FLOAT16_FOLDED_SCALE_MAX = 65504.0


def _float_tensor(value: object, name: str) -> torch.Tensor:
    """``value`` if it is a dense floating tensor with values (:func:`check_tensor`), else
    ``TypeError``/``ValueError`` naming it (a complex one would lose its imaginary part)."""
    if check_tensor(value, name).dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype {FLOAT_DTYPE_NAMES}, got {value.dtype}")
    return value


def fused_margin_softmax_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target_logit_fn: TargetLogitFn | None,
    scale: float | torch.Tensor | ScaleFromCosines = 1.0,
    *,
    normalize_embeddings: bool = True,
    normalize_weight: bool = True,
    bias: torch.Tensor | None = None,
    chunk_size: ChunkSize = None,
    sample_rate: float = 1.0,
    generator: torch.Generator | None = None,
    materialize: bool | None = None,
    non_target_logit_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sub_centers: int = 1,
    target_cosines: torch.Tensor | None = None,
    scale_by_norm: bool = False,
) -> torch.Tensor:
    r"""Per-sample margin-softmax cross-entropy straight from embeddings and class weights.

    Args:
        embeddings: ``(B, D)`` floating tensor.
        weight: class weights ``W``, shape ``(D, C*K)`` (PML's layout; ``K = sub_centers``),
            any floating dtype; its storage is never cast as a whole (blocks are cast on
            the fly).
        labels: ``(B,)`` integer classes in ``[0, C)``.
        target_logit_fn: :math:`\psi`, applied to the ``(B,)`` vector of target cosines;
            ``None`` for the identity. Element ``i`` of its output must depend on element
            ``i`` of its input only; it may close over per-row ``(B,)`` tensors (margins,
            norms), which then get their gradients too.
        scale: :math:`s`, a float or a 0-dim or ``(B,)`` tensor (may require grad, e.g.
            :math:`\|x_i\|` for SphereFace); or a :data:`ScaleFromCosines` callable,
            called once with the step's cosines before any logit is formed (the scale
            decided from the batch without a product of its own: dynamic AdaCos).
            Default mode only (``chunk_size=None``, ``sample_rate=1``, one column per
            class, no ``non_target_logit_fn``).
        normalize_embeddings: L2-normalize the rows of ``embeddings`` (``F.normalize``).
        normalize_weight: L2-normalize the columns of ``W``.
        bias: optional ``(C,)`` per-class bias added to every logit.
        chunk_size: ``None`` (one saved ``(B, C)`` buffer, fastest), an ``int`` number
            of classes per block (``K`` columns each), or ``"auto"``
            (:func:`auto_chunk_size`) for the bounded-memory mode that never holds a
            ``(B, C)`` tensor.
        sample_rate: partial-FC fraction of classes, in ``(0, 1]`` (:func:`sample_classes`).
        generator: random generator for the class sampling.
        materialize: ``True`` forms the ``(B, C)`` logits in one product (faster for
            small problems): one column per class and no non-target function run the
            one-node dense function
            (:func:`~pml_margins.functional.dense_margin_softmax.dense_margin_softmax_cross_entropy`),
            the others let autograd differentiate them; ``False`` always runs the blocked
            function;
            ``None`` (default) materializes in default mode (``chunk_size=None``): on
            CPU while ``B C + D C / 4 <=`` :data:`MATERIALIZE_MAX_ELEMENTS` (``C``:
            columns of ``W``), and the dense function also while ``D <= 2 B`` and
            ``B C``, ``D C <=`` :data:`DENSE_MAX_ELEMENTS`; on an accelerator while
            ``B C`` and ``D C <= 2^26``. Same values either way.
        non_target_logit_fn: :math:`\phi`, applied element-wise to the non-target cosines
            before scaling (``None``: identity); see the module docstring for what it may
            depend on (per-row constants) and :class:`NonTargetLogitFn` for its optional
            ``slope``.
        sub_centers: ``K >= 1`` columns of ``W`` per class, column ``j*K + k`` for
            sub-centre ``k`` of class ``j``; the class cosine is their maximum (see the
            module docstring). Partial FC then keeps or drops whole classes.
        target_cosines: optional ``(B,)`` target cosines :math:`z_{iy_i}` already formed
            this step (no graph; e.g. for a margin's statistics), used by the blocked
            function instead of gathering ``W``'s target columns again (a cold, random
            read of ``W``: ~1 ms at 10k classes). One column per class only (ignored
            with ``sub_centers > 1``, whose class cosines the core forms as maxima).
        scale_by_norm: the scale of row ``i`` is ``scale`` times :math:`\|x_i\|`
            (SphereFace), for a number ``scale`` with ``normalize_embeddings`` and no bias.
            The dense function takes the norms from its normalization and folds their
            gradient into its own; the other paths form them with autograd.

    Returns:
        ``(B,)`` losses in ``compute_dtype`` of the inputs (float32 under autocast).

    Raises:
        ValueError: bad ``chunk_size``, ``sample_rate`` or ``sub_centers``, or mismatched
            shapes (``W``'s columns not a multiple of ``sub_centers``).

    Example:
        >>> from functools import partial
        >>> from pml_margins.functional import cosface_target
        >>> x, W = torch.randn(8, 16), torch.randn(16, 100)
        >>> y = torch.randint(0, 100, (8,))
        >>> loss = fused_margin_softmax_cross_entropy(
        ...     x, W, y, partial(cosface_target, margin=0.35), 64.0, chunk_size=32)
        >>> loss.shape
        torch.Size([8])
    """
    chunk_size = check_chunk_size(chunk_size)
    sample_rate = check_sample_rate(sample_rate)
    per_class = check_count(sub_centers, "sub_centers")
    if not caller_checked():  # a loss passes its own, checked when set
        normalize_embeddings = check_bool(normalize_embeddings, "normalize_embeddings")
        normalize_weight = check_bool(normalize_weight, "normalize_weight")
        materialize = None if materialize is None else check_bool(materialize, "materialize")
        check_generator(generator)
    check_tensor(embeddings, "embeddings")
    _float_tensor(weight, "weight")
    if embeddings.ndim != 2 or weight.ndim != 2 or embeddings.shape[1] != weight.shape[0]:
        raise ValueError(
            f"embeddings (B, D) and weight (D, C) do not match: "
            f"{tuple(embeddings.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[1] % per_class:
        raise ValueError(
            f"weight has {weight.shape[1]} columns, not a multiple of sub_centers={per_class}"
        )
    num_classes = weight.shape[1] // per_class
    if bias is not None and _float_tensor(bias, "bias").shape != (num_classes,):
        raise ValueError(f"bias must have shape ({num_classes},), got {tuple(bias.shape)}")
    rows = embeddings.shape[0]
    if not caller_checked():
        scale_by_norm = check_bool(scale_by_norm, "scale_by_norm")
    if scale_by_norm:
        check_norm_scale_form(normalize_embeddings, bias, scale)
    scale_fn = scale if callable(scale) else None
    phi_given = non_target_logit_fn is not None
    if scale_fn is not None and (
        chunk_size is not None or sample_rate < 1 or per_class > 1 or phi_given
    ):
        raise ValueError(
            "a scale from the cosines needs the default mode: chunk_size=None, "
            "sample_rate=1, sub_centers=1 and no non_target_logit_fn"
        )
    scale = check_scale(scale, rows)
    if target_cosines is not None and _float_tensor(target_cosines, "target_cosines").shape != (
        rows,
    ):
        raise ValueError(
            f"target_cosines must have shape ({rows},), got {tuple(target_cosines.shape)}"
        )
    check_function_inputs(  # values: none when a loss that has checked them calls
        embeddings,
        labels,
        num_classes,
        weight.shape[0],
        width_name="W's rows",
        norms_taken=normalize_embeddings,  # (raw rows: their result is read back instead)
    )
    # raw inner products are not bounded: their losses are read back (check_function_result)
    unbounded = not (normalize_embeddings and normalize_weight)
    # the small inputs copied where made under torch.inference_mode: autograd saves a
    # gather's index and a product's factors, and refuses inference tensors
    labels = outside_inference(labels.long())
    if isinstance(scale, torch.Tensor):
        scale = outside_inference(scale)
    bias, target_cosines = outside_inference(bias), outside_inference(target_cosines)
    if sample_rate < 1 and is_batched(labels):  # (the draw reads the labels only)
        raise ValueError(  # (torch.unique has no batching rule: vmap's internal error)
            "sample_rate < 1 draws a set of classes per call, which torch.func.vmap cannot "
            "batch: call per sample outside vmap, or use sample_rate=1 under it"
        )
    if sample_rate < 1:
        # the label range was read with the checks above (one read), except while
        # torch.compile traces, where they read nothing: sample_classes' own read then
        checked = contextlib.nullcontext() if is_compiling() else CHECKED_BY_CALLER
        with checked:
            sampled = sample_classes(labels, num_classes, sample_rate, generator)
        if sampled is not None:
            index, labels = sampled
            weight = weight.index_select(1, class_columns(index, per_class))
            bias = None if bias is None else bias.index_select(0, index)
    phi = non_target_logit_fn
    # derivatives a hand-written backward cannot give (a torch.func transform, a
    # forward-mode tangent, autograd_only): autograd on the materialized logits
    plain = plain_autograd_needed()
    if plain and chunk_size is not None:
        raise ValueError(
            "chunk_size needs the fused backward: under torch.func transforms, forward-mode "
            "AD or pml_margins.autograd_only() the logits are materialized (chunk_size=None)"
        )
    if plain or not num_classes:  # (no class, so no row: no block to run)
        materialize = True
    elif materialize is None:
        materialize = chunk_size is None and _materializes(
            rows,
            embeddings.shape[1],
            weight.shape[1],
            per_class == 1 and phi is None,
            embeddings.device,
        )
    if materialize and per_class == 1 and phi is None and not plain:
        return _checked(
            unbounded,
            dense_margin_softmax_cross_entropy(
                embeddings,
                weight,
                labels,
                target_logit_fn,
                scale,
                normalize_embeddings,
                normalize_weight,
                bias,
                scale_by_norm=scale_by_norm,
            ),
        )
    # the batch too on the other paths (the dense function copies its own)
    embeddings = outside_inference(embeddings)
    if scale_by_norm:  # the norms through autograd on the other paths
        scale = _norm_scale(embeddings, weight, scale)
    # half embeddings are widened before the normalization, so it does not round to their dtype
    x = embeddings.to(compute_dtype(torch.promote_types(embeddings.dtype, weight.dtype)))
    x = F.normalize(x, dim=1, eps=_NORM_EPS) if normalize_embeddings else x
    batch, width = x.shape
    num_classes = weight.shape[1] // per_class
    saved = chunk_size is None
    if chunk_size is None and x.device.type == "cpu":
        # block temporaries of (B or D) x block elements: cache-sized, and small next to the buffer
        widest = max(batch, width, 1)
        share = batch * num_classes // (_DEFAULT_BLOCK_FRACTION * widest)
        block = max(1, min(_CPU_BLOCK_ELEMENTS // widest, max(256, share)) // per_class)
    elif chunk_size in (None, "auto"):  # an accelerator pays per op launched: bounded mode's
        block = max(1, auto_chunk_size(batch, width, x.device) // per_class)  # large blocks
    else:
        block = chunk_size
    block = min(block, num_classes)
    if materialize:
        return _checked(
            unbounded,
            _materialized(
                x, weight, labels, target_logit_fn, scale, normalize_weight, bias, phi, per_class
            ),
        )
    config = _Config(1.0, normalize_weight, block, saved, *_dtypes(x, weight), phi, per_class)
    if scale_fn is not None:  # the cosines first (kept for the forward), then the scale
        config.fold_scale = False
        config.cosines = _cosine_blocks(x, weight, config)
        scale = check_scale(scale_fn(config.cosines.blocks), rows)
    scale_tensor = scale if isinstance(scale, torch.Tensor) else None
    config.scale = 1.0 if isinstance(scale, torch.Tensor) else float(scale)
    if config.mm_dtype == torch.float16 and (
        scale_tensor is not None or config.scale > FLOAT16_FOLDED_SCALE_MAX
    ):
        config.fold_scale = False  # s x would leave float16's range: s multiplies z after
    inputs = (x, weight, scale_tensor, bias)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    target, slope, z_y, winner, config.target_psi = _target_terms(
        x,
        weight,
        labels,
        target_logit_fn,
        scale,
        normalize_weight,
        None if bias is None else bias.detach(),  # (its whole gradient: the backward's)
        grad,
        per_class,
        target_cosines,
    )
    if grad or target.requires_grad:
        return _checked(
            unbounded,
            _FusedMarginSoftmax.apply(
                x, weight, scale_tensor, bias, target, labels, slope, z_y, winner, config
            ),
        )
    with torch.no_grad():
        losses = _forward(x, weight, scale_tensor, bias, target, labels, config, save=False)[0]
    return _checked(unbounded, losses)


def _checked(unbounded: bool, losses: torch.Tensor) -> torch.Tensor:
    """``losses``, refused (``ValueError``) where they are not finite while the logits are
    raw inner products (``unbounded``: finite input may overflow them); cosine logits are
    bounded by the scale. Nothing read when a loss, which checks its own, calls."""
    if unbounded:
        check_function_result(losses, _unbounded_error)
    return losses


def _unbounded_error() -> ValueError:
    return ValueError(
        "fused_margin_softmax_cross_entropy gave non-finite losses from finite embeddings: "
        "without normalize_embeddings and normalize_weight its logits s x.w are not bounded "
        "and overflowed, or W or the bias holds NaN/Inf; scale the embeddings or W down"
    )


class _Cosines(NamedTuple):
    """Default mode's buffer holding the cosines of every block, before the scale is known."""

    buffer: torch.Tensor  # (B * C,), block after block
    blocks: list[torch.Tensor]  # (B, k) views of it
    inv_norm: torch.Tensor | None  # (C,) 1 / |W_j|
    active: torch.Tensor | None  # (C,) |W_j| >= eps (bool): the columns not clamped


def _cosine_blocks(x: torch.Tensor, weight: torch.Tensor, config: _Config) -> _Cosines:
    """The ``(B, C)`` cosines, block by block, into the buffer the forward then rescales."""
    dtype = config.dtype
    with torch.no_grad(), autocast_off(x.device.type):
        xs = x.detach().to(dtype).to(config.mm_dtype)
        batch = x.shape[0]
        buffer = torch.empty(batch * weight.shape[1], dtype=dtype, device=x.device)
        inv_norm = active = None
        if config.normalize_weight:
            inv_norm = torch.empty(weight.shape[1], dtype=dtype, device=x.device)
            active = torch.empty(weight.shape[1], dtype=torch.bool, device=x.device)
        blocks = []
        for start, stop in _blocks(weight.shape[1], config.block):
            w = weight.detach()[:, start:stop]
            inv = None
            if inv_norm is not None:
                inv = _inverse_column_norms(w, dtype, inv_norm[start:stop], active[start:stop])
            out = buffer[batch * start : batch * stop].view(batch, stop - start)
            w_mm, inv = _operand(w, inv, config)
            blocks.append(_block_logits(xs, w_mm, inv, None, start, dtype, out))
    return _Cosines(buffer, blocks, inv_norm, active)


def _operand(
    w: torch.Tensor, inv: torch.Tensor | None, config: _Config
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A column block of ``W`` as the products' operand, and the column scaling left
    for their result: the raw columns and ``1/|W_j|`` (exact, no copy in the compute
    dtype); in float16, whose range raw columns (or ``s |W_j|``) leave, the unit
    columns formed in the compute dtype, as PML's normalized ``W`` is, and nothing."""
    if inv is not None and config.unit_operand:
        return (w.to(config.dtype) * inv).to(config.mm_dtype), None
    return w.to(config.mm_dtype), inv


def _column_scratch(rows: int, columns: int, config: _Config, device: torch.device) -> torch.Tensor:
    """A flat buffer for one column block's ``(rows, k K)`` element-wise products in the
    compute dtype (:func:`column_dots`), allocated once per call and reused by every block."""
    width = min(columns, config.block * config.sub_centers)
    return torch.empty(rows * width, dtype=config.dtype, device=device)


def column_dots(
    a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_d a[d, j] b[d, j]`` for each column ``j`` of two ``(D, k)`` tensors.

    The values of ``torch.linalg.vecdot(a, b, dim=0)`` (which is the element-wise product,
    then a sum over rows), with the product written into ``scratch`` (flat, at least
    ``D k`` elements of the dtype) where given. A column block of ``W`` at 10k classes x 3
    sub-centres makes that product 4 MiB: allocated anew for every block, glibc hands it
    back to the system and the next block faults it in again (4-5k page faults, 10-14 ms
    of a ~215 ms CPU step, measured).
    """
    if scratch is None:
        return torch.linalg.vecdot(a, b, dim=0)
    products = scratch[: a.numel()].view(a.shape)
    return torch.mul(a, b, out=products).sum(0)


def _inverse_column_norms(
    w: torch.Tensor,
    dtype: torch.dtype,
    out: torch.Tensor,
    active: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``1 / max(|w_j|, eps)`` of a block's columns, into ``out``; into ``active``, where
    given, whether ``|w_j| >= eps``: the columns whose gradient keeps its radial term
    (``F.normalize``'s clamp passes the gradient at equality). ``scratch``: see
    :func:`column_dots`."""
    wc = w.to(dtype)
    squares = column_dots(wc, wc, scratch)
    if active is not None:
        torch.ge(squares.sqrt(), _NORM_EPS, out=active)  # (norms: as in _column_inverse_norms)
    return torch.rsqrt(squares.clamp_min_(_NORM_EPS**2), out=out)


def _target_terms(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target_logit_fn: TargetLogitFn | None,
    scale: float | torch.Tensor,
    normalize_weight: bool,
    bias: torch.Tensor | None,
    slope_needed: bool,
    per_class: int = 1,
    formed: torch.Tensor | None = None,
) -> tuple[
    torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None
]:
    r"""The target logits :math:`t`, the slope :math:`\psi'(z)`, the target cosines ``z``.

    ``z`` is computed without a graph (the blocked function differentiates it); ``t``
    has the graph of :math:`\psi`'s other inputs and of the bias as given (the blocked
    function takes the bias without one and gives its whole gradient). With sub-centres
    ``z`` is the maximum over the target class's ``K`` columns, and the fourth value is the
    winning sub-centre of each row (the first on ties; ``None`` when ``K = 1``). A tensor
    scale that needs a gradient (``slope_needed``) enters ``t`` without its graph, and the
    fifth value is :math:`\psi(z)` (no graph) for the backward's share of it; else ``None``.
    """
    dtype = x.dtype
    winner = None
    with autocast_off(x.device.type):
        if formed is not None and per_class == 1:  # the step's own target cosines
            z_y = formed.detach().to(dtype)
        else:
            with torch.no_grad():
                w_y = weight.index_select(1, class_columns(labels, per_class)).to(dtype)
                # (K, D, B): one plane per sub-centre, the same operations on each (_planes)
                z_sub = []
                for plane in w_y.unflatten(1, (-1, per_class)).permute(2, 0, 1):
                    plane = plane.contiguous()
                    if normalize_weight:
                        plane = F.normalize(plane, dim=0, eps=_NORM_EPS)
                    z_sub.append((x * plane.t()).sum(1))
                if per_class == 1:
                    z_y = z_sub[0]
                else:  # the nearest of the target's sub-centres
                    z_y, winner = torch.stack(z_sub).max(0)
        if slope_needed and isinstance(scale, torch.Tensor) and scale.requires_grad:
            psi, slope = target_and_slope(z_y, target_logit_fn, 1.0, None, labels, True)
            target = psi * scale.detach().to(dtype)
            if bias is not None:
                target = target + bias.index_select(0, labels).to(dtype)
            return target, slope, z_y, winner, psi.detach()
        target, slope = target_and_slope(z_y, target_logit_fn, scale, bias, labels, slope_needed)
        return target, slope, z_y, winner, None


class _Float16Products(torch.autograd.Function):
    """``x W`` (``W``: ``(D, C)``, or ``(K, D, C)`` planes: ``(K, B, C)``) with float16
    operands, returned in ``x``'s dtype, as autocast's product is; its backward takes the
    incoming gradient :math:`G` (``g s`` in it) over
    :func:`~pml_margins.functional.margin_softmax.float16_gradient_scale`'s :math:`c`
    before its float16 products and multiplies them by :math:`c` after, where
    autograd's own float16 backward of the product gets :math:`G` itself: inf once
    ``g s`` passes 65504 (a scale of 1e5, a summed loss)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        with autocast_off(x.device.type):
            x_half, w_half = x.detach().half(), w.detach().half()
            save_inputs(ctx, x_half, w_half)
            ctx.dtypes = x.dtype, w.dtype
            return torch.matmul(x_half, w_half).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_half, w_half = ctx.saved_tensors
        with autocast_off(grad.device.type):
            planes = grad if grad.ndim == 3 else grad.unsqueeze(0)  # (K, B, C)
            column_max = w_half.abs().amax().float()
            top = float16_gradient_scale(planes, x_half, torch.float16, column_max)
            g_half = (planes / top).half()
            w_planes = w_half if w_half.ndim == 3 else w_half.unsqueeze(0)
            grad_x = grad_w = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.matmul(g_half, w_planes.transpose(1, 2)).float().sum(0)
                grad_x = grad_x.mul_(top).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                grad_w = torch.matmul(x_half.t(), g_half).float().mul_(top)
                grad_w = (grad_w if w_half.ndim == 3 else grad_w[0]).to(ctx.dtypes[1])
        return grad_x, grad_w


def _materialized(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target_logit_fn: TargetLogitFn | None,
    scale: float | torch.Tensor,
    normalize_weight: bool,
    bias: torch.Tensor | None,
    phi: Callable[[torch.Tensor], torch.Tensor] | None = None,
    per_class: int = 1,
) -> torch.Tensor:
    """The same losses on the materialized ``(B, C)`` base logits, differentiated by autograd.

    ``x`` is already in the compute dtype (and normalized when asked). The ``B`` target
    cosines are gathered from the product and written back, margined and scaled, in
    place: as few ``(B, C)`` passes as a hand-written loss makes. With sub-centres the
    ``(B, C*K)`` product is reduced by ``max`` (whose gradient goes to the first maximum).
    """
    dtype = x.dtype
    device_type = x.device.type
    w = weight.to(dtype)
    if per_class > 1:  # (K, D, C) planes, one product each (see _planes)
        w = w.unflatten(1, (-1, per_class)).permute(2, 0, 1).contiguous()
    norm = None
    if normalize_weight:  # a column scaling of the (B, C) product: no normalized W copy,
        unit = takes_unit_columns(products_dtype(dtype, device_type))  # unless the products
        with autocast_off(device_type):  # need the unit columns (_operand)
            norm = torch.linalg.vector_norm(w, dim=-2, keepdim=True).clamp_min(_NORM_EPS)
            if unit:
                w, norm = w / norm, None
    if products_dtype(dtype, device_type) == torch.float16 and not (
        plain_autograd_needed() or in_function_transform()
    ):  # float16 products whose backward keeps its operands in range (g s may pass 65504)
        cosine = _Float16Products.apply(x, w)
    elif per_class > 1:
        cosine = torch.stack([torch.mm(x, plane) for plane in w])  # (K, B, C)
    else:
        cosine = torch.mm(x, w)  # the autocast dtype under autocast
    with autocast_off(device_type):
        cosine = cosine.to(dtype)
        if norm is not None:
            cosine = cosine / norm
        if per_class > 1:  # torch.max: the gradient goes to the first maximum
            cosine = cosine.max(dim=0).values
        if callable(scale):  # decided from the cosines (no graph), as the fused cores do
            scale = check_scale(scale([cosine.detach()]), len(labels))
        index = labels.unsqueeze(1)
        z_y = cosine.gather(1, index).squeeze(1)
        psi = z_y
        if target_logit_fn is not None:
            psi = elementwise_result(target_logit_fn(z_y), z_y, "target_logit_fn").to(dtype)
        s = scale.to(dtype) if isinstance(scale, torch.Tensor) else float(scale)
        base = cosine
        if phi is not None:
            base = elementwise_result(phi(cosine), cosine, "non_target_logit_fn").to(dtype)
        logits = base * (s.unsqueeze(1) if isinstance(s, torch.Tensor) else s)
        target = psi * s
        if bias is not None:
            b = bias.to(dtype)
            logits = logits + b
            target = target + b.index_select(0, labels)
        # in place but under torch.func: vmap over what only the target depends on (a
        # margin) batches the target and not the logits, which scatter_ cannot write into
        write = logits.scatter if in_function_transform() else logits.scatter_
        logits = write(1, index, target.unsqueeze(1))
        return F.cross_entropy(logits, labels, reduction="none")


class _Config:
    """Non-tensor arguments of the autograd function."""

    def __init__(
        self,
        scale: float,
        normalize_weight: bool,
        block: int,
        saved: bool,
        dtype: torch.dtype,
        mm_dtype: torch.dtype,
        phi: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sub_centers: int = 1,
    ) -> None:
        self.scale = scale
        self.normalize_weight = normalize_weight
        self.block = block
        self.saved = saved
        self.dtype = dtype  # softmax, margins, accumulations
        self.mm_dtype = mm_dtype  # operands of the matrix products
        self.phi = phi  # the non-target function (None: identity)
        self.sub_centers = sub_centers  # columns of W per class
        # the products give s z (the scale folded into the x operand), else z
        self.fold_scale = phi is None and sub_centers == 1
        # default mode with phi: the buffer keeps e^(l - m) phi'(z) (set by the forward when
        # no bias and no tensor scale need the probabilities without the slope), else z
        self.stores_slope = False
        # ... times this float when phi gave s phi'(z) (scaled_value_and_slope)
        self.slope_scale = 1.0
        self.cosines: _Cosines | None = None  # formed before the scale was known
        # psi(z_y) where a tensor scale needs a gradient: the target logit takes the scale
        # without its graph, the backward gives its target share (rounded once, as a whole)
        self.target_psi: torch.Tensor | None = None
        # float16 products take the unit columns of W (see _operand)
        self.unit_operand = normalize_weight and takes_unit_columns(mm_dtype)


def _dtypes(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    dtype = compute_dtype(torch.promote_types(x.dtype, weight.dtype))
    return dtype, products_dtype(dtype, x.device.type)


class _Targets:
    """Where each row's target column falls in the blocks, to set those ``B`` entries per block."""

    def __init__(self, labels: torch.Tensor, block: int, num_classes: int) -> None:
        self.block_id = torch.div(labels, block, rounding_mode="floor")
        col = (labels - self.block_id * block).unsqueeze(1)
        last_width = num_classes - (num_classes - 1) // block * block
        self.col = col
        self.col_last = col.clamp(max=last_width - 1)
        self.num_blocks = (num_classes + block - 1) // block

    def _col(self, k: int) -> torch.Tensor:
        """``(B, 1)`` target columns within block ``k`` (clamped into the last, narrower one)."""
        return self.col_last if k == self.num_blocks - 1 else self.col

    def set(self, logits: torch.Tensor, k: int, value: float | torch.Tensor) -> None:
        """``logits[i, col_i] = value`` (or ``value[i]``) for rows whose target is in block k."""
        col = self._col(k)
        inside = (self.block_id == k).unsqueeze(1)
        if isinstance(value, torch.Tensor):
            value = value.unsqueeze(1)
        logits.scatter_(1, col, torch.where(inside, value, logits.gather(1, col)))

    def columns(self, k: int) -> torch.Tensor:
        """``(B,)``: each row's target column within block ``k``, ``-1`` where it is elsewhere."""
        return torch.where(self.block_id == k, self._col(k).squeeze(1), -1)


def _block_logits(
    xs: torch.Tensor,
    w: torch.Tensor,
    inv_norm: torch.Tensor | None,
    bias: torch.Tensor | None,
    start: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``s z + b`` of one block (targets not yet replaced), in ``dtype``.

    ``w`` is the raw column block (in the product dtype); the normalization is a
    column scaling of the ``(B, k)`` result by ``inv_norm``.
    """
    if w.dtype == dtype:
        logits = torch.mm(xs, w) if out is None else torch.mm(xs, w, out=out)
    else:
        low = torch.mm(xs, w)
        logits = low.to(dtype) if out is None else out.copy_(low)
    if inv_norm is not None:
        logits.mul_(inv_norm)
    if bias is not None:
        logits.add_(bias[start : start + logits.shape[1]].to(dtype))
    return logits


def _scaled_logits(
    value: torch.Tensor,
    s_col: float | torch.Tensor,
    bias: torch.Tensor | None,
    start: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``s v + b`` of one block from ``v`` (``phi(z)``, or class cosines), new or in ``out``."""
    logits = torch.mul(value.to(dtype), s_col, out=out)
    if bias is not None:
        logits.add_(bias[start : start + logits.shape[1]].to(dtype))
    return logits


def _phi_and_slope(
    phi: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\phi(z)` and :math:`\phi'(z)` of a block (by ``phi.value_and_slope`` or
    ``phi.slope``, else autograd)."""
    both = getattr(phi, "value_and_slope", None)
    if both is not None:
        value, slope = both(z)
        return elementwise_result(value, z, "non_target_logit_fn"), _slope_of(slope, z)
    slope = getattr(phi, "slope", None)
    if slope is not None:
        return elementwise_result(phi(z), z, "non_target_logit_fn"), _slope_of(slope(z), z)
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        value = elementwise_result(phi(leaf), leaf, "non_target_logit_fn")
        if not value.requires_grad:  # constant in z
            return value.detach(), torch.zeros_like(z)
        (grad,) = torch.autograd.grad(value, leaf, torch.ones_like(value))
    return value.detach(), grad


def _slope_of(slope: torch.Tensor | float, z: torch.Tensor) -> torch.Tensor:
    """A non-target function's slope ``phi'(z)``: real values on ``z``'s device, one per
    element of ``z``, or one for the whole block (a finite real number, or a 0-dim tensor,
    which may be on the CPU: a constant slope); anything else -- a shape that would
    broadcast into wrong gradients, a complex or bool tensor, another device -- is a
    ``ValueError``. Tensors' values are not read (no host synchronization)."""
    name = "non_target_logit_fn's slope"
    if isinstance(slope, numbers.Real) and not isinstance(slope, (bool, np.bool_)):
        return torch.tensor(check_real(slope, name), dtype=z.dtype, device=z.device)
    if isinstance(slope, torch.Tensor):
        devices = (z.device, torch.device("cpu")) if slope.ndim == 0 else (z.device,)
        if slope.is_complex() or slope.dtype == torch.bool or slope.device not in devices:
            raise ValueError(
                f"{name} must be real and on {z.device}, got a {slope.dtype} tensor on "
                f"{slope.device}"
            )
        if slope.ndim == 0:
            return slope.to(device=z.device, dtype=z.dtype)
    return elementwise_result(slope, z, name)


def _planes(w: torch.Tensor, per_class: int, dtype: torch.dtype) -> torch.Tensor:
    """``(K, D, k)``: sub-centre ``k`` of a block's ``k`` classes as one contiguous matrix.

    One product per plane, the same shapes for every sub-centre, so that equal columns of
    ``W`` give equal cosines: one product over all ``k*K`` columns may round a column
    differently by where it falls in the kernel's tiles, which would break exact ties.
    """
    planes = _aligned_stack(per_class, w.shape[0], w.shape[1] // per_class, dtype, w.device)
    return planes.copy_(w.unflatten(1, (-1, per_class)).permute(2, 0, 1))


def _aligned_stack(
    count: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(count, rows, cols)``, each matrix contiguous and starting on a 64-byte boundary.

    A BLAS product writes equal columns bit-equal only when its output (and, to be safe,
    its input) sits at the same alignment: an output plane that starts mid-line rounds
    some columns differently (measured), which would break exact ties between sub-centres.
    """
    per_line = max(1, 64 // torch.empty((), dtype=dtype).element_size())
    stride = -(-rows * cols // per_line) * per_line
    storage = torch.empty(count * stride, dtype=dtype, device=device)  # 64-byte aligned
    return storage.as_strided((count, rows, cols), (stride, cols, 1))


def _class_cosines(
    xs: torch.Tensor,
    planes: torch.Tensor,
    inv_planes: torch.Tensor | None,
    dtype: torch.dtype,
    winner: torch.Tensor | None,
) -> torch.Tensor:
    """``(B, k)`` class cosines of a block: the maximum over its ``K`` planes' products."""
    per_class, _, width = planes.shape
    z = _aligned_stack(per_class, xs.shape[0], width, dtype, xs.device)
    for k in range(per_class):
        _block_logits(xs, planes[k], None, None, 0, dtype, out=z[k])
    if inv_planes is not None:  # the normalization: a column scaling of each product
        z.mul_(inv_planes.unsqueeze(1))
    return _max_over_sub_centres(z.unbind(0), winner)


def _max_over_sub_centres(
    cosines: Sequence[torch.Tensor], winner: torch.Tensor | None
) -> torch.Tensor:
    """The element-wise maximum of ``K >= 2`` sub-centres' ``(B, k)`` cosines (any strides).

    Fills ``winner`` (if given: ``(B, k)`` of :func:`_winner_dtype`) with the winning
    sub-centre of each entry (the first on ties, as ``torch.max`` and so PML's plain
    path). The maximum in element-wise passes, then the winner as the number of
    leading sub-centres strictly below it (the index of the first maximal one): 0.15 ms
    against ``torch.max``'s 1.2 ms for three 256 x 682 planes on CPU.
    """
    values = torch.maximum(cosines[0], cosines[1])
    for z in cosines[2:]:
        torch.maximum(values, z, out=values)
    if winner is not None:
        below = cosines[0] < values  # every sub-centre so far strictly below the maximum
        winner.copy_(below)
        for z in cosines[1:-1]:
            below.logical_and_(z < values)
            winner.add_(below)
    return values


def _may_tie(w: torch.Tensor, per_class: int) -> bool:
    """Whether two sub-centres of a class in this column block may be equal columns.

    Equal columns have equal leading entries, so sub-centres whose leading entries
    differ cannot tie exactly: their cosines may come from one product over the
    block as it lies in ``W``. Only where they coincide (a ``W`` made by repeating
    one, a zero initialisation) must equal columns give bit-equal cosines, which
    only the per-plane products guarantee (see :func:`_planes`). Compared: the bits of
    each column's first 8 bytes (one float64 entry, two float32, four half entries:
    half-precision first entries alone coincide too often), ``-0.0`` read as ``0.0``.
    One small read and one host read (CPU only: an accelerator always takes the planes).
    """
    if w.device.type != "cpu":
        return True
    size = w.element_size()
    rows = 8 // size
    if size not in (2, 4, 8) or w.shape[0] < rows:
        first = w[0].view(-1, per_class).sort(1).values
        return bool((first[:, 1:] == first[:, :-1]).any())
    leading = (w[:rows] + 0).t().contiguous()  # + 0: -0.0 becomes 0.0 (equal as numbers)
    keys = leading.view(torch.int64).view(-1, per_class).sort(1).values
    return bool((keys[:, 1:] == keys[:, :-1]).any())


def _sub_centre_block(
    xs: torch.Tensor,
    w: torch.Tensor,
    inv: torch.Tensor | None,
    per_class: int,
    config: _Config,
    winner: torch.Tensor | None,
    norms_given: bool = False,
    active: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """One block of whole classes: its ``(B, k)`` class cosines.

    Fills ``inv`` (the block's ``1/|W|`` per column, when normalizing; unless
    ``norms_given``: the forward's, for a recomputation) and ``active`` (whether each
    column's norm is at least eps; where given), and ``winner`` (the winning
    sub-centres, when asked); ``scratch``: see :func:`column_dots`. Where no two
    sub-centres may tie (:func:`_may_tie`), one
    product over the block's columns in ``W``'s own layout (no copy: at 10k classes
    x 3, ~10 ms of a ~200 ms CPU step); else one per plane (:func:`_planes`).
    """
    dtype = config.dtype
    if not _may_tie(w, per_class):
        if inv is not None and not norms_given:
            _inverse_column_norms(w, dtype, inv, active, scratch)
        w_mm, inv_after = _operand(w, inv, config)
        z = _block_logits(xs, w_mm, inv_after, None, 0, dtype)
        classes = z.shape[1] // per_class  # explicit: an empty batch has no -1 to infer
        return _max_over_sub_centres(z.view(z.shape[0], classes, per_class).unbind(2), winner)
    planes = _planes(w, per_class, config.mm_dtype)
    inv_planes = None
    if inv is not None and norms_given:
        inv_planes = inv.view(-1, per_class).t()
    elif inv is not None:  # per plane too: equal columns, equal norms
        wc = planes if planes.dtype == dtype else _planes(w, per_class, dtype)
        squares = torch.linalg.vecdot(wc, wc, dim=1)
        if active is not None:
            active.view(-1, per_class).copy_((squares.sqrt() >= _NORM_EPS).t())
        inv_planes = squares.clamp_min_(_NORM_EPS**2).rsqrt_()
        inv.view(-1, per_class).copy_(inv_planes.t())
    if inv_planes is not None and config.unit_operand:  # the unit columns (_operand),
        unit = _planes(w, per_class, dtype).mul_(inv_planes.unsqueeze(1))  # aligned as
        planes.copy_(unit)  # the planes, so that equal columns stay bit-equal
        inv_planes = None
    return _class_cosines(xs, planes, inv_planes, dtype, winner)


def _winner_dtype(per_class: int) -> torch.dtype:
    """The smallest integer dtype that holds a sub-centre index (saved in default mode)."""
    return torch.uint8 if per_class <= 256 else torch.int64


def _to_columns(
    grad: torch.Tensor,
    winner: torch.Tensor,
    per_class: int,
    targets: _Targets,
    k: int,
    target_winner: torch.Tensor,
) -> torch.Tensor:
    """Route a ``(B, k)`` class-level gradient to the winning columns: ``(B, k*K)``.

    The target entries go to the target's own winner (that of the ``B`` target
    cosines); the other ``K - 1`` columns of each class get zero.
    """
    index = winner.long()
    targets.set(index, k, target_winner)
    batch, width = grad.shape
    full = torch.zeros(batch, width, per_class, dtype=grad.dtype, device=grad.device)
    full.scatter_(2, index.unsqueeze(2), grad.unsqueeze(2))
    return full.view(batch, width * per_class)


def _blocks(num_classes: int, block: int) -> list[tuple[int, int]]:
    return [(c, min(c + block, num_classes)) for c in range(0, num_classes, block)]


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_tensor: torch.Tensor | None,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    labels: torch.Tensor,
    config: _Config,
    save: bool,
) -> tuple[torch.Tensor, dict[str, Any]]:
    dtype = config.dtype
    with autocast_off(x.device.type):
        xc = x.to(dtype)
        s = config.scale if scale_tensor is None else scale_tensor.detach().to(dtype)
        s_col = s.unsqueeze(1) if isinstance(s, torch.Tensor) else s
        phi, per_class = config.phi, config.sub_centers
        # the products give s z, or z itself (phi applies before the scale; sub-centres'
        # maximum is taken over the cosines)
        xs = (xc * s_col if config.fold_scale else xc).to(config.mm_dtype)
        target = target.detach().to(dtype)
        # log-sum-exp of the non-target logits, block by block
        batch, columns = x.shape[0], weight.shape[1]
        num_classes = columns // per_class
        blocks = _blocks(num_classes, config.block)
        targets = _Targets(labels, config.block, num_classes)
        opts = {"dtype": dtype, "device": x.device}
        block_max = torch.empty(len(blocks), batch, **opts)
        block_sum = torch.empty(len(blocks), batch, **opts)
        buffer = torch.empty(batch * num_classes, **opts) if save else None
        if config.cosines is not None:
            buffer = config.cosines.buffer
        winners = None  # the winning sub-centre of each (row, class), for the backward
        if save and per_class > 1:
            winners = torch.empty(
                batch * num_classes, dtype=_winner_dtype(per_class), device=x.device
            )
        bias_d = None if bias is None else bias.detach()
        w_d = weight.detach()
        inv_norm = active = None
        if config.cosines is not None:
            inv_norm, active = config.cosines.inv_norm, config.cosines.active
        elif config.normalize_weight:
            inv_norm = torch.empty(columns, **opts)
            active = torch.empty(columns, dtype=torch.bool, device=x.device)
        scratch = None  # for the blocks' column norms
        if inv_norm is not None and config.cosines is None:
            scratch = _column_scratch(x.shape[1], columns, config, x.device)
        lowest = torch.finfo(dtype).min
        stores_slope = config.stores_slope = (
            buffer is not None and phi is not None and bias is None and scale_tensor is None
        )
        # s phi(z) and s phi'(z) in fewer passes (the buffer then holds s phi' too)
        scaled = getattr(phi, "scaled_value_and_slope", None) if stores_slope else None
        if scaled is not None:
            config.slope_scale = s_col
        for k, (start, stop) in enumerate(blocks):
            first, last = start * per_class, stop * per_class  # the block's columns
            w = w_d[:, first:last]
            inv = None if inv_norm is None else inv_norm[first:last]
            on = None if active is None else active[first:last]
            out = None
            if buffer is not None:
                out = buffer[batch * start : batch * stop].view(batch, stop - start)
            if per_class > 1:  # the buffer keeps s c + b (exponentiated below), or c with phi
                winner = None
                if winners is not None:
                    winner = winners[batch * start : batch * stop].view(batch, stop - start)
                z = _sub_centre_block(
                    xs, w, inv, per_class, config, winner, active=on, scratch=scratch
                )
                if phi is None:
                    logits = _scaled_logits(z, s_col, bias_d, start, dtype, out)
                elif out is not None and not stores_slope:
                    out.copy_(z)
            elif config.cosines is not None:  # the buffer holds z: rescaled in place
                logits = _scaled_logits(out, s_col, bias_d, start, dtype, out)
            else:
                if inv is not None:
                    _inverse_column_norms(w, dtype, inv, on, scratch)
                w_mm, inv_after = _operand(w, inv, config)
                if phi is None and config.fold_scale:
                    logits = _block_logits(xs, w_mm, inv_after, bias_d, start, dtype, out)
                elif phi is None:  # the products give z: s z + b in place
                    z = _block_logits(xs, w_mm, inv_after, None, start, dtype, out)
                    logits = _scaled_logits(z, s_col, bias_d, start, dtype, z)
                else:  # the logits s phi(z) + b are a new block (the buffer: z, then see below)
                    z = _block_logits(xs, w_mm, inv_after, None, start, dtype, out)
            if phi is not None:
                if scaled is not None:
                    logits, phi_slope = scaled(z, s_col, targets.columns(k))
                    logits = elementwise_result(logits, z, "non_target_logit_fn")
                    phi_slope = _slope_of(phi_slope, z)
                elif stores_slope:
                    value, phi_slope = _phi_and_slope(phi, z)
                    logits = _scaled_logits(value, s_col, bias_d, start, dtype)
                else:
                    value = elementwise_result(phi(z), z, "non_target_logit_fn")
                    logits = _scaled_logits(value, s_col, bias_d, start, dtype)
            targets.set(logits, k, float("-inf"))
            m = torch.amax(logits, 1, out=block_max[k]).clamp_min_(lowest)  # finite
            exp_in_place(logits.sub_(m.unsqueeze(1)))
            torch.sum(logits, 1, out=block_sum[k])
            if stores_slope:  # e^(l - m) phi'(z), into the buffer
                torch.mul(logits, phi_slope.to(dtype), out=out)
        top = block_max.amax(0)
        others = top + torch.log((block_sum * torch.exp(block_max - top)).sum(0))
        lse = torch.logaddexp(others, target)
        losses = lse - target
    state = {
        "buffer": buffer,
        "winners": winners,
        "block_max": block_max if save else None,
        "lse": lse,
        "p_target": torch.exp(target - lse),
        "inv_norm": inv_norm,
        "active": active,
    }
    return losses, state


class _FusedMarginSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        scale_tensor: torch.Tensor | None,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        labels: torch.Tensor,
        slope: torch.Tensor,
        z_y: torch.Tensor,
        target_winner: torch.Tensor | None,
        config: _Config,
    ) -> torch.Tensor:
        losses, st = _forward(
            x, weight, scale_tensor, bias, target, labels, config, save=config.saved
        )
        config.cosines = None  # the buffer is in the saved tensors (now the exponentials)
        ctx.config = config
        ctx.has_scale = scale_tensor is not None
        ctx.has_bias = bias is not None
        save_inputs(
            ctx,
            x,
            weight,
            scale_tensor,
            bias,
            labels,
            st["buffer"],
            st["winners"],
            st["block_max"],
            st["lse"],
            st["p_target"],
            slope,
            z_y,
            target_winner,
            st["inv_norm"],
            st["active"],
        )
        return losses

    @staticmethod
    @backward_once("the fused margin softmax", SOFTMAX_REMEDY)
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (
            x,
            weight,
            scale_tensor,
            bias,
            labels,
            buffer,
            winners,
            block_max,
            lse,
            p_target,
            slope,
            z_y,
            target_winner,
            inv_norm,
            active,
        ) = ctx.saved_tensors
        config: _Config = ctx.config
        dtype, mm_dtype = config.dtype, config.mm_dtype
        need_x, need_w, need_s, need_b, need_t = ctx.needs_input_grad[:5]
        with autocast_off(x.device.type):
            xc = x.to(dtype)
            g = grad_losses.to(dtype)
            s = config.scale if scale_tensor is None else scale_tensor.to(dtype)
            gs = g * s
            s_col = s.unsqueeze(1) if isinstance(s, torch.Tensor) else s
            phi, per_class = config.phi, config.sub_centers
            # forward operand, for recomputation (s z, or z: see _forward)
            xs = (xc * s_col if config.fold_scale else xc).to(mm_dtype)
            batch, num_classes = x.shape[0], weight.shape[1] // per_class
            # A = sum over non-target classes j of p_ij W_hat_j  (B, D)
            acc = torch.zeros(batch, x.shape[1], dtype=dtype, device=x.device)
            grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
            grad_w = grad_w if need_w else None
            grad_b = torch.empty(num_classes, dtype=dtype, device=x.device) if need_b else None
            w_d = weight.detach()
            # the B target entries of d loss / d z, before the row factor g s: (p_y - 1) psi'
            p_minus_1 = p_target - 1  # (once: the target entries, grad b and grad t)
            target_value = p_minus_1 * (0 if slope is None else slope)
            # operand of grad W: x g s (float16: over c where a block's product could leave
            # its range, the probabilities and target entries bounding G; put back per block)
            largest = 1.0  # G's largest entry: the probabilities' 1, or a target entry
            if mm_dtype == torch.float16:
                largest = target_value.detach().abs().amax().clamp_min(1.0)
            x_grad_op, top = float16_gradient_operand(xc, gs.unsqueeze(1), mm_dtype, largest)
            x_grad_op = x_grad_op.to(mm_dtype)
            targets = _Targets(labels, config.block, num_classes)
            # the buffer holds e^(l - m) (times phi'(z) if stores_slope), or z (phi otherwise)
            exps = buffer is not None and (phi is None or config.stores_slope)
            row_factor = torch.exp(block_max - lse) if exps else None
            if row_factor is not None and config.slope_scale != 1.0:
                row_factor.div_(config.slope_scale)  # the buffer holds e^(l - m) s phi'(z)
            # with phi and a tensor scale: sum over j != y of p_ij phi(z_ij), for grad s
            phi_sum = torch.zeros_like(lse) if phi is not None and need_s else None
            radial_scale = None if inv_norm is None else inv_norm * inv_norm * active
            scratch = None  # for the blocks' radial terms (and recomputed column norms)
            if inv_norm is not None and grad_w is not None:
                scratch = _column_scratch(x.shape[1], weight.shape[1], config, x.device)
            for k, (start, stop) in enumerate(_blocks(num_classes, config.block)):
                first, last = start * per_class, stop * per_class  # the block's columns
                w = w_d[:, first:last]
                inv = None if inv_norm is None else inv_norm[first:last]
                w_mm, inv_after = _operand(w, inv, config)
                stored = winner = z = None
                if buffer is not None:  # exponentials, or the (class) cosines with phi
                    stored = buffer[batch * start : batch * stop].view(batch, stop - start)
                    if winners is not None:
                        winner = winners[batch * start : batch * stop].view(batch, stop - start)
                elif per_class > 1:  # recompute the class cosines and their winners
                    winner = torch.empty(
                        batch, stop - start, dtype=_winner_dtype(per_class), device=x.device
                    )
                    z = _sub_centre_block(xs, w, inv, per_class, config, winner, True)
                elif not config.fold_scale:  # recompute the cosines
                    z = _block_logits(xs, w_mm, inv_after, None, start, dtype)
                if phi is not None and row_factor is None:
                    z = stored if z is None else z
                    value, phi_slope = _phi_and_slope(phi, z)
                    prob = _scaled_logits(value, s_col, bias, start, dtype)
                    exp_in_place(prob.sub_(lse.unsqueeze(1)))
                    targets.set(prob, k, 0.0)
                    if phi_sum is not None:
                        phi_sum.add_(torch.linalg.vecdot(prob, value.to(dtype)))
                elif stored is not None:
                    prob = stored * row_factor[k].unsqueeze(1)  # target entries are 0
                else:
                    if z is None:
                        prob = _block_logits(xs, w_mm, inv_after, bias, start, dtype)
                    else:
                        prob = _scaled_logits(z, s_col, bias, start, dtype)
                    exp_in_place(prob.sub_(lse.unsqueeze(1)))
                    if grad_b is not None:
                        targets.set(prob, k, 0.0)
                if grad_b is not None:  # off the target (its share: after the blocks)
                    grad_b[start:stop] = torch.mv(prob.t(), g)
                if phi is not None and row_factor is None:
                    prob.mul_(phi_slope)  # d l_ij / d z_ij = s_i phi'(z_ij)
                targets.set(prob, k, target_value)
                if winner is not None:  # each class's entry to its winning sub-centre
                    prob = _to_columns(prob, winner, per_class, targets, k, target_winner)
                if inv_after is not None:
                    prob.mul_(inv_after)  # P diag(1/|W_j|): the products then use the raw W
                prob_mm = prob.to(mm_dtype)
                if need_x or need_s:
                    if mm_dtype == dtype:
                        acc.addmm_(prob, w_mm.t())
                    else:
                        acc.add_(torch.mm(prob_mm, w_mm.t()).to(dtype))
                if grad_w is not None:
                    # G1 = x_g^T P diag(1/n); grad W = G1 - W diag(<G1_j, W_j> / n_j^2)
                    dest = grad_w[:, first:last]
                    direct = grad_w.dtype == mm_dtype == dtype
                    g1 = torch.mm(x_grad_op.t(), prob_mm, out=dest if direct else None)
                    g1 = g1.to(dtype) if top is None else g1.to(dtype).mul_(top)
                    if inv is not None and inv_after is None:  # unit columns: G1 still
                        g1.mul_(inv)  # lacks diag(1/n)
                    if inv is not None:
                        wc = w.to(dtype)
                        radial = column_dots(g1, wc, scratch).mul_(radial_scale[first:last])
                        g1.addcmul_(wc, radial, value=-1)
                    if not direct:
                        dest.copy_(g1)
            grad_x = grad_s = grad_t = None
            if need_x:
                grad_x = (acc * gs.unsqueeze(1)).to(x.dtype)
            if need_s:  # sum_{j != y} p_j phi(z_j); without phi, <x, acc> minus the target entry
                nontarget = phi_sum
                if nontarget is None:
                    nontarget = (xc * acc).sum(1) - target_value * z_y
                if config.target_psi is not None:  # the target's share: (p_y - 1) psi
                    nontarget = torch.addcmul(nontarget, p_minus_1, config.target_psi)
                grad_s = (g * nontarget).to(scale_tensor.dtype)
            if grad_b is not None:  # the targets' share, in dtype: the bias's dtype once
                grad_b = grad_b.index_add_(0, labels, g * p_minus_1).to(bias.dtype)
            if need_t:
                grad_t = g * p_minus_1
        return grad_x, grad_w, grad_s, grad_b, grad_t, None, None, None, None, None
