"""What a state dict may load into a loss: tensors of the same kind, a loss with values."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["check_loadable", "value_kind"]


def value_kind(dtype: torch.dtype) -> str:
    """``"complex"``, ``"float"``, ``"bool"`` or ``"integer"``: what a cast between two
    dtypes of one kind keeps (another float precision is a resume's choice; a bool or
    complex ``W`` cast into a float one is not a checkpoint of that loss)."""
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "integer"


def check_loadable(mine: Mapping[str, object], state: Mapping[str, object]) -> None:
    """``ValueError`` where ``load_state_dict`` of ``state`` into tensors ``mine`` (the
    same keys) would cast values into another kind, or load nothing (meta tensors)."""
    pairs = [
        (key, value, mine[key])
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and isinstance(mine.get(key), torch.Tensor)
    ]
    cast = [(k, v, m) for k, v, m in pairs if value_kind(v.dtype) != value_kind(m.dtype)]
    if cast:
        shown = ", ".join(f"{k} {v.dtype} vs {m.dtype}" for k, v, m in cast)
        raise ValueError(
            f"the state's tensors are not of the loss's kind: {shown} (a load would cast "
            "them into meaningless values): not a checkpoint of this loss"
        )
    odd = [k for k, v, _ in pairs if v.layout != torch.strided or v.is_meta]
    if odd:  # (load_state_dict fails on them part-way, with torch's own error)
        raise ValueError(
            f"the state's {', '.join(odd)} must be dense tensors holding values (not sparse "
            "or on the meta device): not a saved state"
        )
    if any(m.is_meta for _, _, m in pairs):
        raise ValueError(
            "the loss's tensors are on the meta device, where nothing loads: materialize it "
            "(to_empty(device=...)) first, or rebuild it with to_single_process_loss()"
        )
