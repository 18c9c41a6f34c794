"""How classes are split across ranks: contiguous ranges, sizes differing by at most one."""

from __future__ import annotations

from pml_margins.functional.fused_margin_softmax import class_columns
from pml_margins.validation import check_count

__all__ = ["class_columns", "shard_range", "shard_ranges"]


def shard_ranges(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` per rank; the first ``num_classes % world_size`` get one more.

    Raises:
        ValueError: ``world_size < 1`` or fewer classes than ranks.

    Example:
        >>> shard_ranges(10, 3)
        [(0, 4), (4, 7), (7, 10)]
    """
    num_classes = check_count(num_classes, "num_classes")
    world_size = check_count(world_size, "world_size")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes ({num_classes}) must be >= world_size ({world_size}): "
            "every rank owns at least one class"
        )
    base, extra = divmod(num_classes, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        end = start + base + (1 if rank < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The ``[start, end)`` class range owned by ``rank``."""
    world_size = check_count(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    return shard_ranges(num_classes, world_size)[rank]
