"""Saving a hand-written backward's inputs when some were made under ``torch.inference_mode``.

Autograd refuses to save an inference tensor ("Inference tensors cannot be saved for
backward"), so embeddings or labels computed under ``torch.inference_mode()`` (a frozen
backbone's features, a cached batch) would fail in our functions where PML's losses, whose
first op makes a new tensor, train the class weights. Such a tensor cannot be changed in
place outside inference mode, which is what the version check of ``save_for_backward``
guards against, so it is kept on ``ctx`` instead; every other tensor still goes through
``save_for_backward`` and keeps autograd's "modified by an inplace operation" error.
"""

from typing import Any

import torch


def save_inputs(ctx: Any, *tensors: torch.Tensor | None) -> None:
    """``ctx.save_for_backward(*tensors)``, with each inference tensor kept on ``ctx``
    instead (read them back with :func:`saved_inputs`)."""
    kept = tuple(t if t is not None and t.is_inference() else None for t in tensors)
    if all(k is None for k in kept):
        ctx.inference_inputs = None
        ctx.save_for_backward(*tensors)
        return
    ctx.inference_inputs = kept
    ctx.save_for_backward(*(t if k is None else None for t, k in zip(tensors, kept, strict=True)))


def saved_inputs(ctx: Any) -> tuple[torch.Tensor | None, ...]:
    """What :func:`save_inputs` was given, in its order (``ctx.saved_tensors`` checked)."""
    saved = ctx.saved_tensors
    kept = ctx.inference_inputs
    if kept is None:
        return saved
    return tuple(s if k is None else k for s, k in zip(saved, kept, strict=True))


def outside_inference(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor``, or a copy made outside inference mode where it is an inference tensor:
    for the routes whose ops autograd records (it saves their inputs), PML's distances, a
    gather's index. A copy of the batch, made only for inference tensors (and not in
    inference mode, where nothing is saved)."""
    if tensor is not None and tensor.is_inference() and not torch.is_inference_mode_enabled():
        return tensor.clone()
    return tensor
