r"""The margin-softmax cross-entropy with the classes sharded across ranks.

Rank :math:`r` holds the base logits :math:`z^{(r)}` (shape ``(N, C_r)``) of all
``N`` gathered embeddings against its own classes. With :math:`\ell_{ij}` the
scaled logits, :math:`\ell_{ij} = s_i z_{ij}` except at the target, where the
owner rank of :math:`y_i` puts :math:`s_i\,\psi(z_{i,y_i})`:

.. math::
    M_i = \max_r \max_{j \in r} \ell_{ij}, \qquad
    S_i = \sum_r \sum_{j \in r} e^{\ell_{ij} - M_i}, \qquad
    L_i = \log S_i - (\ell_{i,y_i} - M_i)

:math:`M` is one all-reduce (MAX, no gradient: :math:`L` does not depend on
it); :math:`S` and the shifted target logit (non-zero on the owner rank only)
are one all-reduce (SUM) of an ``(N, 2)`` tensor. Every rank then holds the
same ``N`` per-sample losses: exactly those of the single-process
:func:`~pml_margins.functional.margin_softmax_cross_entropy` on the full logits.

Gradient (analytic, no communication): rank :math:`r` gets

.. math::
    \frac{\partial L}{\partial \ell^{(r)}_{ij}} = g_i\,(p_{ij} - [j = y_i]),
    \qquad p_{ij} = e^{\ell_{ij} - M_i} / S_i

for its own columns only, where :math:`g_i = \partial\,\mathrm{loss}/\partial L_i`
must be the same on every rank (it is, when every rank reduces the same ``N``
losses the same way). Autograd carries it through :math:`\psi`, the scale and
the local cosines to the local weight shard (complete: no other rank uses those
columns) and to the local copy of the gathered embeddings (partial: the sum
over ranks, done by the gather's reduce-scatter backward, is the full gradient).
"""

from __future__ import annotations

from typing import Any

import torch

from pml_margins.distributed.collectives import (
    ProcessGroup,
    all_reduce_,
    checked_on_every_rank,
    dtype_code,
    settings_code,
)
from pml_margins.functional.autograd_switch import SHARDED_REMEDY, backward_once
from pml_margins.functional.margin_softmax import (
    TargetLogitFn,
    check_scale,
    compute_dtype,
    elementwise_result,
    scale_logits,
)
from pml_margins.validation import (
    caller_checked,
    check_class_labels,
    check_similarities,
    function_value_checks,
    value_checks_enabled,
)

__all__ = ["sharded_margin_softmax_cross_entropy"]


class _ShardedSoftmaxCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by columns across ranks; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        group: ProcessGroup | None,
        count_owners: bool,
    ):
        owned = target >= 0
        row_max = (
            logits.max(dim=1).values
            if logits.shape[1]
            else logits.new_full((logits.shape[0],), -torch.inf)
        )
        row_max = all_reduce_(row_max, "max", group)
        exp = (logits - row_max.unsqueeze(1)).exp_()
        # the third column: how many ranks own each row
        stats = torch.zeros(logits.shape[0], 3, dtype=logits.dtype, device=logits.device)
        stats[:, 0] = exp.sum(dim=1)
        if logits.shape[1]:  # (gather and where: no boolean indexing, no host sync)
            picked = logits.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1) - row_max
            stats[:, 1] = torch.where(owned, picked, 0.0)
        stats[:, 2] = owned.to(logits.dtype)
        stats = all_reduce_(stats, "sum", group)
        if count_owners:
            _check_one_owner(stats[:, 2])
        # unchecked (value checks off), a row that no rank or several own has no one target:
        # NaN, its loss and its gradients, rather than a softmax toward no class
        single = stats[:, 2] == 1
        ctx.save_for_backward(exp, stats[:, 0], target, single)
        return torch.where(single, torch.log(stats[:, 0]) - stats[:, 1], torch.nan)

    @staticmethod
    @backward_once("the sharded softmax cross-entropy", SHARDED_REMEDY)
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if getattr(ctx, "backward_done", False):  # (retain_graph=True: the buffer is gone)
            raise RuntimeError(
                "the sharded softmax cross-entropy turns its saved softmax into the gradient "
                "(one B x C_local buffer, not two): a second backward through the same graph "
                "(retain_graph=True) is not supported; run the forward again"
            )
        exp, sum_exp, target, single = ctx.saved_tensors
        ctx.backward_done = True
        grad = torch.where(single, grad, torch.nan)
        # in place: the softmax buffer becomes the gradient
        grad_logits = exp.mul_((grad / sum_exp).unsqueeze(1))
        if grad_logits.shape[1]:  # minus the gradient at each owned target (no sync)
            share = torch.where(target >= 0, -grad, 0.0).to(grad_logits.dtype)
            grad_logits.scatter_add_(1, target.clamp(min=0).unsqueeze(1), share.unsqueeze(1))
        return grad_logits, None, None, None


def _check_inputs(local_logits: object, local_target: object, scale: object) -> Any:
    """``(N, C_local)`` logits without NaN or ``+inf`` (``-inf`` masks a class), ``(N,)``
    integer columns in ``[-1, C_local)`` and a scale for ``N`` rows; returns the scale
    (:func:`~pml_margins.functional.margin_softmax.check_scale`)."""
    checks = function_value_checks()
    logits = check_similarities(local_logits, "local_logits", 2, checks, minus_inf=True)
    check_class_labels(
        local_target, logits.shape[0], logits.shape[1], "local_target", checks, "C_local", low=-1
    )
    checks.run()
    return check_scale(scale, logits.shape[0], callable_ok=False)


def _check_one_owner(owners: torch.Tensor) -> None:
    """``ValueError`` unless every row is owned by exactly one rank (the same reduced
    counts on every rank: all raise, none waits in a collective)."""
    wrong = torch.nonzero(owners != 1).squeeze(1)
    if len(wrong):
        rows = wrong[:5].tolist()
        counts = owners[wrong[:5]].to(torch.int64).tolist()
        raise ValueError(
            "local_target: every row must be owned by exactly one rank (its column on that "
            f"rank, -1 on the others); rows {rows} are owned by {counts} ranks"
        )


def _scale_code(scale: object) -> tuple[float, str]:
    """What the ranks compare of a scale: a number by its value (:func:`settings_code`);
    any tensor alike (its values would need a read), and it shown."""
    if isinstance(scale, torch.Tensor):
        return -1.0, f"a tensor of shape {tuple(scale.shape)}"
    return settings_code(scale), repr(scale)


def sharded_margin_softmax_cross_entropy(
    local_logits: torch.Tensor,
    local_target: torch.Tensor,
    target_logit_fn: TargetLogitFn | None,
    scale: float | torch.Tensor = 1.0,
    group: ProcessGroup | None = None,
    non_target_logit_fn: TargetLogitFn | None = None,
) -> torch.Tensor:
    r"""Per-sample margin-softmax cross-entropy with the classes split across ranks.

    Args:
        local_logits: base logits ``z`` of all ``N`` (gathered) embeddings against
            this rank's classes, shape ``(N, C_local)``.
        local_target: ``(N,)`` integer column of each row's target class in
            ``local_logits``, or ``-1`` where another rank owns the class. Every
            row must be owned by exactly one rank.
        target_logit_fn: :math:`\psi` (``None``: identity), applied to an ``(N,)`` vector
            that holds this rank's owned target logits (0 in the other rows, whose
            results are dropped), so that element ``i`` belongs to row ``i`` as on every
            single-process path: :math:`\psi` may close over per-row ``(N,)`` tensors
            (margins, feature norms of the gathered batch), which get their gradients.
        scale: :math:`s`, a float, a 0-dim tensor or ``N`` per-row scales (the same on
            every rank).
        group: the process group (default: the world; none initialized: one process).
        non_target_logit_fn: applied element-wise to every local base logit before
            scaling (``None``: identity); the owned target entries are then
            overwritten with ``target_logit_fn`` of their base logit, as in
            :func:`~pml_margins.functional.margin_softmax_cross_entropy`.

    Returns:
        The ``N`` per-sample losses, identical on every rank, in
        ``compute_dtype(local_logits.dtype)``. Backward needs the same upstream
        gradient on every rank (see the module docstring).

    Example:
        Without a process group this is the single-process core:

        >>> from pml_margins.functional import margin_softmax_cross_entropy
        >>> z, y = torch.randn(4, 6).tanh(), torch.tensor([0, 5, 2, 2])
        >>> a = sharded_margin_softmax_cross_entropy(z, y, lambda c: c - 0.35, 30.0)
        >>> b = margin_softmax_cross_entropy(z, y, lambda c: c - 0.35, 30.0)
        >>> torch.allclose(a, b)
        True
    """
    checked = caller_checked()
    if not checked:  # every rank raises when one does (none waits in a collective)
        is_tensor = isinstance(local_logits, torch.Tensor)
        rows = local_logits.shape[0] if is_tensor and local_logits.ndim == 2 else -1
        dtype = local_logits.dtype if is_tensor else None
        scale = checked_on_every_rank(
            lambda: _check_inputs(local_logits, local_target, scale),
            group,
            local_logits.device if is_tensor else torch.device("cpu"),
            {
                "numbers of rows": (rows, str(rows)),
                "logits dtypes": (dtype_code(dtype), str(dtype)),
                # the owner count raises where they are on: the same on every rank
                "value checks": (float(value_checks_enabled()), str(value_checks_enabled())),
                # a number by its value (10 and 10.0 agree); a tensor's values are not
                # read (a host read): any tensor passes
                "scales": _scale_code(scale),
            },
        )
    # the owners of each row, counted in the forward's all-reduce: refused where the value
    # checks are on, NaN rows where they are off
    count_owners = not checked and value_checks_enabled()
    dtype = compute_dtype(local_logits.dtype)
    with torch.autocast(device_type=local_logits.device.type, enabled=False):
        logits = local_logits.to(dtype)
        if isinstance(scale, torch.Tensor):  # one per row (check_scale expands a 0-dim one)
            scale = scale.to(dtype).expand(logits.shape[0]).reshape(-1, 1)
        base = logits
        if non_target_logit_fn is not None:  # (in the compute dtype, as the other cores)
            base = elementwise_result(non_target_logit_fn(logits), logits, "non_target_logit_fn")
            base = base.to(dtype)
        scaled = scale_logits(base, scale)
        target = local_target.long()
        targets_set = target_logit_fn is not None or non_target_logit_fn is not None
        if targets_set and logits.shape[1]:  # (gather, where, scatter: no host read)
            # the owned target entries: psi of their base logit (the identity when None,
            # also where a non-target function changed the others)
            owned, cols = target >= 0, target.clamp(min=0).unsqueeze(1)
            # every row's slot (0 where another rank owns the class), so that per-row
            # closures line up; only the owned rows' values are kept
            every_row = torch.where(owned, logits.gather(1, cols).squeeze(1), 0.0)
            psi = every_row
            if target_logit_fn is not None:
                psi = target_logit_fn(every_row)
                psi = elementwise_result(psi, every_row, "target_logit_fn").to(dtype)
            psi = psi * (scale.squeeze(1) if isinstance(scale, torch.Tensor) else scale)
            # elsewhere the entry as it is (formed again from base: a gather of scaled would
            # save it for its backward, and scatter_ then changes it)
            same = scale_logits(base.gather(1, cols), scale).squeeze(1)
            kept = torch.where(owned, psi, same)
            scaled.scatter_(1, cols, kept.unsqueeze(1))  # mul's backward needs no output
        return _ShardedSoftmaxCrossEntropy.apply(scaled, target, group, count_owners)
