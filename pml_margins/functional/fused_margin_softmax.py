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
**constants** here (no gradient reaches them: detach them). Its derivative
:math:`\phi'(z)` comes from its ``slope(z)`` method when it has one (same shapes; see
:class:`NonTargetLogitFn`), else from autograd on the block. The forward applies
:math:`\phi` to each block's cosines before scaling; the backward multiplies the
block's probabilities by :math:`\phi'(z)` (the target entries are replaced as before).
In default mode the saved ``(B, C)`` buffer then holds the **cosines** ``z`` instead
of the block exponentials, and the backward re-forms :math:`\phi(z)`, the exponential
and :math:`\phi'(z)` element-wise from it: a few ``(B, C)`` element-wise passes, and
no fourth matrix product (re-forming ``z`` would cost one, ``B·D·C`` multiply-adds,
against a handful of operations per element). Bounded mode recomputes ``z`` as it
already does. With a tensor scale, :math:`\partial L/\partial s_i` takes one more
row-sum pass, :math:`\sum_{j\ne y_i} p_{ij}\phi(z_{ij})`.

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

Under autocast (bf16/fp16) the matrix products run in the autocast dtype while the
log-sum-exp, the margins and every accumulation stay in float32; the storage
dtype of ``W`` never changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from pml_margins.functional.margin_softmax import TargetLogitFn, autocast_off, compute_dtype
from pml_margins.validation import check_chunk_size, check_sample_rate

__all__ = [
    "MATERIALIZE_MAX_ELEMENTS",
    "FusedLogits",
    "NonTargetLogitFn",
    "auto_chunk_size",
    "fused_margin_softmax_cross_entropy",
    "sample_classes",
]

ChunkSize = int | str | None

#: ``F.normalize``'s default: norms below this are clamped (the gradient then ignores the norm)
_NORM_EPS = 1e-12
#: elements of one ``(B, k)`` block in default mode on CPU: about 4 MiB of fp32, cache-sized
_CPU_BLOCK_ELEMENTS = 1 << 20
#: default mode: block temporaries at most 1/this of the saved (B, C) buffer (small C)
_DEFAULT_BLOCK_FRACTION = 2
#: elements of the largest ``(B or D, k)`` temporary on an accelerator: 256 MiB of fp32
_DEVICE_BLOCK_ELEMENTS = 1 << 26
#: default mode materializes the (B, C) logits and lets autograd differentiate them up
#: to this many elements, where the blocked function's per-block overhead outweighs its
#: saving (benchmarks/losses.py, C = 100 and 1,000 rows; BENCHMARKS.md)
MATERIALIZE_MAX_ELEMENTS = 1 << 18


class NonTargetLogitFn(Protocol):
    r"""A non-target function :math:`\phi` that also gives its derivative (optional protocol).

    Any element-wise callable is accepted as ``non_target_logit_fn``; one that also has
    ``slope`` spares the core an autograd pass per block in the backward.
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
        \ell_{ij} = s_i\,	ilde x_i^	op 	ilde W_j + b_j

    where :math:`	ilde x_i` is :math:`x_i/\|x_i\|` when ``normalize_embeddings``
    (else :math:`x_i`), :math:`	ilde W_j` likewise with ``normalize_weight``, and the
    target-logit function applies to :math:`	ilde x_i^	op 	ilde W_{y_i}`.

    A :class:`~pml_margins.losses.ClassWeightLoss` returns one from
    ``fused_logits`` to declare that its ``base_logits`` are exactly this.

    Attributes:
        normalize_embeddings: L2-normalize the embeddings (rows).
        normalize_weight: L2-normalize the class weights (columns of ``W``).
        scale: :math:`s`, a float or a ``(B,)`` tensor (may require grad).
        bias: optional ``(C,)`` per-class bias :math:`b`.
    """

    normalize_embeddings: bool
    normalize_weight: bool
    scale: float | torch.Tensor = 1.0
    bias: torch.Tensor | None = None


def auto_chunk_size(
    batch_size: int, embedding_size: int, device: torch.device | str = "cpu"
) -> int:
    """Classes per block in bounded mode: cache-sized on CPU, ~256 MiB temporaries elsewhere."""
    budget = _CPU_BLOCK_ELEMENTS if torch.device(device).type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    return max(256, budget // max(batch_size, embedding_size, 1))


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
        and the labels remapped into ``[0, len(index))``.
    """
    sample_rate = check_sample_rate(sample_rate)
    num_sample = round(sample_rate * num_classes)
    if num_sample >= num_classes:
        return None
    device = labels.device
    positives = torch.unique(labels.long())
    rand_device = generator.device if generator is not None else device
    scores = torch.rand(num_classes, generator=generator, device=rand_device).to(device)
    scores[positives] = 2.0  # above every uniform draw: always kept
    num_sample = max(num_sample, positives.numel())
    index = torch.topk(scores, num_sample, sorted=False).indices.sort().values
    return index, torch.searchsorted(index, labels.long())


def fused_margin_softmax_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target_logit_fn: TargetLogitFn | None,
    scale: float | torch.Tensor = 1.0,
    *,
    normalize_embeddings: bool = True,
    normalize_weight: bool = True,
    bias: torch.Tensor | None = None,
    chunk_size: ChunkSize = None,
    sample_rate: float = 1.0,
    generator: torch.Generator | None = None,
    materialize: bool | None = None,
    non_target_logit_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""Per-sample margin-softmax cross-entropy straight from embeddings and class weights.

    Args:
        embeddings: ``(B, D)`` floating tensor.
        weight: class weights ``W``, shape ``(D, C)`` (PML's layout), any floating dtype;
            its storage is never cast as a whole (blocks are cast on the fly).
        labels: ``(B,)`` integer classes in ``[0, C)`` (not re-validated here).
        target_logit_fn: :math:`\psi`, applied to the ``(B,)`` vector of target cosines;
            ``None`` for the identity. Element ``i`` of its output must depend on element
            ``i`` of its input only; it may close over per-row ``(B,)`` tensors (margins,
            norms), which then get their gradients too.
        scale: :math:`s`, a float or a ``(B,)`` tensor (may require grad, e.g.
            :math:`\|x_i\|` for SphereFace).
        normalize_embeddings: L2-normalize the rows of ``embeddings`` (``F.normalize``).
        normalize_weight: L2-normalize the columns of ``W``.
        bias: optional ``(C,)`` per-class bias added to every logit.
        chunk_size: ``None`` (one saved ``(B, C)`` buffer, fastest), an ``int`` number
            of classes per block, or ``"auto"`` (:func:`auto_chunk_size`) for the
            bounded-memory mode that never holds a ``(B, C)`` tensor.
        sample_rate: partial-FC fraction of classes, in ``(0, 1]`` (:func:`sample_classes`).
        generator: random generator for the class sampling.
        materialize: ``True`` forms the ``(B, C)`` logits and lets autograd differentiate
            them (faster for small problems); ``False`` always runs the blocked function;
            ``None`` (default) materializes in default mode (``chunk_size=None``) up to
            :data:`MATERIALIZE_MAX_ELEMENTS` logits. Same values either way.
        non_target_logit_fn: :math:`\phi`, applied element-wise to the non-target cosines
            before scaling (``None``: identity); see the module docstring for what it may
            depend on (per-row constants) and :class:`NonTargetLogitFn` for its optional
            ``slope``.

    Returns:
        ``(B,)`` losses in ``compute_dtype`` of the inputs (float32 under autocast).

    Raises:
        ValueError: bad ``chunk_size`` or ``sample_rate``, or mismatched shapes.

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
    if embeddings.ndim != 2 or weight.ndim != 2 or embeddings.shape[1] != weight.shape[0]:
        raise ValueError(
            f"embeddings (B, D) and weight (D, C) do not match: "
            f"{tuple(embeddings.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[1],):
        raise ValueError(f"bias must have shape ({weight.shape[1]},), got {tuple(bias.shape)}")
    labels = labels.long()
    if sample_rate < 1:
        sampled = sample_classes(labels, weight.shape[1], sample_rate, generator)
        if sampled is not None:
            index, labels = sampled
            weight = weight.index_select(1, index)
            bias = None if bias is None else bias.index_select(0, index)
    # half embeddings are widened before the normalization, so it does not round to their dtype
    x = embeddings.to(compute_dtype(torch.promote_types(embeddings.dtype, weight.dtype)))
    x = F.normalize(x, dim=1, eps=_NORM_EPS) if normalize_embeddings else x
    batch, width = x.shape
    num_classes = weight.shape[1]
    saved = chunk_size is None
    if chunk_size is None:
        # block temporaries of (B or D) x block elements: cache-sized, and small next to the buffer
        widest = max(batch, width, 1)
        budget = _CPU_BLOCK_ELEMENTS if x.device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
        share = batch * num_classes // (_DEFAULT_BLOCK_FRACTION * widest)
        block = min(budget // widest, max(256, share))
    elif chunk_size == "auto":
        block = auto_chunk_size(batch, width, x.device)
    else:
        block = chunk_size
    block = min(block, num_classes)
    scale_tensor = scale if isinstance(scale, torch.Tensor) else None
    scale_value = 1.0 if isinstance(scale, torch.Tensor) else float(scale)
    if scale_tensor is not None and scale_tensor.shape != (batch,):
        raise ValueError(f"a tensor scale must have shape ({batch},), got {tuple(scale.shape)}")
    if materialize is None:
        materialize = saved and batch * num_classes <= MATERIALIZE_MAX_ELEMENTS
    phi = non_target_logit_fn
    if materialize:
        return _materialized(x, weight, labels, target_logit_fn, scale, normalize_weight, bias, phi)
    config = _Config(scale_value, normalize_weight, block, saved, *_dtypes(x, weight), phi)
    inputs = (x, weight, scale_tensor, bias)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    target, slope, z_y = _target_terms(
        x, weight, labels, target_logit_fn, scale, normalize_weight, bias, grad
    )
    if grad or target.requires_grad:
        return _FusedMarginSoftmax.apply(
            x, weight, scale_tensor, bias, target, labels, slope, z_y, config
        )
    with torch.no_grad():
        return _forward(x, weight, scale_tensor, bias, target, labels, config, save=False)[0]


def _target_terms(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target_logit_fn: TargetLogitFn | None,
    scale: float | torch.Tensor,
    normalize_weight: bool,
    bias: torch.Tensor | None,
    slope_needed: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    r"""The target logits :math:`t`, the slope :math:`\psi'(z)` and the target cosines ``z``.

    ``z`` is computed without a graph (the blocked function differentiates it); ``t``
    has the graph of :math:`\psi`'s other inputs, the scale and the bias.
    """
    dtype = x.dtype
    with autocast_off(x.device.type):
        with torch.no_grad():
            w_y = weight.index_select(1, labels).to(dtype)
            w_y = F.normalize(w_y, dim=0, eps=_NORM_EPS) if normalize_weight else w_y
            z_y = (x * w_y.t()).sum(1)
        slope = None
        if target_logit_fn is None:
            psi = z_y
            slope = torch.ones_like(z_y) if slope_needed else None
        else:
            with torch.enable_grad():
                leaf = z_y.clone().requires_grad_(slope_needed)
                psi = target_logit_fn(leaf).to(dtype)
                if slope_needed:
                    slope = _slope(psi, leaf)
            if not slope_needed and not psi.requires_grad:
                psi = psi.detach()
        target = psi * (scale.to(dtype) if isinstance(scale, torch.Tensor) else float(scale))
        if bias is not None:
            target = target + bias.index_select(0, labels).to(dtype)
        return target, slope, z_y


def _slope(psi: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    r""":math:`\partial\psi/\partial z`, element-wise, keeping the graph of :math:`\psi`."""
    if not psi.requires_grad:
        return torch.zeros_like(leaf)
    (slope,) = torch.autograd.grad(
        psi, leaf, torch.ones_like(psi), retain_graph=True, allow_unused=True
    )
    return torch.zeros_like(leaf) if slope is None else slope.detach()


def _materialized(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target_logit_fn: TargetLogitFn | None,
    scale: float | torch.Tensor,
    normalize_weight: bool,
    bias: torch.Tensor | None,
    phi: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The same losses on the materialized ``(B, C)`` base logits, differentiated by autograd.

    ``x`` is already in the compute dtype (and normalized when asked). The ``B`` target
    cosines are gathered from the product and written back, margined and scaled, in
    place: as few ``(B, C)`` passes as a hand-written loss makes.
    """
    dtype = x.dtype
    w = weight.to(dtype)
    cosine = torch.mm(x, w)  # the autocast dtype under autocast
    with autocast_off(x.device.type):
        cosine = cosine.to(dtype)
        if normalize_weight:  # a column scaling of the (B, C) product: no normalized W copy
            norm = torch.linalg.vector_norm(w, dim=0).clamp_min(_NORM_EPS)
            cosine = cosine / norm
        index = labels.unsqueeze(1)
        z_y = cosine.gather(1, index).squeeze(1)
        psi = z_y if target_logit_fn is None else target_logit_fn(z_y).to(dtype)
        s = scale.to(dtype) if isinstance(scale, torch.Tensor) else float(scale)
        base = cosine if phi is None else phi(cosine).to(dtype)
        logits = base * (s.unsqueeze(1) if isinstance(s, torch.Tensor) else s)
        target = psi * s
        if bias is not None:
            b = bias.to(dtype)
            logits = logits + b
            target = target + b.index_select(0, labels)
        logits = logits.scatter_(1, index, target.unsqueeze(1))
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
    ) -> None:
        self.scale = scale
        self.normalize_weight = normalize_weight
        self.block = block
        self.saved = saved
        self.dtype = dtype  # softmax, margins, accumulations
        self.mm_dtype = mm_dtype  # operands of the matrix products
        self.phi = phi  # the non-target function (None: identity)


def _dtypes(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    dtype = compute_dtype(torch.promote_types(x.dtype, weight.dtype))
    device_type = x.device.type
    if dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return dtype, torch.get_autocast_dtype(device_type)
    return dtype, dtype


class _Targets:
    """Where each row's target column falls in the blocks, to set those ``B`` entries per block."""

    def __init__(self, labels: torch.Tensor, block: int, num_classes: int) -> None:
        self.block_id = torch.div(labels, block, rounding_mode="floor")
        col = (labels - self.block_id * block).unsqueeze(1)
        last_width = num_classes - (num_classes - 1) // block * block
        self.col = col
        self.col_last = col.clamp(max=last_width - 1)
        self.num_blocks = (num_classes + block - 1) // block

    def set(self, logits: torch.Tensor, k: int, value: float | torch.Tensor) -> None:
        """``logits[i, col_i] = value`` (or ``value[i]``) for rows whose target is in block k."""
        col = self.col_last if k == self.num_blocks - 1 else self.col
        inside = (self.block_id == k).unsqueeze(1)
        if isinstance(value, torch.Tensor):
            value = value.unsqueeze(1)
        logits.scatter_(1, col, torch.where(inside, value, logits.gather(1, col)))


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


def _phi_logits(
    value: torch.Tensor,
    s_col: float | torch.Tensor,
    bias: torch.Tensor | None,
    start: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``s phi(z) + b`` of one block from ``value = phi(z)``, as a new tensor."""
    logits = value.to(dtype) * s_col
    if bias is not None:
        logits.add_(bias[start : start + logits.shape[1]].to(dtype))
    return logits


def _phi_and_slope(
    phi: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\phi(z)` and :math:`\phi'(z)` of a block (by ``phi.slope``, else autograd)."""
    slope = getattr(phi, "slope", None)
    if slope is not None:
        return phi(z), slope(z)
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        value = phi(leaf)
        if not value.requires_grad:  # constant in z
            return value.detach(), torch.zeros_like(z)
        (grad,) = torch.autograd.grad(value, leaf, torch.ones_like(value))
    return value.detach(), grad


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
        phi = config.phi
        # the products give s z, or z itself when phi applies before the scale
        xs = (xc if phi is not None else xc * s_col).to(config.mm_dtype)
        target = target.detach().to(dtype)
        # log-sum-exp of the non-target logits, block by block
        batch, num_classes = x.shape[0], weight.shape[1]
        blocks = _blocks(num_classes, config.block)
        targets = _Targets(labels, config.block, num_classes)
        opts = {"dtype": dtype, "device": x.device}
        block_max = torch.empty(len(blocks), batch, **opts)
        block_sum = torch.empty(len(blocks), batch, **opts)
        buffer = torch.empty(batch * num_classes, **opts) if save else None
        bias_d = None if bias is None else bias.detach()
        w_d = weight.detach()
        inv_norm = active = None
        if config.normalize_weight:
            inv_norm = torch.empty(num_classes, **opts)
        lowest = torch.finfo(dtype).min
        for k, (start, stop) in enumerate(blocks):
            w = w_d[:, start:stop]
            inv = None
            if inv_norm is not None:
                inv = inv_norm[start:stop]
                wc = w.to(dtype)
                torch.rsqrt(torch.linalg.vecdot(wc, wc, dim=0).clamp_min_(_NORM_EPS**2), out=inv)
            out = None
            if buffer is not None:
                out = buffer[batch * start : batch * stop].view(batch, stop - start)
            w_mm = w.to(config.mm_dtype)
            if phi is None:
                logits = _block_logits(xs, w_mm, inv, bias_d, start, dtype, out)
            else:  # the buffer keeps the cosines z; the logits s phi(z) + b are a new block
                z = _block_logits(xs, w_mm, inv, None, start, dtype, out)
                logits = _phi_logits(phi(z), s_col, bias_d, start, dtype)
            targets.set(logits, k, float("-inf"))
            m = torch.amax(logits, 1, out=block_max[k]).clamp_min_(lowest)  # finite
            logits.sub_(m.unsqueeze(1)).exp_()
            torch.sum(logits, 1, out=block_sum[k])
        if inv_norm is not None:
            # norms above eps (the others are clamped, so no gradient flows through them)
            active = inv_norm < (1 - 1e-3) / _NORM_EPS
        top = block_max.amax(0)
        others = top + torch.log((block_sum * torch.exp(block_max - top)).sum(0))
        lse = torch.logaddexp(others, target)
        losses = lse - target
    state = {
        "buffer": buffer,
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
        config: _Config,
    ) -> torch.Tensor:
        losses, st = _forward(
            x, weight, scale_tensor, bias, target, labels, config, save=config.saved
        )
        ctx.config = config
        ctx.has_scale = scale_tensor is not None
        ctx.has_bias = bias is not None
        ctx.save_for_backward(
            x,
            weight,
            scale_tensor,
            bias,
            labels,
            st["buffer"],
            st["block_max"],
            st["lse"],
            st["p_target"],
            slope,
            z_y,
            st["inv_norm"],
            st["active"],
        )
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (
            x,
            weight,
            scale_tensor,
            bias,
            labels,
            buffer,
            block_max,
            lse,
            p_target,
            slope,
            z_y,
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
            phi = config.phi
            # forward operand, for recomputation (s z, or z when phi applies before the scale)
            xs = (xc if phi is not None else xc * s_col).to(mm_dtype)
            x_grad_op = (xc * gs.unsqueeze(1)).to(mm_dtype)  # operand of grad W
            batch, num_classes = x.shape[0], weight.shape[1]
            # A = sum over non-target classes j of p_ij W_hat_j  (B, D)
            acc = torch.zeros(batch, x.shape[1], dtype=dtype, device=x.device)
            grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
            grad_w = grad_w if need_w else None
            grad_b = torch.empty(num_classes, dtype=dtype, device=x.device) if need_b else None
            w_d = weight.detach()
            # the B target entries of d loss / d z, before the row factor g s: (p_y - 1) psi'
            target_value = (p_target - 1) * (0 if slope is None else slope)
            targets = _Targets(labels, config.block, num_classes)
            row_factor = None if buffer is None or phi is not None else torch.exp(block_max - lse)
            # with phi and a tensor scale: sum over j != y of p_ij phi(z_ij), for grad s
            phi_sum = torch.zeros_like(lse) if phi is not None and need_s else None
            radial_scale = None if inv_norm is None else inv_norm * inv_norm * active
            for k, (start, stop) in enumerate(_blocks(num_classes, config.block)):
                w = w_d[:, start:stop]
                w_mm = w.to(mm_dtype)
                inv = None if inv_norm is None else inv_norm[start:stop]
                if phi is not None:
                    if buffer is not None:  # the saved cosines
                        z = buffer[batch * start : batch * stop].view(batch, stop - start)
                    else:
                        z = _block_logits(xs, w_mm, inv, None, start, dtype)
                    value, phi_slope = _phi_and_slope(phi, z)
                    prob = _phi_logits(value, s_col, bias, start, dtype)
                    prob.sub_(lse.unsqueeze(1)).exp_()
                    targets.set(prob, k, 0.0)
                    if phi_sum is not None:
                        phi_sum.add_(torch.linalg.vecdot(prob, value.to(dtype)))
                elif buffer is not None:
                    stored = buffer[batch * start : batch * stop].view(batch, stop - start)
                    prob = stored * row_factor[k].unsqueeze(1)  # target entries are 0
                else:
                    prob = _block_logits(xs, w_mm, inv, bias, start, dtype)
                    prob.sub_(lse.unsqueeze(1)).exp_()
                    if grad_b is not None:
                        targets.set(prob, k, 0.0)
                if grad_b is not None:  # the target's share reaches b through t
                    grad_b[start:stop] = torch.mv(prob.t(), g)
                if phi is not None:
                    prob.mul_(phi_slope)  # d l_ij / d z_ij = s_i phi'(z_ij)
                targets.set(prob, k, target_value)
                if inv is not None:
                    prob.mul_(inv)  # P diag(1/|W_j|): the products then use the raw W
                prob_mm = prob.to(mm_dtype)
                if need_x or need_s:
                    if mm_dtype == dtype:
                        acc.addmm_(prob, w_mm.t())
                    else:
                        acc.add_(torch.mm(prob_mm, w_mm.t()).to(dtype))
                if grad_w is not None:
                    # G1 = x_g^T P diag(1/n); grad W = G1 - W diag(<G1_j, W_j> / n_j^2)
                    dest = grad_w[:, start:stop]
                    direct = grad_w.dtype == mm_dtype == dtype
                    g1 = torch.mm(x_grad_op.t(), prob_mm, out=dest if direct else None)
                    g1 = g1.to(dtype)
                    if inv is not None:
                        wc = w.to(dtype)
                        radial = torch.linalg.vecdot(g1, wc, dim=0).mul_(radial_scale[start:stop])
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
                grad_s = (g * nontarget).to(scale_tensor.dtype)
            if grad_b is not None:
                grad_b = grad_b.to(bias.dtype)
            if need_t:
                grad_t = g * (p_target - 1)
        return grad_x, grad_w, grad_s, grad_b, grad_t, None, None, None, None
