"""Scale out: ArcFace with the class weights sharded across ranks and Partial FC, under torchrun.

Every rank holds the backbone (``DistributedDataParallel``) and a contiguous slice
of the class weights ``W`` (``ShardedMarginSoftmaxLoss``); with ``sample_rate`` < 1
each rank keeps the classes of the batch and a random share of its other classes
per step (Partial FC). After training the script

1. evaluates retrieval on unseen classes with ``ShardedRetrievalAccuracyCalculator``
   (each rank embeds and holds its own part of the evaluation set);
2. saves one checkpoint per shard (``save_shard``);
3. on rank 0, merges the shards into the ordinary single-process ``ArcFaceLoss``
   (``to_single_process_loss``) and checks that it gives the shards' logits.

Data: synthetic, many classes (each class a random centre in 32 dimensions, its
samples the centre plus noise), so the script runs anywhere with no download.
To train on real data, replace ``make_split`` (the benchmark's glyph set is the natural
switch: ``pml_margins.bench``'s dataset registry).

Run (CPU, gloo; on GPUs the backend is NCCL and each rank takes ``cuda:LOCAL_RANK``)::

    torchrun --nproc-per-node 2 examples/06_distributed_partial_fc.py [--tiny] [--out DIR]

``--out`` receives the shards (``head_<rank>.pt``), the evaluation embeddings of all
ranks (``eval_embeddings.pt``) and ``result.json`` (losses, metrics, logit check).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from pml_margins.distributed import (
    ShardedMarginSoftmaxLoss,
    ShardedRetrievalAccuracyCalculator,
    all_gather_rows,
    default_backend,
    load_shard,
    save_shard,
    shard_range,
    to_single_process_loss,
)
from pml_margins.losses import ArcFaceLoss

METRICS = ("precision_at_1", "recall_at_1", "recall_at_4", "mean_average_precision_at_r")


def make_split(
    num_classes: int, per_class: int, dim: int, seed: int, first_label: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` noisy samples around each of ``num_classes`` random unit centres.

    Every rank calls this with the same seed and so holds the same set.
    """
    gen = torch.Generator().manual_seed(seed)
    centres = nn.functional.normalize(torch.randn(num_classes, dim, generator=gen), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=gen) / dim**0.5
    return x, labels + first_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="fewer classes and steps (CI)")
    parser.add_argument("--out", help="folder for the shards and result.json (default: temp)")
    args = parser.parse_args()

    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT for env:// init
    dist.init_process_group(default_backend())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # small matrices; one thread per rank
    # one folder for every rank: rank 0 makes it (a temp folder unless --out) and tells the rest
    folder = [args.out or tempfile.mkdtemp(prefix="pml_margins_06_")] if rank == 0 else [None]
    dist.broadcast_object_list(folder, src=0)
    out = Path(folder[0])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    num_classes, per_class, epochs = (1_000, 4, 3) if args.tiny else (10_000, 8, 5)
    in_dim, embedding_size = 32, 32
    torch.manual_seed(0)  # the same backbone initialisation on every rank
    backbone = nn.Sequential(nn.Linear(in_dim, 128), nn.ReLU(), nn.Linear(128, embedding_size))
    model = DistributedDataParallel(backbone.to(device))  # gradients averaged over ranks
    # W (embedding_size x num_classes) split by classes: this rank holds its shard only
    loss_fn = ShardedMarginSoftmaxLoss(
        ArcFaceLoss, num_classes, embedding_size, sample_rate=0.2, margin=0.3, scale=16.0
    ).to(device)
    optimizer = torch.optim.SGD(
        [
            {"params": model.parameters(), "lr": 0.1},
            {"params": loss_fn.parameters(), "lr": 1.0},  # each rank steps its own shard
        ],
        momentum=0.9,
    )
    if rank == 0:
        print(f"{world_size} ranks, {num_classes:,} classes; rank 0: {loss_fn}")

    train_set = TensorDataset(*make_split(num_classes, per_class, in_dim, seed=1))
    sampler = DistributedSampler(train_set, shuffle=True, seed=0)  # a different part per rank
    loader = DataLoader(train_set, batch_size=64, sampler=sampler, drop_last=False)
    losses: list[float] = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = loss_fn(model(x.to(device)), y.to(device))  # same value on every rank
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if rank == 0:
            print(f"epoch {epoch + 1}  loss {losses[-1]:.3f}")

    # retrieval among unseen classes: each rank embeds its own contiguous part
    eval_x, eval_y = make_split(num_classes // 10, 5, in_dim, seed=2, first_label=num_classes)
    part = slice(*shard_range(len(eval_y), world_size, rank))  # the split W's classes use
    model.eval()
    with torch.no_grad():
        my_embeddings = model(eval_x[part].to(device))
    calculator = ShardedRetrievalAccuracyCalculator(include=METRICS, recall_ks=(1, 4))
    metrics = calculator.get_accuracy(my_embeddings, eval_y[part].to(device))  # all vs all
    all_embeddings = all_gather_rows(my_embeddings)[0]  # only to save them for checking

    # one checkpoint per shard, then the ordinary single-process loss from the shards
    save_shard(loss_fn, out / f"head_{rank}.pt")
    probe = all_embeddings[:16]
    local_logits = loss_fn.loss.get_logits(probe)  # s*cos against this rank's classes
    columns = all_gather_rows(local_logits.t().contiguous())[0].t()  # (16, C), rank order
    dist.barrier()  # every shard is on disk
    if rank == 0:
        shards = [load_shard(out / f"head_{r}.pt") for r in range(world_size)]
        single = to_single_process_loss(shards).to(device)  # an ordinary ArcFaceLoss
        with torch.no_grad():
            logit_diff = (single.get_logits(probe) - columns).abs().max().item()
        print("metrics (unseen classes): " + ", ".join(f"{k} {metrics[k]:.3f}" for k in METRICS))
        print(f"merged single-process loss: {single}")
        print(f"max |logits(merged) - logits(shards)| = {logit_diff:.2e}")
        torch.save(
            {"embeddings": all_embeddings.cpu(), "labels": eval_y, "probe": probe.cpu()},
            out / "eval_embeddings.pt",
        )
        result = {
            "world_size": world_size,
            "num_classes": num_classes,
            "losses": losses,
            "metrics": {k: float(metrics[k]) for k in METRICS},
            "max_logit_diff": logit_diff,
            "scale": single.scale,
        }
        (out / "result.json").write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
