"""Inputs made under ``torch.inference_mode`` in the functions autograd differentiates.

Autograd refuses to save an inference tensor ("Inference tensors cannot be saved for
backward"), so embeddings, labels or scales computed under ``torch.inference_mode()`` (a
frozen backbone's features, a cached batch) failed in our functions where PML's losses,
whose first op makes a new tensor, train the class weights. Such a tensor is copied once,
outside inference mode: a copy is what the backward reads, since the tensor itself has no
version counter (it may be refilled in place inside inference mode before the backward,
which ``save_for_backward`` could not detect). Nothing is copied for any other tensor, in
inference mode (nothing is saved) or while ``torch.compile`` traces (Dynamo cannot read
``is_inference``; a compiled step gets inference inputs as ``torch.compile`` handles them).
"""

from typing import Any

import torch

from pml_margins.function_transforms import is_compiling


def outside_inference(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor``, or a copy made outside inference mode where it is an inference tensor
    (and inference mode is off: there nothing is saved)."""
    if (
        tensor is not None
        and not is_compiling()
        and tensor.is_inference()
        and not torch.is_inference_mode_enabled()
    ):
        return tensor.clone()
    return tensor


def save_inputs(ctx: Any, *tensors: torch.Tensor | None) -> None:
    """``ctx.save_for_backward(*tensors)``, each inference tensor as its copy
    (:func:`outside_inference`): autograd's "modified by an inplace operation" error
    stays for every other tensor."""
    if is_compiling():
        ctx.save_for_backward(*tensors)
    else:
        ctx.save_for_backward(*(outside_inference(t) for t in tensors))
