"""Input checks shared by every loss and evaluator.

Every check raises a ``TypeError`` (wrong kind of object or dtype) or a
``ValueError`` (wrong shape, range or value) whose message names the argument
and what was expected, so that bad input never reaches a kernel where it would
become a device-side assert or a silent NaN.

Shape and dtype checks read only metadata. The value checks (NaN/Inf
embeddings, labels and miner indices out of range) need the values: a forward
call gathers them in one :class:`ValueChecks` and reads them back to the host
in **one** synchronisation (CPU tensors are read in place through numpy: no
synchronisation at all). :func:`value_checks` turns them off for production
training (shape and dtype checks always stay)::

    import pml_margins

    pml_margins.value_checks(False)  # from now on
    with pml_margins.value_checks(False):  # or only inside the block
        loss = loss_fn(embeddings, labels)
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch

from pml_margins.function_transforms import is_compiling, values_under_transforms
from pml_margins.thread_switch import ThreadSwitch

__all__ = [
    "CHECKED_BY_CALLER",
    "FLOAT_DTYPES",
    "FLOAT_DTYPE_NAMES",
    "ValueChecks",
    "caller_checked",
    "check_angle_margin",
    "check_choice",
    "check_chunk_size",
    "check_circle_margin",
    "check_class_labels",
    "check_class_loss_input",
    "check_count",
    "check_embeddings",
    "check_finite_flags",
    "check_function_inputs",
    "check_in_interval",
    "check_indices_tuple",
    "check_integer_margin",
    "check_labels",
    "check_logit_offset",
    "check_logit_scale",
    "check_multiplier",
    "check_non_negative",
    "check_optional_logit_scale",
    "check_ordered",
    "check_positive",
    "check_real",
    "check_reference",
    "check_sample_rate",
    "check_signed_angle_margin",
    "check_signed_logit_offset",
    "check_tensor",
    "check_unit_interval",
    "finite_flag",
    "function_value_checks",
    "inputs_checked_by_caller",
    "other_reference",
    "value_checks",
    "value_checks_enabled",
]


#: per thread: a loss's forward has checked its inputs (the functions it calls skip theirs)
_CALLER_CHECKED = threading.local()


class inputs_checked_by_caller:
    """Within: the public functions of :mod:`pml_margins.functional` skip their checks
    (a loss enters it around its own calls into them, having checked its inputs in one
    synchronisation and its hyper-parameters when they were set; a user's code that the
    loss runs, a reducer or a regularizer, is outside it). Cheap: a thread-local counter."""

    def __enter__(self) -> None:
        _CALLER_CHECKED.depth = getattr(_CALLER_CHECKED, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _CALLER_CHECKED.depth -= 1


def caller_checked() -> bool:
    """Whether a loss that has checked its inputs (and whose hyper-parameters were checked
    when set) is calling (:data:`CHECKED_BY_CALLER`, around its own calls only)."""
    return bool(getattr(_CALLER_CHECKED, "depth", 0))


def function_value_checks() -> ValueChecks:
    """A :class:`ValueChecks` for a functional entry point: off under
    :func:`caller_checked` and while ``torch.compile`` traces (values cannot be read
    there; shapes, dtypes and numbers are still checked)."""
    checks = ValueChecks()
    if caller_checked() or is_compiling():
        checks.enabled = False
    return checks


#: entered by a loss around its own calls into the public functions (reentrant)
CHECKED_BY_CALLER = inputs_checked_by_caller()


def check_number_or_tensor(value: Any, check: Callable[[Any, str], float], name: str) -> Any:
    """A hyper-parameter of a public function: ``check(value, name)`` for a number; a
    tensor as given (a learnable or per-row margin: reading it would cut its gradient and
    cost a host read), its values checked on CPU (every ``vmap`` lane); nothing under
    :func:`caller_checked` (a loss checks its hyper-parameters when they are set)."""
    if caller_checked():  # a loss's hyper-parameters are checked when set
        return value
    if isinstance(value, torch.Tensor):  # as given (its graph kept), values checked on CPU
        check_not_meta(value, name)
        if value.device.type == "cpu" and value.numel() and not is_compiling():
            extremes = values_under_transforms(value.detach())  # every vmap lane
            check(float(extremes.min()), name)
            check(float(extremes.max()), name)
        return value
    return check(value, name)


def check_function_inputs(
    embeddings: object,
    labels: object,
    num_classes: int,
    width: int | None = None,
    name: str = "embeddings",
    width_name: str = "embedding_size",
    checks: ValueChecks | None = None,
    norms_taken: bool = True,
) -> None:
    """The checks of a functional entry point taking ``(B, D)`` embeddings (or logits)
    and ``(B,)`` class labels in ``[0, num_classes)``: shapes and dtypes always; values
    (NaN/Inf, label range; with ``norms_taken``, squared row norms that overflow: see
    :func:`check_embeddings`) in one synchronisation unless :func:`value_checks` is off
    or a loss that has checked them is the caller (:class:`inputs_checked_by_caller`).
    The values join ``checks`` when given (the caller runs them, with its own)."""
    if caller_checked():
        return  # a loss's forward checked the same tensors (shapes and values)
    if (
        isinstance(embeddings, torch.Tensor)
        and not embeddings.is_nested
        and (embeddings.ndim == 2 and not len(embeddings))
    ):
        check_tensor(embeddings, name)
        if embeddings.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype {FLOAT_DTYPE_NAMES}, got {embeddings.dtype}")
        if width is not None and embeddings.shape[1] != width:
            raise ValueError(f"{name} has width {embeddings.shape[1]} but {width_name} is {width}")
        check_labels(labels, 0)  # an empty batch: nothing to compute, no values to read
        return
    if checks is None and width is not None:
        if usual_cpu_batch_passes(embeddings, labels, num_classes, width):
            return
    own = function_value_checks() if checks is None else checks
    embeddings = check_embeddings(embeddings, name, width, width_name, own, norms_taken=norms_taken)
    check_class_labels(labels, embeddings.shape[0], num_classes, checks=own)
    if checks is None:
        own.run()


def value_checks_enabled() -> bool:
    """Whether the value checks run in this thread (default ``True``; see :func:`value_checks`)."""
    return value_checks.current()


class value_checks(ThreadSwitch):
    """Turn the value checks on or off: from now on, inside a block (``with``), or around
    a function (as a decorator).

    Off, a loss still checks shapes, dtypes and sizes but no longer reads values:
    no host synchronisation, and NaN/Inf embeddings or out-of-range labels then
    reach the kernels unchecked (a wrong number or a device-side assert). The
    setting is per thread, like autograd's
    (:class:`~pml_margins.thread_switch.ThreadSwitch`).

    Args:
        enabled: ``False`` to skip the value checks.
    """

    _state = threading.local()
    default = True


class ValueChecks:
    """Value checks gathered over one call, then read back in one host synchronisation.

    Each check adds a few values computed on the device (a sum, a minimum and a
    maximum: no comparison ops), a predicate that tells from them, on the host,
    whether something is wrong, and a function that builds the error (it may look
    at the values again: it runs only on the error path, and may return ``None``
    when a closer look clears the input). :meth:`run` joins the values of every
    check into one float64 vector (float32 on MPS), reads it once and raises the
    first error. A check on a CPU tensor that numpy can read gives its values through
    numpy instead and is judged at once: there is no device to wait for, and numpy's
    reductions cost a few microseconds against torch's dispatch (15-25 us a step in
    a small problem's loss). Nothing is gathered while :func:`value_checks` is off.
    """

    def __init__(self) -> None:
        self.enabled = value_checks_enabled()
        self._values: list[torch.Tensor] = []
        self._wrong: list[Callable[[list[float]], bool]] = []
        self._errors: list[Callable[[], Exception | None]] = []

    def add(
        self,
        values: Callable[[], torch.Tensor],
        error: Callable[[], Exception | None],
        wrong: Callable[[list[float]], bool] = any,
        on_host: Callable[[], list[float] | None] | None = None,
    ) -> None:
        """Queue ``values()`` (a tensor), the ``wrong`` predicate on them as Python
        floats (default: any is non-zero, for boolean flags) and the error.

        ``on_host``, when given, returns the same values computed on the host (numpy, a
        CPU tensor) or ``None`` where it cannot: they are judged at once, and the
        error raised, instead of being queued.
        """
        if not self.enabled:
            return
        read = None if on_host is None else on_host()
        if read is not None:
            found = error() if wrong(read) else None
            if found is not None:
                raise found
            return
        self._values.append(values().reshape(-1))
        self._wrong.append(wrong)
        self._errors.append(error)

    def run(self) -> None:
        """Read every queued value in one synchronisation; raise the first error found."""
        if not self._values:
            return
        device = self._values[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        # (to the host synchronously: a non-blocking device-to-host copy, read at once,
        # could be read before it lands; to an accelerator the stream orders it)
        blocking = device.type == "cpu"
        joined = torch.cat([v.to(device, dtype, non_blocking=not blocking) for v in self._values])
        read, sizes = joined.tolist(), [v.numel() for v in self._values]
        checks = zip(sizes, self._wrong, self._errors, strict=True)
        self._values, self._wrong, self._errors = [], [], []
        start = 0
        for size, wrong, error in checks:
            found = error() if wrong(read[start : start + size]) else None
            start += size
            if found is not None:
                raise found


#: the floating dtypes the losses and the evaluation take (float8 has no arithmetic)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: :data:`FLOAT_DTYPES` as error messages name them
FLOAT_DTYPE_NAMES = "torch.float16, torch.bfloat16, torch.float32 or torch.float64"


def check_tensor(value: object, name: str) -> torch.Tensor:
    """``value`` if it is a dense tensor with values: what every check here reads.

    Raises:
        TypeError: not a ``torch.Tensor``, or a sparse, nested or quantized one (their
            values and shapes are not read as a dense tensor's).
        ValueError: a tensor on the meta device (shapes only, no values).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got a nested tensor")
    if value.is_quantized:
        raise TypeError(f"{name} must be a dense tensor, got a quantized one; pass x.dequantize()")
    if value.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense tensor, got layout {value.layout}; pass x.to_dense()"
        )
    return check_not_meta(value, name)


def check_not_meta(value: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` unless it is on the meta device (shapes only: a product with a CPU tensor
    gives uninitialized numbers), where ``ValueError`` names it."""
    if value.is_meta:
        raise ValueError(
            f"{name}: a tensor on the meta device, which holds no values to compute with; "
            "materialize it first (to_empty(device=...), then reset_parameters() or load a "
            "state dict)"
        )
    return value


def check_embeddings(
    embeddings: object,
    name: str = "embeddings",
    width: int | None = None,
    width_name: str = "embedding_size",
    checks: ValueChecks | None = None,
    compute_dtype: torch.dtype | None = None,
    norms_taken: bool = True,
    rows_required: bool = True,
) -> torch.Tensor:
    """Check a ``(N, D)`` floating tensor with finite values and return it.

    ``width_name`` names what ``width`` comes from in the error message (for
    example the width of the query set when checking a reference set). The
    finiteness check joins ``checks`` when given (the caller runs them), else it
    runs at once (unless :func:`value_checks` is off). It also refuses finite rows
    whose squared norm overflows ``compute_dtype`` (default: float64 for float64
    input, else float32), where every normalization and norm gives a wrong number
    (unless ``norms_taken=False``: the caller takes no norm of the rows, a raw dot
    product's logits, say): the sum of the squares is the one value read back, and only
    where it overflows are the rows' norms computed. ``rows_required=False`` takes
    ``N = 0`` (the queries of a pair-based loss against a reference set: PML's
    ``CrossBatchMemory`` passes none when the whole batch is enqueued).

    Raises:
        TypeError: not a tensor, or not a floating dtype.
        ValueError: not 2-D, empty (no rows or no columns), wrong width, on the meta
            device, containing NaN/Inf, or a row whose squared norm overflows
            ``compute_dtype``.
    """
    check_tensor(embeddings, name)
    if embeddings.dtype not in FLOAT_DTYPES:
        kind = (
            "dtype " + FLOAT_DTYPE_NAMES if embeddings.is_floating_point() else "a floating dtype"
        )
        raise TypeError(f"{name} must have {kind}, got {embeddings.dtype}")
    if embeddings.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (batch_size, embedding_size), got shape {tuple(embeddings.shape)}"
        )
    if embeddings.shape[0] == 0 and rows_required:
        raise ValueError(f"{name} is empty: the batch has no rows")
    if embeddings.shape[1] == 0:
        raise ValueError(f"{name} has width 0: a row needs at least one coordinate")
    if width is not None and embeddings.shape[1] != width:
        raise ValueError(f"{name} has width {embeddings.shape[1]} but {width_name} is {width}")
    # A finite sum of squares implies finite elements (NaN/Inf propagate) and rows whose
    # squared norms fit; only a non-finite one, which may also be an overflow of the sum
    # alone, needs the element-wise and row-wise checks.
    detached = values_under_transforms(embeddings.detach())
    sum_dtype = torch.promote_types(detached.dtype, torch.float32)
    compute_dtype = compute_dtype or sum_dtype

    def not_finite() -> ValueError | None:
        if not bool(torch.isfinite(detached).all()):
            return ValueError(f"{name} contains NaN or Inf values")
        if not norms_taken:
            return None
        return _norm_overflow(detached.reshape(-1, detached.shape[-1]), name, compute_dtype)

    def on_host() -> list[float] | None:
        array = _host_array(detached)
        if array is None:
            return None
        if array.dtype in _BLAS_DTYPES:  # the squares' sum: finite iff every element is,
            return [float(np.vdot(array, array))]  # up to overflow; a BLAS dot, no ufunc
        with np.errstate(all="ignore"):  # NaN/Inf and overflow are what the check looks for
            host_dtype = np.float64 if sum_dtype == torch.float64 else np.float32
            return [float(array.sum(dtype=host_dtype))]

    def squares() -> torch.Tensor:
        flat = detached.reshape(-1).to(sum_dtype)
        return torch.linalg.vecdot(flat, flat)

    _run_now_or_later(
        checks,
        squares,
        not_finite,
        lambda total: not squares_fit(total[0], sum_dtype, detached.numel()),
        on_host,
    )
    return embeddings


def squares_fit(total: float, dtype: torch.dtype, count: int) -> bool:
    """Whether a computed sum of ``count`` squares, ``total``, shows that every partial
    sum of them, taken in ``dtype`` in any order, is finite: at most ``max / (1 + (count +
    2) u)`` (``u``: ``dtype``'s unit roundoff; each rounding may raise a sum by a factor
    ``1 + u``), so that no row's squared norm overflows however a kernel sums it. A bare
    finiteness test let a row just below ``sqrt(max)`` through when the check's sum stayed
    finite and the loss's own rounded up to ``inf`` (found by review); above the bound the
    rows' exact norms decide (:func:`_norm_overflow`). ``False`` for NaN and +-inf (a half
    batch's check sums the values, not their squares: finite iff every value is)."""
    return math.isfinite(total) and total <= _squares_bound(dtype, count)


def _squares_bound(dtype: torch.dtype, count: int) -> float:
    """``max / (1 + (count + 2) u)`` of ``dtype``: the largest exact sum of ``count``
    squares that no rounding order takes past ``dtype``'s largest value."""
    info = torch.finfo(dtype)
    return info.max / (1 + (count + 2) * info.eps / 2)


def _norm_overflow(x: torch.Tensor, name: str, dtype: torch.dtype) -> ValueError | None:
    """The error for the first row of finite ``x`` whose squared norm may overflow ``dtype``
    (norms from float64 rows scaled by their largest entry: exact at any magnitude).

    May: a sum of ``D`` squares in ``dtype`` exceeds the exact one by up to a factor
    ``1 + (D + 2) u`` (``u`` its unit roundoff; every square and partial sum rounded up, in
    any order), so the limit is ``sqrt(max / (1 + (D + 2) u))``: a row just below
    ``sqrt(max)`` whose float32 sum rounded up to ``inf`` passed, and every normalization
    made it the zero row (found by review)."""
    rows = x.double()
    peak = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    norms = peak.squeeze(1) * torch.linalg.vector_norm(rows / peak, dim=1)
    limit = math.sqrt(_squares_bound(dtype, x.shape[1]))
    over = torch.nonzero(norms >= limit).flatten()
    if not len(over):
        return None
    row = int(over[0])
    return ValueError(
        f"{name} row {row} has norm {float(norms[row]):.4g}: its square overflows {dtype} "
        f"(norms up to {limit:.4g}), so its norm (a normalization's or a distance's) is "
        "wrong; scale the embeddings down"
    )


def check_function_result(result: object, error: Callable[[], Exception]) -> None:
    """Raise ``error()`` where a public function's ``result``, computed from checked,
    finite input, is not finite (an overflow: its intermediate values are not bounded);
    nothing is read under :func:`caller_checked` (the loss checks its own result), while
    ``torch.compile`` traces, or with :func:`value_checks` off."""
    if caller_checked() or is_compiling():
        return
    check_finite_flags((finite_flag(result),), (error,))


def finite_flag(result: object) -> bool | torch.Tensor | None:
    """Whether ``result`` (losses computed from checked, finite input) holds no NaN or Inf,
    without its graph: a ``bool`` for a CPU tensor numpy reads (judged at once), else a
    0-dim boolean tensor on its device (read by :func:`check_finite_flags`, with others in
    one read-back); ``None`` for a non-tensor, an empty one, or value checks off. Read
    through ``torch.func``'s wrappers, as :func:`check_embeddings` reads."""
    if not isinstance(result, torch.Tensor) or not result.numel() or not value_checks_enabled():
        return None
    values = values_under_transforms(result.detach())
    array = _host_array(values)
    if array is None:
        return torch.isfinite(values).all()
    if array.size == 1 and array.dtype.kind == "f":  # a mean: no ufunc (a few us a step)
        return math.isfinite(array.item())
    return bool(np.isfinite(array).all())  # (isfinite raises no FP warning)


def check_finite_flags(
    flags: Sequence[bool | torch.Tensor | None], errors: Sequence[Callable[[], Exception]]
) -> None:
    """Raise ``errors[i]()`` for the first of :func:`finite_flag`'s ``flags`` that is false
    (``None``: nothing to check): the tensors among them read back together, once."""
    pending = [(i, f) for i, f in enumerate(flags) if isinstance(f, torch.Tensor)]
    read = {}
    if pending:
        device = pending[0][1].device
        values = torch.stack([f.to(device) for _, f in pending]).tolist()
        read = {i: v for (i, _), v in zip(pending, values, strict=True)}
    for i, flag in enumerate(flags):
        if flag is not None and not read.get(i, flag):
            raise errors[i]()


#: numpy dtypes whose dot product is a BLAS call (no ufunc machinery, no FP-error warnings)
_BLAS_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: up to this many values, extremes through Python's min/max of a list
_PYTHON_EXTREMES_MAX = 512


def _host_array(values: torch.Tensor) -> np.ndarray | None:
    """``values`` as a numpy array without a copy, if on the CPU and numpy can read it."""
    if values.device.type != "cpu" or values.dtype == torch.bfloat16 or values.numel() == 0:
        return None
    try:
        return values.detach().numpy()
    except (RuntimeError, TypeError):  # a lazy negation/conjugation, an unsupported dtype
        return None


def _run_now_or_later(
    checks: ValueChecks | None,
    values: Callable[[], torch.Tensor],
    error: Callable[[], Exception | None],
    wrong: Callable[[list[float]], bool] = any,
    on_host: Callable[[], list[float] | None] | None = None,
) -> None:
    """Add a check to ``checks``, or run it at once when there are none to join."""
    own = ValueChecks() if checks is None else checks
    own.add(values, error, wrong, on_host)
    if checks is None:
        own.run()


def check_similarities(
    values: object,
    name: str,
    ndim: int | None = None,
    checks: ValueChecks | None = None,
    minus_inf: bool = False,
) -> torch.Tensor:
    """Check a floating tensor of similarities (``ndim`` dimensions, if given) with finite
    values (with ``minus_inf``, logits: ``-inf`` is log 0, NaN and ``+inf`` are refused)
    and return it; the value check joins ``checks`` as in :func:`check_embeddings` (one
    float64 value is read; only where it is wrong are the elements looked at).

    Raises:
        TypeError: not a tensor, or not a floating dtype.
        ValueError: another number of dimensions, or NaN/Inf values.
    """
    check_tensor(values, name)
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype {FLOAT_DTYPE_NAMES}, got {values.dtype}")
    if ndim is not None and values.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(values.shape)}")
    if values.numel():
        detached = values_under_transforms(values.detach())
        if minus_inf:  # the largest value, NaN counted as +inf: +inf iff one is wrong
            _run_now_or_later(
                checks,
                lambda: torch.nan_to_num(detached, nan=math.inf, posinf=math.inf).amax(),
                lambda: ValueError(f"{name} contains NaN or +Inf values"),
                lambda largest: largest[0] == math.inf,
            )
            return values

        def not_finite() -> ValueError | None:
            if bool(torch.isfinite(detached).all()):
                return None  # finite values whose sum overflowed
            return ValueError(f"{name} contains NaN or Inf values")

        _run_now_or_later(
            checks,
            lambda: torch.sum(detached, dtype=torch.float64),
            not_finite,
            lambda total: not math.isfinite(total[0]),
        )
    return values


def check_positive_values(
    values: torch.Tensor, name: str, checks: ValueChecks | None = None, high: float = math.inf
) -> torch.Tensor:
    """Check a real tensor (floating or integer) whose values are all finite and in
    ``(0, high]`` (a tensor of scales, as a number scale is checked); one read: the
    float64 sum, minimum and maximum.

    Raises:
        TypeError: a bool or complex tensor.
        ValueError: NaN/Inf, or a value outside ``(0, high]``.
    """
    if values.dtype == torch.bool or values.is_complex():
        raise TypeError(f"{name} must be real numbers, got a {values.dtype} tensor")
    if values.numel():
        detached = values_under_transforms(values.detach()).double()

        def wrong() -> ValueError | None:
            if not bool(torch.isfinite(detached).all()):
                return ValueError(f"{name} contains NaN or Inf values")
            low, top = float(detached.min()), float(detached.max())
            if low <= 0 or top > high:
                return ValueError(f"{name} must lie in (0, {high:g}], got values in [{low}, {top}]")
            return None

        _run_now_or_later(
            checks,
            lambda: torch.stack([detached.sum(), detached.min(), detached.max()]),
            wrong,
            lambda read: not math.isfinite(read[0]) or read[1] <= 0 or read[2] > high,
        )
    return values


def check_pair_masks(
    masks: dict[str, object], shape: tuple[int, ...], checks: ValueChecks | None = None
) -> None:
    """Check boolean pair masks of ``shape`` (named by the keys of ``masks``); two masks
    must be disjoint (a pair is positive or negative, not both: checked with the values).

    Raises:
        TypeError: not a bool tensor.
        ValueError: another shape, or a pair in both masks.
    """
    for name, mask in masks.items():
        if isinstance(mask, torch.Tensor):
            check_not_meta(mask, name)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"{name} must be a torch.bool tensor, got {got}")
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if len(masks) == 2 and math.prod(shape):
        (first, a), (second, b) = masks.items()
        _run_now_or_later(  # a & b before peeling: the vmap lanes of both masks aligned
            checks,
            lambda: values_under_transforms(a & b).sum(),  # type: ignore[operator]
            lambda: ValueError(f"{first} and {second} share pairs: a pair is one or the other"),
        )


def check_labels(labels: object, length: int, name: str = "labels") -> torch.Tensor:
    """Check a 1-D integer label tensor of the given length and return it.

    Raises:
        TypeError: not a tensor, or not an integer dtype.
        ValueError: not 1-D, or its length differs from ``length``.
    """
    check_tensor(labels, name)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != length:
        raise ValueError(f"{name} has length {labels.shape[0]} but there are {length} embeddings")
    return labels


def check_compared_labels(
    labels: object, length: int, name: str = "labels", checks: ValueChecks | None = None
) -> torch.Tensor:
    """Check 1-D labels that a pair-based loss only compares for equality (PML's
    ``labels.unsqueeze(1) == ref_labels.unsqueeze(0)``): of an integer, bool or floating
    dtype, as PML takes them (``0.5`` and ``0.25`` are two classes), floating ones finite
    (a NaN label matches no label, itself included: no positives, silently). The finite
    check joins ``checks`` when given.

    Raises:
        TypeError: not a tensor, or a complex dtype.
        ValueError: not 1-D, a length other than ``length``, or NaN/Inf labels.
    """
    check_tensor(labels, name)
    if labels.is_complex():
        raise TypeError(f"{name} must hold real numbers, got {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != length:
        raise ValueError(f"{name} has length {labels.shape[0]} but there are {length} embeddings")
    if labels.is_floating_point() and labels.numel() > 0:
        values = values_under_transforms(labels)
        _run_now_or_later(
            checks,
            lambda: torch.isfinite(values).all().reshape(1),
            lambda: ValueError(f"{name} contains NaN or Inf values"),
            lambda flags: not all(flags),
        )
    return labels


def check_class_labels(
    labels: object,
    length: int,
    num_classes: int,
    name: str = "labels",
    checks: ValueChecks | None = None,
    bound_name: str = "num_classes",
    low: int = 0,
) -> torch.Tensor:
    """Check integer class labels (or other indices: ``bound_name`` names the bound in
    the message) in ``[low, num_classes)``.

    The range check joins ``checks`` when given, as in :func:`check_embeddings`.

    Raises:
        TypeError / ValueError: as :func:`check_labels`, and ``ValueError`` when a
            label lies outside ``[0, num_classes)``.
    """
    labels = check_labels(labels, length, name)
    if labels.numel() > 0:
        values = values_under_transforms(labels)

        def out_of_range() -> ValueError:
            lo, hi = _exact_extremes(values)
            return ValueError(
                f"{name} must lie in [{low}, {num_classes}) for {bound_name}={num_classes}, "
                f"got values in [{lo}, {hi}]"
            )

        _run_now_or_later(
            checks,
            lambda: _extremes(values),
            out_of_range,
            _outside(num_classes, low),
            lambda: _host_extremes(values),
        )
    return labels


def _extremes(values: torch.Tensor) -> torch.Tensor:
    """``[min, max]`` of ``values`` (no sync)."""
    return torch.stack(_aminmax(values))


#: unsigned dtypes that torch's ``aminmax`` lacks (CPU): compared as float64 (exact below
#: 2^53, and on the right side of any class count above it)
_WIDE_UNSIGNED = tuple(
    dtype for name in ("uint16", "uint32", "uint64") if (dtype := getattr(torch, name, None))
)


def _aminmax(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.aminmax`` of integer ``values`` of any dtype."""
    return torch.aminmax(values.double() if values.dtype in _WIDE_UNSIGNED else values)


def _exact_extremes(values: torch.Tensor) -> tuple[int, int]:
    """Smallest and largest of non-empty integer ``values`` as Python ints, exactly (for
    messages: :func:`_host_extremes` of a CPU copy, uint64 above 2^53 included)."""
    low, high = _host_extremes(values.detach().cpu())
    return int(low), int(high)


def _host_extremes(values: torch.Tensor) -> list[float] | None:
    """:func:`_extremes` on the host, for a CPU tensor (else ``None``): a batch's labels
    through Python's ``min``/``max`` (a numpy reduction's set-up costs more than a few
    hundred integers), longer arrays through numpy."""
    array = _host_array(values)
    if array is None:
        return None
    if array.size <= _PYTHON_EXTREMES_MAX:
        items = array.ravel().tolist()
        return [min(items), max(items)]
    return [array.min(), array.max()]


def _outside(bound: int, low: int = 0) -> Callable[[list[float]], bool]:
    """The predicate on :func:`_extremes`: some value lies outside ``[low, bound)``."""
    return lambda extremes: extremes[0] < low or extremes[1] >= bound


def check_indices_tuple(
    indices_tuple: object,
    batch_size: int,
    ref_size: int | None = None,
    checks: ValueChecks | None = None,
) -> tuple[torch.Tensor, ...] | None:
    """Check a PML miner output: ``(a, p, n)`` triplets or ``(a1, p, a2, n)`` pairs.

    Anchors index the batch (``batch_size``); positives and negatives index the
    reference set (``ref_size``, the batch itself when ``None``). The range checks
    join ``checks`` when given, as in :func:`check_embeddings`.

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
        check_tensor(idx, f"indices_tuple[{role}]")
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(f"indices_tuple[{role}] must be integer, got {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"indices_tuple[{role}] must be 1-D, got shape {tuple(idx.shape)}")
    groups = [indices_tuple] if len(indices_tuple) == 3 else [indices_tuple[:2], indices_tuple[2:]]
    for group in groups:
        if len({int(t.numel()) for t in group}) != 1:
            raise ValueError(
                "indices_tuple tensors that form one tuple must have equal lengths, got "
                f"{[int(t.numel()) for t in group]}"
            )
    own = ValueChecks() if checks is None else checks
    for role, idx in zip(roles, indices_tuple, strict=True):
        if idx.numel() > 0:
            bound = batch_size if role.startswith("a") else ref_size
            idx = values_under_transforms(idx)
            own.add(
                lambda idx=idx: _extremes(idx),
                lambda role=role, idx=idx, bound=bound: _index_error(role, idx, bound),
                _outside(bound),
                lambda idx=idx: _host_extremes(idx),
            )
    if checks is None:
        own.run()
    return tuple(indices_tuple)


def _index_error(role: str, idx: torch.Tensor, bound: int) -> ValueError:
    lo, hi = _exact_extremes(idx)
    return ValueError(
        f"indices_tuple[{role}] has indices in [{lo}, {hi}] but must lie in [0, {bound})"
    )


def check_reference(
    ref_emb: object,
    ref_labels: object,
    width: int,
    labels_required: bool,
    checks: ValueChecks | None = None,
    label_rows: int | None = None,
    rows_required: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check the reference set of a pair-based loss (``ref_emb``, ``ref_labels``).

    ``ref_emb`` must be ``(R, width)`` like :func:`check_embeddings` (``R = 0`` taken
    where not ``rows_required``: no pairs); ``ref_labels``,
    when given, 1-D labels of length ``R`` (:func:`check_compared_labels`). ``ref_labels`` without
    ``ref_emb`` is an error, and so is ``ref_emb`` without ``ref_labels`` when the
    pairs have to be formed from labels (``labels_required``), unless ``ref_emb`` has
    ``label_rows`` rows (the number of labels given): PML then pairs its rows with the
    labels, row ``j`` taking label ``j`` (a second view of the batch).

    Raises:
        TypeError / ValueError: as :func:`check_embeddings` and
            :func:`check_compared_labels`, and ``ValueError`` for the missing halves
            described above.
    """
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels was given without ref_emb")
        return None, None
    ref_emb = check_embeddings(ref_emb, name="ref_emb", checks=checks, rows_required=rows_required)
    if ref_emb.shape[1] != width:
        raise ValueError(
            f"ref_emb has width {ref_emb.shape[1]} but the embeddings have width {width}"
        )
    if ref_labels is None:
        if labels_required and ref_emb.shape[0] != label_rows:
            rows = f" and has {ref_emb.shape[0]} rows, not {label_rows}" if label_rows else ""
            raise ValueError(
                f"ref_emb was given without ref_labels{rows}: pass ref_labels, a ref_emb "
                "whose rows take the labels' (a second view of the batch), or an "
                "indices_tuple whose positives/negatives index ref_emb"
            )
        return ref_emb, None
    check_tensor(ref_labels, "ref_labels")
    if ref_labels.ndim == 1 and ref_labels.shape[0] != ref_emb.shape[0]:
        raise ValueError(
            f"ref_labels has length {ref_labels.shape[0]} but ref_emb has {ref_emb.shape[0]} rows"
        )
    return ref_emb, check_compared_labels(ref_labels, ref_emb.shape[0], "ref_labels", checks)


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
    value = check_real(value, name)
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


def check_size(value: object, name: str) -> int:
    """A size, ``>= 0``: a Python or numpy integer or a one-element integer tensor (what
    ``operator.index`` takes), not a bool.

    Raises:
        TypeError: anything else.
        ValueError: a negative number.
    """
    size = _integer(value, name)
    if size < 0:
        raise ValueError(f"{name} must be >= 0, got {size}")
    return size


def _integer(value: object, name: str) -> int:
    """``value`` as a Python ``int``: what ``operator.index`` takes, not a bool."""
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, torch.Tensor) and value.dtype == torch.bool
    ):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def check_generator(value: object) -> torch.Generator | None:
    """``None`` or a ``torch.Generator``, else ``TypeError``."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(value).__name__}")
    return value


def check_non_negative_int(value: object, name: str) -> int:
    """An integer ``>= 0`` (a number of steps) as a Python ``int``: numpy integers and
    one-element integer tensors too, not a bool (``TypeError``); below 0: ``ValueError``."""
    number = _integer(value, name)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {number}")
    return number


def check_count(value: object, name: str) -> int:
    """A count, ``>= 1``, as a Python ``int``: what :func:`check_size` takes (numpy integers
    and one-element integer tensors too, as PML does), not a bool.

    Raises:
        TypeError: anything else.
        ValueError: a number below 1.
    """
    count = _integer(value, name)
    if count < 1:
        raise ValueError(f"{name} must be >= 1, got {count}")
    return count


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
    compute_dtype: torch.dtype | None = None,
    norms_taken: bool = True,
) -> None:
    """The forward checks of a loss that compares embeddings with per-class vectors.

    Rejects ``ref_emb``/``ref_labels`` unless they are the batch's own ``embeddings``
    and ``labels`` objects (PML's ``ref_not_supported`` rule; naming what the loss
    compares with, then ``hint``), checks the embeddings' width (and, if
    ``norms_taken``, their norms against ``compute_dtype``), requires labels in
    ``[0, num_classes)`` and checks a miner's ``indices_tuple`` against the batch. The
    value checks are read back in one host synchronisation (none while
    :func:`value_checks` is off).
    """
    if other_reference(embeddings, labels, ref_emb, ref_labels):
        raise ValueError(
            f"{loss_name} compares embeddings with {compared_with}; ref_emb/ref_labels "
            f"are not supported{hint}"
        )
    if indices_tuple is None and usual_cpu_batch_passes(
        embeddings, labels, num_classes, embedding_size
    ):
        return
    checks = ValueChecks()
    embeddings = check_embeddings(
        embeddings,
        width=embedding_size,
        checks=checks,
        compute_dtype=compute_dtype,
        norms_taken=norms_taken,
    )
    if labels is None:
        raise ValueError(f"{loss_name} requires labels")
    check_class_labels(labels, embeddings.shape[0], num_classes, checks=checks)
    check_indices_tuple(indices_tuple, embeddings.shape[0], checks=checks)
    checks.run()


#: the embedding dtypes :func:`usual_cpu_batch_passes` takes (numpy's BLAS dot reads them)
_USUAL_FLOATS = (torch.float32, torch.float64)


def usual_cpu_batch_passes(
    embeddings: object, labels: object, num_classes: int, width: int
) -> bool:
    """Whether the usual CPU batch passes every check of :func:`check_embeddings` and
    :func:`check_class_labels` that is on, decided in a few host steps.

    Only accepts: ``True`` for a float32/float64 ``(B, width)`` strided CPU tensor,
    ``B >= 1``, and int64 strided CPU labels of length ``B`` (at most
    :data:`_PYTHON_EXTREMES_MAX`) -- the shapes and dtypes, always checked -- whose values
    pass too while the value checks are on: a finite sum of squares of the embeddings
    (numpy's ``vdot``, in their dtype: so are their elements and, as their dtype is at
    most the compute dtype, their rows' squared norms) and labels in
    ``[0, num_classes)`` (Python's ``min``/``max`` of their list); ``False`` for anything
    else (a device's tensors, a ``torch.func`` wrapper, which :func:`_host_array` cannot
    read), which the full checks then judge and name. Both read through numpy, no tensor
    read-back, without the full checks' layers: a small problem's step is a few hundred
    microseconds, and those layers (the same reads) cost it ~5 us more (CosFace
    64 x 128 x 100, CPU).
    """
    if not (
        type(embeddings) is torch.Tensor
        and type(labels) is torch.Tensor
        and embeddings.dtype in _USUAL_FLOATS
        and labels.dtype == torch.int64
        and embeddings.is_cpu
        and labels.is_cpu
        and embeddings.layout == torch.strided
        and labels.layout == torch.strided
        and not embeddings.is_nested
        and not labels.is_nested
        and embeddings.ndim == 2
        and labels.ndim == 1
        and 0 < embeddings.shape[0] == labels.shape[0] <= _PYTHON_EXTREMES_MAX
        and embeddings.shape[1] == width
        and type(num_classes) is int  # (else the full checks name it)
        and not is_compiling()
    ):
        return False
    if not value_checks_enabled():
        return True
    array, label_array = _host_array(embeddings), _host_array(labels)
    if array is None or label_array is None:  # a torch.func wrapper: the full checks
        return False  # look under it
    items = label_array.tolist()
    total = float(np.vdot(array, array))
    return squares_fit(total, embeddings.dtype, array.size) and (
        0 <= min(items) <= max(items) < num_classes
    )


def other_reference(
    embeddings: object, labels: object, ref_emb: object, ref_labels: object
) -> bool:
    """Whether ``ref_emb``/``ref_labels`` name a reference set other than the batch: given,
    and not the batch's own ``embeddings`` and ``labels`` objects (which PML accepts
    where a loss supports no reference set)."""
    given = ref_emb is not None or ref_labels is not None
    return given and not (ref_emb is embeddings and ref_labels is labels)


def check_bool(value: object, name: str) -> bool:
    """``value`` as a ``bool``: Python's or numpy's booleans only (a string such as
    ``"False"`` or a number would otherwise switch the option by its truthiness).

    Raises:
        TypeError: anything else.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_flag(value: object, name: str) -> bool:
    """A truth value given as PML's callers pass one: a bool, a numpy bool, a number equal
    to 0 or 1 (Python's or numpy's), or a one-element tensor holding 0 or 1.

    Raises:
        TypeError: anything else (a string such as ``"False"`` was read as true, 2 as
            "subtract 2").
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1)
    ):
        return bool(value)
    return check_bool(value, name)  # (its message)


def check_positive(value: object, name: str) -> float:
    """Return ``value`` as a float after checking it is a finite real number > 0."""
    value = check_real(value, name)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_non_negative(value: object, name: str) -> float:
    """Return ``value`` as a float after checking it is a finite real number >= 0."""
    value = check_real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


#: largest scale, and largest additive margin or weight, of a loss: logits such as
#: ``s (cos - m)`` then stay far inside float32 (1e15 * 1e15 = 1e30 < 3.4e38), where a
#: larger value made them ``inf`` and the loss NaN
MAX_LOGIT_TERM = 1e15


def check_logit_scale(value: object, name: str) -> float:
    """A scale of the logits: a real number in ``(0, MAX_LOGIT_TERM]``."""
    return _at_most_logit_term(check_positive(value, name), name)


def check_optional_logit_scale(value: object, name: str) -> float | None:
    """``None``, or :func:`check_logit_scale`."""
    return None if value is None else check_logit_scale(value, name)


def check_logit_offset(value: object, name: str) -> float:
    """An additive margin or a weight of a loss term: a real number in
    ``[0, MAX_LOGIT_TERM]``."""
    return _at_most_logit_term(check_non_negative(value, name), name)


def check_signed_logit_offset(value: object, name: str) -> float:
    """An additive margin that may be negative (CosFace's ``m``; a negative margin
    loosens the target, as in Liu et al., ECCV 2020, and PML accepts it): a real number
    with ``|value| <= MAX_LOGIT_TERM``."""
    value = check_real(value, name)
    _at_most_logit_term(abs(value), name)
    return value


def _at_most_logit_term(value: float, name: str) -> float:
    if value > MAX_LOGIT_TERM:
        raise ValueError(
            f"{name} must be at most {MAX_LOGIT_TERM:g} (beyond, float32 logits overflow), "
            f"got {value}"
        )
    return value


def check_unit_interval(value: object, name: str) -> float:
    """A real number in ``(0, 1]`` (a rate or a fraction)."""
    return check_in_interval(value, name, 0.0, 1.0, low_inclusive=False)


def check_angle_margin(value: object, name: str, pi_allowed: bool = False) -> float:
    """An angular margin in radians, in ``[0, pi)`` (``[0, pi]`` if ``pi_allowed``); a
    value above pi is taken for degrees."""
    value = check_non_negative(value, name)
    if value > math.pi or (value == math.pi and not pi_allowed):
        raise ValueError(
            f"{name} is in radians and must lie in [0, pi{']' if pi_allowed else ')'}, "
            f"got {value}; "
            f"if you meant {value} degrees (PML's unit), pass math.radians({value})"
        )
    return value


def check_signed_angle_margin(value: object, name: str) -> float:
    """An additive angular margin that may be negative (ArcFace's ``m``, as PML accepts
    it), in radians, in ``(-pi, pi)``; a value beyond is taken for degrees."""
    value = check_real(value, name)
    if abs(value) >= math.pi:
        raise ValueError(
            f"{name} is in radians and must lie in (-pi, pi), got {value}; "
            f"if you meant {value} degrees (PML's unit), pass math.radians({value})"
        )
    return value


#: largest multiplicative angular margin: cos(m theta) of an integer m is a degree-m
#: Chebyshev recurrence (m steps a forward); the papers use 1-4
MAX_ANGLE_MULTIPLIER = 100


def check_integer_margin(value: object, name: str) -> int:
    """A multiplicative margin: an integer in ``[1, MAX_ANGLE_MULTIPLIER]`` (integer-valued
    floats are accepted)."""
    value = check_multiplier(value, name)
    if not value.is_integer():
        raise ValueError(f"{name} must be an integer (the angle multiplier m), got {value}")
    return int(value)


def check_multiplier(value: object, name: str) -> float:
    """A multiplicative angular margin: a real number in ``[1, MAX_ANGLE_MULTIPLIER]``."""
    value = check_positive(value, name)
    if not 1 <= value <= MAX_ANGLE_MULTIPLIER:
        raise ValueError(
            f"{name} must lie in [1, {MAX_ANGLE_MULTIPLIER}] (a multiplicative angular "
            f"margin; cos(m theta) of an integer m takes m steps), got {value}"
        )
    return value


def check_angle_multiple(value: object, name: str = "multiplier") -> None:
    """The ``m`` of ``cos(m theta)``: a finite real number with ``|m| <=``
    :data:`MAX_ANGLE_MULTIPLIER` (``ValueError`` otherwise); a real tensor's values are
    read (every ``vmap`` lane) and judged the same, a complex or bool one is left to its
    use, as is any tensor under ``torch.compile``."""
    if isinstance(value, torch.Tensor):  # its values (every vmap lane), as cos(m theta) reads
        if is_compiling() or value.is_complex() or value.dtype == torch.bool:
            return  # (read, or refused, where it is used)
        for number in values_under_transforms(value.detach()).reshape(-1).tolist():
            check_angle_multiple(number, name)
        return
    real = isinstance(value, Real) and not isinstance(value, (bool, np.bool_))
    try:
        bounded = real and math.isfinite(value) and abs(value) <= MAX_ANGLE_MULTIPLIER
    except OverflowError:  # an int or Fraction beyond float's range
        bounded = False
    if not bounded:
        raise ValueError(
            f"{name} must be a finite number with |m| <= {MAX_ANGLE_MULTIPLIER} (cos(m theta) "
            f"of an integer m takes m steps), got {_shown(value)}"
        )


def _shown(value: object) -> str:
    """``repr(value)``, or a short phrase for a number too long to print whole."""
    text = repr(value)
    return text if len(text) <= 40 else f"a number of {len(text)} characters"


#: largest ``|m|`` of Circle loss: its pair logits ``gamma (v + m)(v - m)`` then stay
#: inside float32 at the largest ``gamma`` (1e15 * 1e6); the loss is ~0 long before
MAX_CIRCLE_MARGIN = 1000.0


def check_circle_margin(value: object, name: str) -> float:
    """Circle loss's relaxation margin ``m``: a real number, negative or above 0.5 as PML
    takes it (the paper recommends 0.25-0.4; beyond 0.5 the margins cross, ``1 - m < m``),
    with ``|m| <= MAX_CIRCLE_MARGIN``."""
    return check_in_interval(value, name, -MAX_CIRCLE_MARGIN, MAX_CIRCLE_MARGIN)


def check_ordered(low: float, high: float, low_name: str, high_name: str) -> None:
    """Raise ``ValueError`` unless ``low < high`` (two already-checked bounds of a range)."""
    if not low < high:
        raise ValueError(f"{low_name} must be < {high_name}, got {low} and {high}")


def check_chunk_size(chunk_size: object, name: str = "chunk_size") -> Any:
    """``None``, ``"auto"`` or an integer ``>= 1`` (classes per block of the fused core;
    what :func:`check_count` takes, returned as a Python ``int``)."""
    if chunk_size is None or (isinstance(chunk_size, str) and chunk_size == "auto"):
        return chunk_size
    try:
        return check_count(chunk_size, name)
    except TypeError:
        raise TypeError(f"{name} must be None, 'auto' or an int >= 1, got {chunk_size!r}") from None


def check_sample_rate(sample_rate: object, name: str = "sample_rate") -> float:
    """A Partial FC sampling rate: a real number in ``(0, 1]``."""
    return check_unit_interval(sample_rate, name)


def check_real(value: object, name: str) -> float:
    """``value`` as a float after checking it is a finite real number: a Python or numpy
    number or a one-element real tensor, not a bool (which ``float`` would take as 1.0)
    nor a string (which it would parse), nor a tensor that requires grad (the float
    would silently cut its gradient: PML users pass a learnable ``scale`` tensor).
    """
    if type(value) is float and math.isfinite(value):  # the common case, without ABC checks
        return value
    if isinstance(value, bool) or not isinstance(value, (Real, torch.Tensor)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        if value.numel() != 1:
            raise TypeError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.requires_grad:
            raise TypeError(
                f"{name} is kept as a number, so a tensor that requires grad would lose its "
                f"gradient (got {type(value).__name__} {value.item():g}); pass a number, or "
                "learn it by overriding the loss method that uses it (a learned scale: "
                "logit_scale(), see README)"
            )
        value = value.item()
    try:
        number = float(value)
    except OverflowError:  # an int (or Fraction) beyond float's range
        raise ValueError(f"{name} must be finite, got a number beyond float's range") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {number}")
    return number
