"""Worker for the two-process DistributedLossWrapper test (run by torch.multiprocessing)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

from pml_margins.losses import CircleLoss


def run(rank: int, world_size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        g = torch.Generator().manual_seed(0)
        x_all = torch.randn(8 * world_size, 6, generator=g, dtype=torch.float64)
        y_all = torch.randint(0, 3, (8 * world_size,), generator=g)
        x, y = x_all[rank * 8 : (rank + 1) * 8], y_all[rank * 8 : (rank + 1) * 8]
        results = {}
        for efficient in (False, True):
            for name, loss in (
                ("ours", CircleLoss(m=0.25, gamma=32)),
                ("pml", pml_losses.CircleLoss(m=0.25, gamma=32)),
            ):
                emb = x.clone().requires_grad_(True)
                value = DistributedLossWrapper(loss, efficient=efficient)(emb, y)
                (grad,) = torch.autograd.grad(value, emb)
                results[(efficient, name)] = (value.detach(), grad)
        torch.save(results, out)
    finally:
        dist.destroy_process_group()
