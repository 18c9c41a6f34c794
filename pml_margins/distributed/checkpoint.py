"""Sharded checkpoints: save per shard, merge, re-shard to another world size, go single-process.

A checkpoint is a plain dict (``torch.save``-able, loadable with
``weights_only=True``) describing one shard; a single-process checkpoint is
simply the one shard of ``world_size == 1``::

    {"format": "pml_margins.sharded/1", "loss_type": "pml_margins.losses.arcface.ArcFaceLoss",
     "loss_kwargs": {"margin": 0.5, ...}, "num_classes": C, "embedding_size": D,
     "rank": r, "world_size": n, "class_range": (start, end),
     "state_dict": {"W": (D, end - start) tensor, "bias": (end - start,) tensor (softmax)},
     "sampler_state": the Partial FC sampler's RNG state, or None}

The sampler state is restored by :func:`load_into` for the same world size, so a
resumed run draws the same classes; merging or re-sharding drops it (the
sampling of another world size is different anyway).

``loss_kwargs`` holds the loss's hyper-parameters as they are when saved, its Partial FC
``sample_rate`` (what :func:`to_single_process_loss` builds with; :func:`load_into` keeps
the loss's own) and, for AdaCos, the scale it started from. Only plain ``loss_kwargs``
(numbers, strings, booleans, ``None``; numpy scalars as the Python numbers they hold) are
saved; pass objects such as a ``reducer`` again when
rebuilding a loss. :func:`load_into` sets the loss's hyper-parameters to the shard's (a
scheduler's ``load_state_dict``, before or after it, sets the same values).

The optimizer's state (SGD momentum, Adam's moments of ``W``) is not in a shard: save
``optimizer.state_dict()`` on every rank beside it to resume at the same world size;
after :func:`reshard` the moments of ``W`` start again from zero.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import os
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pml_margins.distributed.loadable_state import check_loadable
from pml_margins.distributed.sharded_loss import ShardedMarginSoftmaxLoss
from pml_margins.distributed.sharding import shard_ranges
from pml_margins.losses.adacos import AdaCosLoss
from pml_margins.losses.class_weight_loss import ClassWeightLoss
from pml_margins.losses.softmax import SoftmaxLoss
from pml_margins.torch_files import error_name, not_written_by_torch_save

__all__ = [
    "FORMAT",
    "from_single_process_loss",
    "load_into",
    "load_shard",
    "merge_shards",
    "reshard",
    "save_shard",
    "shard_checkpoint",
    "split_checkpoint",
    "to_single_process_loss",
]

FORMAT = "pml_margins.sharded/1"
#: the dimension along which each known state-dict entry is split by class
_CLASS_DIM = {"W": 1, "bias": 0}

Checkpoint = dict[str, Any]


#: what every checkpoint holds (``sampler_state`` may be absent: older files)
_FIELDS = (
    "format",
    "loss_type",
    "loss_kwargs",
    "num_classes",
    "embedding_size",
    "rank",
    "world_size",
    "class_range",
    "state_dict",
)


def _check_checkpoint(ckpt: object, what: str = "checkpoint") -> None:
    """``ValueError`` unless ``ckpt`` is a dict of this format with every field (an
    in-memory checkpoint of another format, or one missing a field, was misread or failed
    with a bare ``KeyError``)."""
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"the {what} must be a dict, got {type(ckpt).__name__}")
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"the {what} has format {ckpt.get('format')!r}, not {FORMAT!r}")
    missing = [field for field in _FIELDS if field not in ckpt]
    if missing:
        raise ValueError(f"the {what} lacks {', '.join(missing)}")
    wrong = [(name, needs) for name, (fits, needs) in _FIELD_TYPES.items() if not fits(ckpt[name])]
    if wrong:  # (a tampered or hand-made one failed inside torch or Python)
        shown = "; ".join(f"{name} must be {needs}" for name, needs in wrong)
        raise ValueError(f"the {what} has fields of the wrong type or range: {shown}")


def _count(value: object, low: int = 1) -> bool:
    """A Python or numpy integer (not a bool) of at least ``low``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


#: what each field must hold: a test, and the words the message says it in
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "loss_type": (lambda v: isinstance(v, str), "a class's dotted name"),
    "loss_kwargs": (
        lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
        "a dict of arguments by name",
    ),
    "num_classes": (_count, "an int >= 1"),
    "embedding_size": (_count, "an int >= 1"),
    "rank": (lambda v: _count(v, 0), "an int >= 0"),
    "world_size": (_count, "an int >= 1"),
    "class_range": (
        lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_count(c, 0) for c in v),
        "a pair of ints >= 0",
    ),
    "state_dict": (
        lambda v: (
            isinstance(v, Mapping)
            and all(isinstance(k, str) and _saved_tensor(t) for k, t in v.items())
        ),
        "a dict of dense, real tensors with values (not sparse, meta or complex)",
    ),
}


def _saved_tensor(value: object) -> bool:
    """A tensor a saved state holds: dense, with values, real (a sparse, meta or complex
    one failed part-way in a split, or built a loss whose forward then failed)."""
    return (
        isinstance(value, torch.Tensor)
        and value.layout == torch.strided
        and not value.is_meta
        and not value.is_complex()
    )


def _type_name(loss_type: type) -> str:
    return f"{loss_type.__module__}.{loss_type.__qualname__}"


def _load_type(name: str) -> type[ClassWeightLoss]:
    """The class-weight loss class a checkpoint names, as the name is bound now in a module
    already imported (pml_margins' losses are), read through modules and classes only,
    statically (``inspect.getattr_static``: a lazy module's ``getattr`` would import or
    run code the file names); where no module binds it (a local class), the one live
    class of that name.
    Nothing is imported or run: a file read with ``weights_only`` must not run code
    (``pml_margins.__main__`` parsed the command line and exited)."""
    parts = name.split(".")
    if not all(parts):
        raise ValueError(f"checkpoint loss_type {name!r} is not a class's dotted name")
    for cut in range(len(parts) - 1, 0, -1):  # (a qualified name may hold dots too)
        found: Any = sys.modules.get(".".join(parts[:cut]))  # (__main__, __mp_main__ too)
        if not issubclass(type(found), types.ModuleType):
            continue
        for attribute in parts[cut:]:  # modules and classes only, their own dicts
            # (type(), not isinstance: that reads __class__, code of the named object)
            readable = issubclass(type(found), (types.ModuleType, type))
            if not readable or attribute.startswith("__"):  # (__init__: the package again)
                found = _UNBOUND
                break
            found = inspect.getattr_static(found, attribute, _UNBOUND)
        if found is _UNBOUND:
            continue  # (not bound there: a local class, or another cut)
        if issubclass(type(found), type) and issubclass(found, ClassWeightLoss):
            return found
        raise ValueError(  # bound now to something else (a stale class is not taken)
            f"checkpoint loss_type {name!r} is bound to {type(found).__name__!r}, not a "
            "ClassWeightLoss subclass"
        )
    named = set(cls for cls in _subclasses(ClassWeightLoss) if _type_name(cls) == name)
    if len(named) > 1:
        raise ValueError(
            f"checkpoint loss_type {name!r} names {len(named)} classes (defined again, in a "
            "notebook or a factory): build the loss and use load_into, or rename one"
        )
    if not named:
        raise ValueError(
            f"checkpoint loss_type {name!r} is not a ClassWeightLoss subclass of pml_margins "
            "or of an imported module (import the module that defines it first)"
        )
    return named.pop()


#: a name a module or class does not bind (``None`` may be bound)
_UNBOUND = object()


def _subclasses(cls: type) -> list[type]:
    """Every subclass of ``cls`` defined so far (and not yet collected), at any depth."""
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def _plain(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments a ``weights_only`` load can read back: ``None``, strings and numbers,
    numpy's as the Python bool/int/float they hold (an ``np.float64`` pickled as numpy
    made the file unreadable; an ``np.bool_`` was dropped)."""
    plain = {}
    for key, value in kwargs.items():
        if isinstance(value, np.generic):  # a numpy scalar: the Python value it holds
            value = value.item()
        if value is None or isinstance(value, (bool, str)):
            plain[key] = value
        elif isinstance(value, numbers.Integral):
            plain[key] = int(value)
        elif isinstance(value, numbers.Real):
            plain[key] = float(value)
    return plain


def _current_hyperparameters(loss: ClassWeightLoss) -> dict[str, Any]:
    """The current values of every hyper-parameter of ``loss`` (its
    ``hyperparameter_names``, each a constructor argument): given to the constructor
    or left at its default, a scheduler may have moved it since."""
    names = [n for n in getattr(loss, "hyperparameter_names", ()) if hasattr(loss, n)]
    values = {n: getattr(loss, n) for n in names}  # None too: a scale set back to None
    return {n: v for n, v in values.items() if v is None or isinstance(v, (bool, int, float, str))}


def _rate(loss: ClassWeightLoss | ShardedMarginSoftmaxLoss) -> dict[str, float]:
    """``{"sample_rate": r}`` where the loss samples its classes (Partial FC: a
    single-process loss's rate, or the sharded loss's own), else ``{}`` (every class: the
    default, which a subclass that takes no ``sample_rate`` is built with too)."""
    rate = float(loss.sample_rate)
    return {} if rate == 1.0 else {"sample_rate": rate}


def shard_checkpoint(loss: ShardedMarginSoftmaxLoss) -> Checkpoint:
    """This rank's shard of ``loss`` as a checkpoint dict (tensors detached, on CPU)."""
    return {
        "format": FORMAT,
        "loss_type": _type_name(loss.loss_type),
        # the hyper-parameters as they are now (a scheduler may have moved a margin), and
        # the Partial FC rate (a single-process loss built from it samples at that rate)
        "loss_kwargs": _plain(
            {**loss.loss_kwargs, **_current_hyperparameters(loss.loss), **_rate(loss)}
        ),
        "num_classes": loss.num_classes,
        "embedding_size": loss.embedding_size,
        "rank": loss.rank,
        "world_size": loss.world_size,
        "class_range": (loss.class_start, loss.class_end),
        "state_dict": {k: v.detach().cpu().clone() for k, v in loss.loss.state_dict().items()},
        "sampler_state": loss.sampler_state(),
    }


def save_shard(loss: ShardedMarginSoftmaxLoss, path: str | os.PathLike[str]) -> None:
    """Write this rank's shard (call on every rank, each with its own ``path``)."""
    torch.save(shard_checkpoint(loss), path)


def load_shard(path: str | os.PathLike[str]) -> Checkpoint:
    """Read one shard written by :func:`save_shard` (``weights_only=True``); ``ValueError``
    naming the file for one that cannot be read (empty, truncated, not a checkpoint)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle raises about anything (struct.error, ...)
        if isinstance(err, FileNotFoundError | IsADirectoryError | PermissionError):
            raise
        reason = str(err).splitlines()[0] if str(err).strip() else "empty or truncated"
        reason = not_written_by_torch_save(path) or f"{error_name(err)}: {reason}"
        raise ValueError(
            f"{os.fspath(path)!r} cannot be read as a {FORMAT} checkpoint ({reason})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a {FORMAT} checkpoint")
    _check_checkpoint(ckpt, f"checkpoint {os.fspath(path)!r}")
    ckpt["class_range"] = tuple(ckpt["class_range"])
    return ckpt


def merge_shards(shards: Iterable[Checkpoint]) -> Checkpoint:
    """Concatenate the shards of one run (any order, any iterable: a list, a generator of
    :func:`load_shard` calls) into a ``world_size == 1`` checkpoint.

    Shards that cannot be one run's are refused: other hyper-parameters, sizes, class
    ranges, dtypes, or buffers every rank holds whole (CurricularFace's ``t``, AdaCos's
    scale; NaN equals NaN there). A checkpoint records no run id: shards of two runs of
    a loss without such buffers and with the same settings cannot be told apart.

    Raises:
        TypeError: ``shards`` not an iterable of checkpoints (one checkpoint, a path).
        ValueError: shards that cannot be one run's, missing or duplicated ranks, a
            checkpoint of another format or missing a field.
    """
    if isinstance(shards, (Mapping, str, bytes, os.PathLike)) or not isinstance(shards, Iterable):
        raise TypeError(
            "shards must be an iterable of one run's shard checkpoints (shard_checkpoint, "
            f"load_shard), got {type(shards).__name__}"
        )
    shards = list(shards)
    if not shards:
        raise ValueError("no shards given")
    for index, shard in enumerate(shards):
        _check_checkpoint(shard, f"shard at index {index}")
    first = shards[0]
    world_size = first["world_size"]
    by_rank = {s["rank"]: s for s in shards}
    if sorted(by_rank) != list(range(world_size)) or len(shards) != world_size:
        raise ValueError(
            f"need exactly one shard per rank 0..{world_size - 1}, got ranks "
            f"{sorted(s['rank'] for s in shards)}"
        )
    for key in ("loss_type", "num_classes", "embedding_size", "world_size", "loss_kwargs"):
        if any(s[key] != first[key] for s in shards):
            shown = {s["rank"]: s[key] for s in shards}
            raise ValueError(f"shards disagree on {key} (by rank: {shown}): not one run")
    ordered = [by_rank[r] for r in range(world_size)]
    expected = shard_ranges(first["num_classes"], world_size)
    if [tuple(s["class_range"]) for s in ordered] != expected:
        raise ValueError("shard class ranges do not match the contiguous split")
    _check_one_run(ordered)
    state = {}
    for key, value in first["state_dict"].items():
        dim = _CLASS_DIM.get(key)
        parts = [s["state_dict"][key] for s in ordered]
        state[key] = value.clone() if dim is None else torch.cat(parts, dim=dim)
    return {
        **first,
        "loss_kwargs": copy.deepcopy(first["loss_kwargs"]),  # (its own: no shard's)
        "rank": 0,
        "world_size": 1,
        "class_range": (0, first["num_classes"]),
        "state_dict": state,
        "sampler_state": None,
    }


def _check_one_run(ordered: Sequence[Checkpoint]) -> None:
    """``ValueError`` unless the shards' states fit together: the same keys, dtypes and
    entries per class (``W``'s columns: ``K`` per class for sub-centres), and equal
    entries that are not split by class (buffers such as CurricularFace's ``t``)."""
    first = ordered[0]["state_dict"]
    for shard in ordered:
        state, rank = shard["state_dict"], shard["rank"]
        if set(state) != set(first):
            raise ValueError(f"shard {rank} holds {sorted(state)}, shard 0 {sorted(first)}")
        start, end = shard["class_range"]
        width = state["W"].shape[0] if "W" in state and state["W"].ndim == 2 else None
        if width != shard["embedding_size"]:
            raise ValueError(
                f"shard {rank}'s W has {width} rows, its embedding_size is "
                f"{shard['embedding_size']}: not a shard of that loss"
            )
        for key, value in state.items():
            if value.dtype != first[key].dtype:
                raise ValueError(
                    f"shards disagree on the dtype of {key}: {first[key].dtype} (shard 0), "
                    f"{value.dtype} (shard {rank}): not one run"
                )
            dim = _CLASS_DIM.get(key)
            if dim is None:
                if not _same_values(value, first[key]):
                    raise ValueError(
                        f"shards disagree on {key}, which every rank holds whole: "
                        "shards of different runs or steps"
                    )
                continue
            per_class = first[key].shape[dim] // max(1, ordered[0]["class_range"][1])
            if value.shape[dim] != (end - start) * per_class:
                raise ValueError(
                    f"shard {rank}'s {key} has {value.shape[dim]} entries for classes "
                    f"[{start}, {end}); shard 0 has {per_class} per class: not one run"
                )


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, with NaN equal to NaN (a diverged run's buffers are one run's too)."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or a.dtype != b.dtype or not a.is_floating_point():
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def split_checkpoint(full: Checkpoint, world_size: int) -> list[Checkpoint]:
    """Split a ``world_size == 1`` checkpoint into ``world_size`` shards (list index = rank)."""
    _check_checkpoint(full)
    if full["world_size"] != 1:
        raise ValueError("split_checkpoint needs a merged checkpoint; use reshard for shards")
    num_classes = full["num_classes"]
    shards = []
    for rank, (start, end) in enumerate(shard_ranges(num_classes, world_size)):
        state = {}
        for key, value in full["state_dict"].items():
            if key not in _CLASS_DIM:
                state[key] = value.clone()
                continue
            # each class may own several consecutive entries (sub-centres: K columns of W)
            per_class, extra = divmod(value.shape[_CLASS_DIM[key]], num_classes)
            if extra or not per_class:
                raise ValueError(
                    f"{key} has {value.shape[_CLASS_DIM[key]]} entries along its class "
                    f"dimension, not a multiple of num_classes={num_classes}"
                )
            state[key] = value.narrow(
                _CLASS_DIM[key], start * per_class, (end - start) * per_class
            ).clone()
        shards.append(
            {
                **full,
                "loss_kwargs": copy.deepcopy(full["loss_kwargs"]),  # (each shard its own)
                "rank": rank,
                "world_size": world_size,
                "class_range": (start, end),
                "state_dict": state,
                "sampler_state": None,
            }
        )
    return shards


def reshard(shards: Iterable[Checkpoint], world_size: int) -> list[Checkpoint]:
    """Re-split the shards of one run for another ``world_size``."""
    return split_checkpoint(merge_shards(shards), world_size)


def load_into(loss: ShardedMarginSoftmaxLoss, shard: Checkpoint) -> None:
    """Load a shard into a :class:`ShardedMarginSoftmaxLoss` of the same loss type and
    class range: its tensors, its Partial FC sampler state (same world size) and its
    hyper-parameters as they were saved (a margin a scheduler had moved). The loss keeps
    its own ``sample_rate`` (whether a run samples its classes is its choice: a
    full-softmax checkpoint may resume with Partial FC); the shard's is what
    :func:`to_single_process_loss` builds with. A refused
    shard loads nothing.

    Raises:
        ValueError: another loss type, class range, embedding size, state (keys, shapes,
            dtypes), a loss whose tensors are on the meta device, or a checkpoint of
            another format or missing a field.
    """
    _check_checkpoint(shard, "shard")
    if shard["loss_type"] != _type_name(loss.loss_type):
        raise ValueError(
            f"shard is of a {shard['loss_type']}, the loss a {_type_name(loss.loss_type)}"
        )
    if shard["num_classes"] != loss.num_classes or tuple(shard["class_range"]) != (
        loss.class_start,
        loss.class_end,
    ):
        raise ValueError(
            f"shard covers classes {tuple(shard['class_range'])} of {shard['num_classes']}, "
            f"the loss [{loss.class_start}, {loss.class_end}) of {loss.num_classes}; "
            "use reshard() first"
        )
    if shard["embedding_size"] != loss.embedding_size:
        raise ValueError(
            f"shard has embedding_size {shard['embedding_size']}, the loss {loss.embedding_size}"
        )
    _check_state_fits(loss.loss, shard["state_dict"])
    loss.loss.check_statistics(shard["state_dict"])  # (before the hyper-parameters change)
    same_world = shard.get("world_size") == loss.world_size
    if same_world:
        loss.check_sampler_state(shard.get("sampler_state"))
    before = _current_hyperparameters(loss.loss)
    try:
        _restore_hyperparameters(loss.loss, shard["loss_kwargs"])
        loss.loss.load_state_dict(shard["state_dict"])  # (atomic: all or nothing)
    except (TypeError, ValueError, RuntimeError) as err:
        _restore_hyperparameters(loss.loss, before)  # a refused shard loads nothing
        if isinstance(err, RuntimeError):  # torch's load_state_dict: one line, ValueError
            reason = " ".join(str(err).split())
            raise ValueError(
                f"the shard's state cannot be loaded into the loss ({reason})"
            ) from None
        raise
    if same_world:
        loss.load_sampler_state(shard.get("sampler_state"))


def _check_state_fits(loss: ClassWeightLoss, state: Mapping[str, torch.Tensor]) -> None:
    """``ValueError`` unless ``state`` has the keys, shapes and dtypes of
    ``loss.state_dict()`` (floating for floating: another precision is a resume's choice,
    a bool or complex ``W`` into a float one is not) and the loss's tensors hold values
    (checked before anything is loaded: ``load_state_dict`` copies entry by entry,
    casting dtypes, and into meta tensors not at all)."""
    mine = loss.state_dict()
    if set(state) != set(mine):
        raise ValueError(
            f"shard holds {sorted(state)}, the loss {sorted(mine)}: not the same loss setup"
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(mine[k].shape)]
    if wrong:
        shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(mine[k].shape)}" for k in wrong)
        raise ValueError(f"shard's tensors do not fit the loss: {shown}")
    check_loadable(mine, state)


def _restore_hyperparameters(loss: ClassWeightLoss, saved: Mapping[str, Any]) -> None:
    """Set the hyper-parameters the shard recorded (as a scheduler had moved them), as
    :func:`to_single_process_loss` builds them; bounds that must stay ordered (MagFace's
    ``l_m <= u_m``) are set in whichever order their checks allow."""
    current = _current_hyperparameters(loss)
    todo = {k: v for k, v in saved.items() if k in current and current[k] != v}
    while todo:
        refused: dict[str, Exception] = {}
        for name, value in todo.items():
            try:
                setattr(loss, name, value)
            except (TypeError, ValueError) as err:
                refused[name] = err
        if len(refused) == len(todo):  # no progress: the saved values themselves are bad
            name, err = next(iter(refused.items()))
            raise type(err)(
                f"the shard's saved {name}={todo[name]!r} is refused by the "
                f"{type(loss).__name__}: {err}"
            ) from None
        todo = {k: todo[k] for k in refused}


def to_single_process_loss(
    checkpoint: Checkpoint | Sequence[Checkpoint], **loss_kwargs: Any
) -> ClassWeightLoss:
    """The ordinary single-process loss (all ``C`` classes) from shards or a merged checkpoint.

    ``loss_kwargs`` override or complete the saved ones (e.g. a ``reducer``; shards
    trained with Partial FC pass on their ``sample_rate``, whose loss samples classes:
    ``sample_rate=1.0`` gives the full softmax). The
    loss's parameters and buffers are the checkpoint's, dtypes included (AdaCos keeps
    its float64 scale beside a float32 ``W``): its state dict equals the checkpoint's.
    """
    if not isinstance(checkpoint, (Mapping, Sequence)) or isinstance(checkpoint, str):
        raise TypeError(
            "checkpoint must be a checkpoint dict (shard_checkpoint, load_shard) "
            f"or a sequence of one run's shards, got {type(checkpoint).__name__}"
        )
    full = checkpoint if isinstance(checkpoint, Mapping) else merge_shards(checkpoint)
    _check_checkpoint(full)
    if full["world_size"] != 1:
        full = merge_shards([full])
    loss_type = _load_type(full["loss_type"])
    try:
        loss = loss_type(
            full["num_classes"], full["embedding_size"], **{**full["loss_kwargs"], **loss_kwargs}
        )
    except TypeError as err:  # an argument the class does not take (a tampered loss_type)
        raise ValueError(
            f"the checkpoint's loss_kwargs do not build a {full['loss_type']} ({err})"
        ) from None
    except ValueError as err:  # a value the class refuses (saved by an older version)
        raise ValueError(
            f"the checkpoint's loss_kwargs (with those given) do not build a "
            f"{full['loss_type']}: {err}; pass a valid value as a keyword argument"
        ) from None
    state = {key: value.clone() for key, value in full["state_dict"].items()}
    try:
        loss.load_state_dict(state, assign=True)  # the checkpoint's tensors, not copies
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        hint = ""
        if "Missing key" in reason or "Unexpected key" in reason:
            hint = "; pass the constructor arguments it needs as loss_kwargs"
        raise ValueError(
            f"the checkpoint's state cannot be loaded into the {full['loss_type']} its "
            f"loss_kwargs build ({reason}){hint}"
        ) from None
    return loss


def from_single_process_loss(loss: ClassWeightLoss, **loss_kwargs: Any) -> Checkpoint:
    """A merged checkpoint of an ordinary loss; split it with :func:`split_checkpoint`.

    The loss's hyper-parameters (``hyperparameter_names``) are recorded as they are
    now, and ``SoftmaxLoss``'s ``bias``; ``loss_kwargs`` add or override constructor
    arguments (a loss does not keep every argument under its name).

    Raises:
        TypeError: ``loss`` is not a pml_margins class-weight loss (a PML loss: load
            its state dict into ours first, e.g. ``ArcFaceLoss``).
    """
    if not isinstance(loss, ClassWeightLoss):
        raise TypeError(
            f"from_single_process_loss needs a pml_margins ClassWeightLoss, got "
            f"{type(loss).__module__}.{type(loss).__name__}; build ours and load the state "
            "dict into it first (PML's state dicts load into ours)"
        )
    recorded = {**_current_hyperparameters(loss), **_rate(loss)}
    if isinstance(loss, SoftmaxLoss):  # bias=...: no attribute of that name records it
        recorded["bias"] = loss.use_bias
    initial = loss.initial_statistics().get("scale") if isinstance(loss, AdaCosLoss) else None
    if initial is not None:  # AdaCos: the scale it started from (the buffer holds the current)
        recorded["scale"] = initial
    return {
        "format": FORMAT,
        "loss_type": _type_name(type(loss)),
        "loss_kwargs": _plain({**recorded, **loss_kwargs}),
        "num_classes": loss.num_classes,
        "embedding_size": loss.embedding_size,
        "rank": 0,
        "world_size": 1,
        "class_range": (0, loss.num_classes),
        "state_dict": {k: v.detach().cpu().clone() for k, v in loss.state_dict().items()},
        "sampler_state": None,
    }
