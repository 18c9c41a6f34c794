"""Thin, autograd-aware wrappers over ``torch.distributed`` collectives.

Everything goes through the process group's own collectives (gloo on CPU, NCCL
on CUDA); nothing here moves bytes by itself. Without an initialized process
group every function acts as if ``world_size == 1`` (identity), so the sharded
code also runs, unsharded, in one process.

Batches may differ in size between ranks (the last batch of an epoch): rows are
padded to the largest batch for the collective and the padding is dropped again.
"""

from __future__ import annotations

import numbers
import zlib
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_rows",
    "all_reduce_",
    "check_group",
    "checked_on_every_rank",
    "default_backend",
    "gather_rows_with_grad",
    "is_distributed",
    "rank_and_world_size",
]

T = TypeVar("T")

ProcessGroup = object  # ``dist.ProcessGroup`` when torch.distributed is available

# torch >= 2.13 renamed the tensor collectives; older versions only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def default_backend() -> str:
    """``"nccl"`` where CUDA and NCCL are available, else ``"gloo"``: for ``init_process_group``.

    The collectives here run on whatever backend the process group was created
    with; tensors must live where that backend expects them (CUDA for NCCL).
    """
    if torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def is_distributed() -> bool:
    """Whether a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def check_group(group: object) -> ProcessGroup | None:
    """``group`` if it is ``None`` or a ``torch.distributed`` process group, else
    ``TypeError`` (a string or a rank list was taken, and the world used)."""
    process_group = getattr(dist, "ProcessGroup", None) if dist.is_available() else None
    if group is not None and (process_group is None or not isinstance(group, process_group)):
        raise TypeError(
            f"group must be a torch.distributed ProcessGroup (dist.new_group) or None, "
            f"got {type(group).__name__}"
        )
    return group


def rank_and_world_size(group: ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_(tensor: torch.Tensor, op: str, group: ProcessGroup | None = None) -> torch.Tensor:
    """In-place all-reduce (``op`` is ``"sum"`` or ``"max"``), no autograd; returns ``tensor``."""
    if rank_and_world_size(group)[1] > 1:
        dist.all_reduce(
            tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group
        )
    return tensor


def broadcast_from_first_(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """In place, ``group``'s first rank's ``tensor`` on every rank (no autograd); returns it."""
    if rank_and_world_size(group)[1] > 1:
        first = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast(tensor, src=first, group=group)
    return tensor


#: a number per floating dtype, for the ranks to compare theirs
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def dtype_code(dtype: object) -> float:
    """A number for a floating dtype (-1 for anything else): what the ranks compare in
    :func:`checked_on_every_rank`'s ``agreed``."""
    return float(_DTYPE_CODES.get(dtype, -1))  # type: ignore[call-overload]


def settings_code(*settings: object) -> float:
    """A number for ``settings`` that ranks compare in :func:`checked_on_every_rank`'s
    ``agreed``: the CRC-32 of their ``repr`` (the same in every process, unlike
    ``hash``). Plain values only (numbers, strings, ``None``, tuples of them); a real
    number counts by its value as a float (``10``, ``10.0`` and ``np.float32(10)`` agree;
    a bool stays a bool); a tensor by its shape and dtype, not its values (which would
    need a read)."""

    def plain(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), str(value.dtype))
        if isinstance(value, (tuple, list)):
            return tuple(plain(v) for v in value)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        return value

    return float(zlib.crc32(repr(plain(settings)).encode()))


#: relative difference up to which :func:`checked_on_every_rank` takes values as equal
EQUAL_VALUES_RTOL = 1e-6


#: stand-ins of NaN, inf and -inf in the compared values (all-reduce's max of NaN is the
#: backend's choice): finite, far apart, beyond any value a statistic takes
_NON_FINITE = {"nan": 3e300, "inf": 2e300, "-inf": -2e300}


def _comparable(values: torch.Tensor) -> torch.Tensor:
    """``values`` in float64 with NaN and infinities as their :data:`_NON_FINITE` stand-ins."""
    return torch.nan_to_num(
        values.double(),
        nan=_NON_FINITE["nan"],
        posinf=_NON_FINITE["inf"],
        neginf=_NON_FINITE["-inf"],
    )


def _shown(value: float) -> float:
    """A compared value as it was (NaN or an infinity for a stand-in)."""
    return next((float(k) for k, v in _NON_FINITE.items() if v == value), value)


def _differ(high: float, low: float) -> bool:
    """Whether the largest and smallest of the ranks' values differ beyond
    :data:`EQUAL_VALUES_RTOL`."""
    return high - low > EQUAL_VALUES_RTOL * max(abs(high), abs(low))


def checked_on_every_rank(
    check: Callable[[], T],
    group: ProcessGroup | None,
    device: torch.device,
    agreed: Mapping[str, tuple[float, str]] | None = None,
    equal: Mapping[str, torch.Tensor | None] | None = None,
    equal_hint: str = "load the same state dict on every rank",
) -> T:
    """``check()`` (input checks that raise ``TypeError``/``ValueError``; what it returns
    is returned), run so that every rank raises when one does, instead of the others
    waiting in the next collective until the group's timeout: one small all-reduce of the
    ranks' verdicts. ``agreed``: what every rank must share, ``{name: (code, shown)}``
    (an embeddings dtype, say): a ``ValueError`` on every rank names it when the codes
    differ. ``equal``: ``{name: values}`` (``None``: nothing) that must be equal on every
    rank up to :data:`EQUAL_VALUES_RTOL` (running statistics; NaN and infinities equal
    only themselves), read in the same
    all-reduce: their sizes must already agree (a prior call's ``agreed``), else the
    all-reduce itself fails; ``equal_hint`` ends the error that names them.
    """
    if rank_and_world_size(group)[1] == 1:
        return check()
    error: Exception | None = None
    result: T | None = None
    try:
        result = check()
    except (TypeError, ValueError) as err:
        error = err
    agreed = dict(agreed or {})
    values = [float(error is not None)]
    for code, _ in agreed.values():
        values += [code, -code]
    local = [torch.tensor(values, dtype=torch.float64, device=device)]
    spans = {}
    for name, tensor in (equal or {}).items():
        if tensor is not None and tensor.numel():
            start = sum(t.numel() for t in local)
            codes = _comparable(tensor.to(device))
            local += [codes, -codes]
            spans[name] = (start, tensor.numel())
    verdict = all_reduce_(torch.cat(local), "max", group).tolist()
    if error is not None:
        raise error
    if verdict[0] > 0:
        raise ValueError("another rank's input is invalid (its error says why); every rank stops")
    for i, (name, (_, shown)) in enumerate(agreed.items()):
        if verdict[1 + 2 * i] != -verdict[2 + 2 * i]:
            raise ValueError(f"the ranks' {name} differ (this rank's: {shown}); they must agree")
    for name, (start, n) in spans.items():
        high, low = verdict[start : start + n], [-v for v in verdict[start + n : start + 2 * n]]
        differing = [i for i, (h, lo) in enumerate(zip(high, low, strict=True)) if _differ(h, lo)]
        if not differing:
            continue
        if n <= 4:
            between = f"between {[_shown(v) for v in low]} and {[_shown(v) for v in high]}"
        else:  # (a summary per row: name the first that differs, not every value)
            i = differing[0]
            between = (
                f"{len(differing)} of {n} values, the first at {i}: between "
                f"{_shown(low[i])} and {_shown(high[i])}"
            )
        raise ValueError(f"the ranks' {name} differ ({between}); they must be equal ({equal_hint})")
    return result  # type: ignore[return-value]  # check() returned: no error above


def _batch_sizes(rows: int, device: torch.device, group: ProcessGroup | None) -> list[int]:
    world_size = rank_and_world_size(group)[1]
    local = torch.tensor([rows], dtype=torch.long, device=device)
    sizes = torch.empty(world_size, dtype=torch.long, device=device)
    _all_gather_single(sizes, local, group=group)
    return sizes.tolist()


def _valid_rows(sizes: list[int], padded: int, device: torch.device) -> torch.Tensor:
    """Positions of the real rows inside the ``world_size * padded`` gathered rows."""
    return torch.cat([torch.arange(n, device=device) + r * padded for r, n in enumerate(sizes)])


def _gather_padded(x: torch.Tensor, sizes: list[int], group: ProcessGroup | None) -> torch.Tensor:
    padded = max(sizes)
    x = x.contiguous()
    if x.shape[0] < padded:
        x = torch.cat([x, x.new_zeros((padded - x.shape[0], *x.shape[1:]))])
    out = x.new_empty((len(sizes) * padded, *x.shape[1:]))
    _all_gather_single(out, x, group=group)
    if all(n == padded for n in sizes):
        return out
    return out.index_select(0, _valid_rows(sizes, padded, x.device))


def all_gather_rows(
    x: torch.Tensor, group: ProcessGroup | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's ``x`` along dim 0 in rank order (no gradient).

    Returns:
        The gathered tensor and the per-rank row counts.
    """
    if rank_and_world_size(group)[1] == 1:
        return x, [x.shape[0]]
    sizes = _batch_sizes(x.shape[0], x.device, group)
    return _gather_padded(x.detach(), sizes, group), sizes


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward reduce-scatters (sums) the gradient.

    Rank ``r``'s rows of the gathered tensor are used by every rank; the gradient
    of ``x_r`` is therefore the sum over ranks of each rank's gradient for those
    rows, which is what ``reduce_scatter`` computes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], group: ProcessGroup | None):  # type: ignore[override]
        ctx.sizes, ctx.group, ctx.rank = sizes, group, rank_and_world_size(group)[0]
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        sizes, padded = ctx.sizes, max(ctx.sizes)
        full = grad.new_zeros((len(sizes) * padded, *grad.shape[1:]))
        full.index_copy_(0, _valid_rows(sizes, padded, grad.device), grad.contiguous())
        out = grad.new_empty((padded, *grad.shape[1:]))
        _reduce_scatter_single(out, full, group=ctx.group)
        return out[: sizes[ctx.rank]], None, None


def gather_rows_with_grad(
    x: torch.Tensor, group: ProcessGroup | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Like :func:`all_gather_rows`, but gradients flow back to each owner rank.

    The backward is a sum over ranks (``reduce_scatter``): if every rank's
    objective uses the gathered rows, rank ``r``'s ``x.grad`` is the gradient of
    the *sum* of those objectives with respect to ``x_r``. The sum is taken in ``x``'s
    dtype: for half ``x``, gather ``x.float()`` to round the summed gradient once (what
    :class:`ShardedMarginSoftmaxLoss` does).
    """
    if rank_and_world_size(group)[1] == 1:
        return x, [x.shape[0]]
    sizes = _batch_sizes(x.shape[0], x.device, group)
    return _GatherRows.apply(x, sizes, group), sizes
