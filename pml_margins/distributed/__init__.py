"""Scale-out on ``torch.distributed``: sharded class weights (Partial FC) and sharded retrieval.

- :class:`ShardedMarginSoftmaxLoss`: any class-weight loss with ``W`` split by
  classes across ranks, exact or with Partial FC sampling.
- :mod:`~pml_margins.distributed.checkpoint`: per-shard checkpoints, merge,
  re-shard, conversion to and from the single-process loss.
- :class:`ShardedRetrievalAccuracyCalculator` / :func:`sharded_exact_knn`: exact
  retrieval metrics with the reference set split across ranks.

Training, on every rank (``torchrun --nproc-per-node N train.py``)::

    dist.init_process_group(default_backend())
    model = DistributedDataParallel(backbone.cuda())           # the backbone only
    loss_fn = ShardedMarginSoftmaxLoss(ArcFaceLoss, 1_000_000, 512,
                                       sample_rate=0.1, margin=0.5).cuda()
    opt = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.1)
    loss = loss_fn(model(images), labels)                      # same value on all ranks
    loss.backward(); opt.step(); opt.zero_grad()
    save_shard(loss_fn, f"ckpt/head_{dist.get_rank()}.pt")      # per shard
"""

from pml_margins.distributed.checkpoint import (
    from_single_process_loss,
    load_into,
    load_shard,
    merge_shards,
    reshard,
    save_shard,
    shard_checkpoint,
    split_checkpoint,
    to_single_process_loss,
)
from pml_margins.distributed.collectives import (
    all_gather_rows,
    default_backend,
    gather_rows_with_grad,
    is_distributed,
    rank_and_world_size,
)
from pml_margins.distributed.evaluation import (
    ShardedRetrievalAccuracyCalculator,
    sharded_exact_knn,
)
from pml_margins.distributed.partial_fc import sample_local_classes
from pml_margins.distributed.sharded_loss import ShardedMarginSoftmaxLoss
from pml_margins.distributed.sharded_margin_softmax import sharded_margin_softmax_cross_entropy
from pml_margins.distributed.sharding import shard_range, shard_ranges

__all__ = [
    "ShardedMarginSoftmaxLoss",
    "ShardedRetrievalAccuracyCalculator",
    "all_gather_rows",
    "default_backend",
    "from_single_process_loss",
    "gather_rows_with_grad",
    "is_distributed",
    "load_into",
    "load_shard",
    "merge_shards",
    "rank_and_world_size",
    "reshard",
    "sample_local_classes",
    "save_shard",
    "shard_checkpoint",
    "shard_range",
    "shard_ranges",
    "sharded_exact_knn",
    "sharded_margin_softmax_cross_entropy",
    "split_checkpoint",
    "to_single_process_loss",
]
