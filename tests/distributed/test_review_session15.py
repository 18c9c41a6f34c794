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
