"""Scale-out on ``torch.distributed``: sharded class weights (Partial FC) and sharded retrieval."""

from pml_margins.distributed.collectives import (
    all_gather_rows,
    default_backend,
    gather_rows_with_grad,
    is_distributed,
    rank_and_world_size,
)
from pml_margins.distributed.partial_fc import sample_local_classes
from pml_margins.distributed.sharded_loss import ShardedMarginSoftmaxLoss
from pml_margins.distributed.sharded_margin_softmax import sharded_margin_softmax_cross_entropy
from pml_margins.distributed.sharding import shard_range, shard_ranges

__all__ = [
    "ShardedMarginSoftmaxLoss",
    "all_gather_rows",
    "default_backend",
    "gather_rows_with_grad",
    "is_distributed",
    "rank_and_world_size",
    "sample_local_classes",
    "shard_range",
    "shard_ranges",
    "sharded_margin_softmax_cross_entropy",
]
