"""Defects found by this session's review (one process, no process group), each test
failing on the code before its fix."""

from __future__ import annotations

import pytest
import torch

from pml_margins.distributed import ShardedMarginSoftmaxLoss, sample_local_classes
from pml_margins.distributed.checkpoint import shard_checkpoint, to_single_process_loss
from pml_margins.losses import ArcFaceLoss


def test_sample_local_classes_checks_its_arguments() -> None:
    """Float labels were truncated (0.9 -> class 0), a list of labels failed with 'list'
    object has no attribute 'long', a negative shard size or start was taken."""
    draw = torch.Generator().manual_seed(0)
    index, target = sample_local_classes(torch.tensor([0, 2]), 0, 5, 0.6, draw)
    assert index.tolist()[:1] == [0] and target.tolist()[0] == 0 and len(index) == 3
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        sample_local_classes(torch.tensor([0.9, 2.7]), 0, 5, 0.6, draw)
    with pytest.raises(TypeError, match="labels must be a"):
        sample_local_classes([0, 1], 0, 5, 0.5)
    with pytest.raises(ValueError, match="num_local must be >= 0"):
        sample_local_classes(torch.tensor([0, 1]), 0, -1, 0.5)
    with pytest.raises(ValueError, match="class_start must be >= 0"):
        sample_local_classes(torch.tensor([0, 1]), -1, 5, 0.5)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        sample_local_classes(torch.tensor([0, 1]), 0, 5, 0.5, 7)


def test_a_group_that_is_not_a_process_group_is_refused() -> None:
    """group="x" was taken (and the world used)."""
    for group in ("x", [0, 1], 3):
        with pytest.raises(TypeError, match=r"group must be a torch\.distributed ProcessGroup"):
            ShardedMarginSoftmaxLoss(ArcFaceLoss, 100, 16, group=group)


@pytest.mark.parametrize("setting", [("sample_rate", 0.1), ("chunk_size", 4)])
def test_settings_of_the_inner_loss_that_the_shard_ignores_are_refused(setting) -> None:
    """loss.loss.sample_rate = 0.1 trained the full softmax (62.16, where the shard's own
    sample_rate=0.1 gives 47.11); loss.loss.chunk_size = 4, refused at construction, was
    taken after it and ignored."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.arange(8)
    loss_fn = ShardedMarginSoftmaxLoss(ArcFaceLoss, 100, 16)
    before = loss_fn(x, y)
    setattr(loss_fn.loss, *setting)
    with pytest.raises(ValueError, match=r"inner loss has chunk_size=.*set sample_rate on it"):
        loss_fn(x, y)
    setattr(loss_fn.loss, setting[0], None if setting[0] == "chunk_size" else 1.0)
    assert torch.equal(loss_fn(x, y), before)


def test_to_single_process_loss_of_a_number_names_what_it_takes() -> None:
    """to_single_process_loss(3) raised "'int' object is not iterable"."""
    for wrong in (3, "ckpt.pt", None):
        with pytest.raises(TypeError, match="checkpoint must be a checkpoint dict"):
            to_single_process_loss(wrong)
    shard = shard_checkpoint(ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4))
    assert to_single_process_loss([shard]).num_classes == to_single_process_loss(shard).num_classes


def test_circle_loss_masked_takes_only_a_bool_per_anchor() -> None:
    """per_anchor="no" was taken as True (a (B,) result)."""
    from pml_margins.functional import circle_loss_masked

    sim = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
    pos = torch.tensor([[False, True], [True, False]])
    assert circle_loss_masked(sim, pos, ~pos, 0.25, 16.0, per_anchor=False).shape == ()
    with pytest.raises(TypeError, match="per_anchor must be a bool"):
        circle_loss_masked(sim, pos, ~pos, 0.25, 16.0, per_anchor="no")
