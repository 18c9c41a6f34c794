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

Only plain ``loss_kwargs`` (numbers, strings, booleans, ``None``) are saved;
pass objects such as a ``reducer`` again when rebuilding a loss.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pml_margins.distributed.sharded_loss import ShardedMarginSoftmaxLoss
from pml_margins.distributed.sharding import shard_ranges
from pml_margins.losses.class_weight_loss import ClassWeightLoss

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


def _type_name(loss_type: type) -> str:
    return f"{loss_type.__module__}.{loss_type.__qualname__}"


def _load_type(name: str) -> type[ClassWeightLoss]:
    module, _, qualname = name.rpartition(".")
    loss_type = getattr(importlib.import_module(module), qualname, None)
    if not (isinstance(loss_type, type) and issubclass(loss_type, ClassWeightLoss)):
        raise ValueError(f"checkpoint loss_type {name!r} is not a ClassWeightLoss subclass")
    return loss_type


def _plain(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is None or isinstance(v, (bool, int, float, str))}


def _current_hyperparameters(loss: ClassWeightLoss) -> dict[str, Any]:
    """The current values of every hyper-parameter of ``loss`` (its
    ``hyperparameter_names``, each a constructor argument): given to the constructor
    or left at its default, a scheduler may have moved it since."""
    return {
        name: getattr(loss, name)
        for name in getattr(loss, "hyperparameter_names", ())
        if isinstance(getattr(loss, name, None), (bool, int, float, str))
    }


def shard_checkpoint(loss: ShardedMarginSoftmaxLoss) -> Checkpoint:
    """This rank's shard of ``loss`` as a checkpoint dict (tensors detached, on CPU)."""
    return {
        "format": FORMAT,
        "loss_type": _type_name(loss.loss_type),
        # the hyper-parameters as they are now (a scheduler may have moved a margin)
        "loss_kwargs": _plain({**loss.loss_kwargs, **_current_hyperparameters(loss.loss)}),
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
    """Read one shard written by :func:`save_shard` (``weights_only=True``)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a {FORMAT} checkpoint")
    ckpt["class_range"] = tuple(ckpt["class_range"])
    return ckpt


def merge_shards(shards: Sequence[Checkpoint]) -> Checkpoint:
    """Concatenate the shards of one run (any order) into a ``world_size == 1`` checkpoint.

    Raises:
        ValueError: shards from different runs, missing or duplicated ranks.
    """
    if not shards:
        raise ValueError("no shards given")
    first = shards[0]
    world_size = first["world_size"]
    by_rank = {s["rank"]: s for s in shards}
    if sorted(by_rank) != list(range(world_size)) or len(shards) != world_size:
        raise ValueError(
            f"need exactly one shard per rank 0..{world_size - 1}, got ranks "
            f"{sorted(s['rank'] for s in shards)}"
        )
    for key in ("loss_type", "num_classes", "embedding_size", "world_size"):
        if any(s[key] != first[key] for s in shards):
            raise ValueError(f"shards disagree on {key}")
    ordered = [by_rank[r] for r in range(world_size)]
    expected = shard_ranges(first["num_classes"], world_size)
    if [tuple(s["class_range"]) for s in ordered] != expected:
        raise ValueError("shard class ranges do not match the contiguous split")
    state = {}
    for key, value in first["state_dict"].items():
        dim = _CLASS_DIM.get(key)
        parts = [s["state_dict"][key] for s in ordered]
        state[key] = value.clone() if dim is None else torch.cat(parts, dim=dim)
    return {
        **first,
        "rank": 0,
        "world_size": 1,
        "class_range": (0, first["num_classes"]),
        "state_dict": state,
        "sampler_state": None,
    }


def split_checkpoint(full: Checkpoint, world_size: int) -> list[Checkpoint]:
    """Split a ``world_size == 1`` checkpoint into ``world_size`` shards (list index = rank)."""
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
            per_class = value.shape[_CLASS_DIM[key]] // num_classes
            state[key] = value.narrow(
                _CLASS_DIM[key], start * per_class, (end - start) * per_class
            ).clone()
        shards.append(
            {
                **full,
                "rank": rank,
                "world_size": world_size,
                "class_range": (start, end),
                "state_dict": state,
                "sampler_state": None,
            }
        )
    return shards


def reshard(shards: Sequence[Checkpoint], world_size: int) -> list[Checkpoint]:
    """Re-split the shards of one run for another ``world_size``."""
    return split_checkpoint(merge_shards(shards), world_size)


def load_into(loss: ShardedMarginSoftmaxLoss, shard: Checkpoint) -> None:
    """Load a shard into a :class:`ShardedMarginSoftmaxLoss` of the same loss type and
    class range."""
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
    loss.loss.load_state_dict(shard["state_dict"])
    if shard.get("world_size") == loss.world_size:
        loss.load_sampler_state(shard.get("sampler_state"))


def to_single_process_loss(
    checkpoint: Checkpoint | Sequence[Checkpoint], **loss_kwargs: Any
) -> ClassWeightLoss:
    """The ordinary single-process loss (all ``C`` classes) from shards or a merged checkpoint.

    ``loss_kwargs`` override or complete the saved ones (e.g. a ``reducer``). The
    loss's parameters and buffers are the checkpoint's, dtypes included (AdaCos keeps
    its float64 scale beside a float32 ``W``): its state dict equals the checkpoint's.
    """
    full = checkpoint if isinstance(checkpoint, Mapping) else merge_shards(checkpoint)
    if full["world_size"] != 1:
        full = merge_shards([full])
    loss_type = _load_type(full["loss_type"])
    loss = loss_type(
        full["num_classes"], full["embedding_size"], **{**full["loss_kwargs"], **loss_kwargs}
    )
    state = {key: value.clone() for key, value in full["state_dict"].items()}
    loss.load_state_dict(state, assign=True)  # the checkpoint's tensors, not copies into ours
    return loss


def from_single_process_loss(loss: ClassWeightLoss, **loss_kwargs: Any) -> Checkpoint:
    """A merged checkpoint of an ordinary loss; split it with :func:`split_checkpoint`.

    The loss's hyper-parameters (``hyperparameter_names``) are recorded as they are
    now; ``loss_kwargs`` add or override constructor arguments (a loss does not keep
    every argument under its name, e.g. ``SoftmaxLoss``'s ``bias``).
    """
    return {
        "format": FORMAT,
        "loss_type": _type_name(type(loss)),
        "loss_kwargs": _plain({**_current_hyperparameters(loss), **loss_kwargs}),
        "num_classes": loss.num_classes,
        "embedding_size": loss.embedding_size,
        "rank": 0,
        "world_size": 1,
        "class_range": (0, loss.num_classes),
        "state_dict": {k: v.detach().cpu().clone() for k, v in loss.state_dict().items()},
        "sampler_state": None,
    }
