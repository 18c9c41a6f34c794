"""Defects found by this session's review (one process, no process group), each test
failing on the code before its fix."""

from __future__ import annotations

import pytest

from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.distributed.checkpoint import merge_shards, reshard, shard_checkpoint
from pml_margins.losses import ArcFaceLoss


def test_merge_shards_takes_any_iterable_of_shards() -> None:
    """A generator of shards failed with Python's "'generator' object is not subscriptable"
    after it was consumed; one checkpoint given bare was read as its keys."""
    shard = shard_checkpoint(ShardedMarginSoftmaxLoss(ArcFaceLoss, 6, 4))
    merged = merge_shards(s for s in [shard])
    assert merged["world_size"] == 1 and merged["state_dict"]["W"].shape == (4, 6)
    assert len(reshard(iter([shard]), 2)) == 2
    for bad in (shard, "ckpt_0.pt", 3):
        with pytest.raises(TypeError, match="shards must be an iterable of one run's shard"):
            merge_shards(bad)


@pytest.mark.parametrize("bad", [{"include": None}, {"exclude": None}, {"include": 3}])
def test_sharded_calculator_names_a_bad_include_or_exclude(bad) -> None:
    """The settings compared across ranks unpacked include/exclude before the checks ran
    on every rank: Python's "Value after * must be an iterable" here, and at 2 ranks a
    hang of the other ranks when one rank's value was bad (a gloo timeout)."""
    import torch

    from pml_margins.distributed import ShardedRetrievalAccuracyCalculator

    generator = torch.Generator().manual_seed(3)
    reference = torch.randn(12, 4, generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    name = next(iter(bad))
    with pytest.raises(TypeError, match=f"{name} must be a tuple or list"):
        ShardedRetrievalAccuracyCalculator().get_accuracy(
            reference[:5], labels[:5], reference, labels, **bad
        )
