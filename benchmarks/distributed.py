"""Memory per rank and throughput of the sharded margin softmax vs the unsharded loss.

Each configuration runs in fresh processes (so that peak memory is its own):

* ``unsharded``: one process, ``ArcFaceLoss(C, D)`` on the whole batch of
  ``world_size * batch`` embeddings;
* ``sharded``: ``world_size`` ranks, ``ShardedMarginSoftmaxLoss`` with ``C / world_size``
  classes each, ``batch`` embeddings per rank (same global batch), at each
  ``--sample-rate`` (1 = exact, < 1 = Partial FC).

Every step is forward, backward and an SGD step on ``W``. All variants start from the
same global batch and the same ``W`` (generated in column blocks from a fixed seed,
so each rank makes only its own shard): the first step's loss of the unsharded loss,
of PML's ``ArcFaceLoss`` (computed after the memory is read) and of the exact
sharded loss must agree; the table prints them. Memory: on CPU the
growth of the process's peak RSS (``ru_maxrss``) over its value after start-up
and one tiny warm-up step;
on CUDA ``torch.cuda.max_memory_allocated``. ``W+grad`` is the analytic size of
the (local) weights and their gradient. Throughput: global samples per second,
after one warm-up step, the slowest rank's time.

Usage::

    python3 benchmarks/distributed.py                       # CPU, gloo, C = 100k, 300k, 1M
    python3 benchmarks/distributed.py --quick               # smoke test, seconds
    python3 benchmarks/distributed.py --device cuda --world-size 8 --dim 512 --batch 128
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pytorch_metric_learning import losses as pml_losses

from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.losses import ArcFaceLoss

MARGIN, SCALE, SEED = 0.5, 64.0, 0
_BLOCK = 4096  # columns of W drawn per generator seed


@dataclass(frozen=True)
class Config:
    num_classes: int
    dim: int
    batch: int  # per rank
    world_size: int
    sample_rate: float | None  # None: unsharded
    steps: int
    backend: str


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _fill_weights(weight: torch.Tensor, start: int) -> None:
    """Columns ``[start, start + weight.shape[1])`` of the benchmark's global ``W``, in place."""
    end = start + weight.shape[1]
    with torch.no_grad():
        for block in range(start // _BLOCK, (end - 1) // _BLOCK + 1):
            gen = torch.Generator().manual_seed(SEED * 1_000_003 + block)
            values = torch.randn(weight.shape[0], _BLOCK, generator=gen)
            lo, hi = max(start, block * _BLOCK), min(end, (block + 1) * _BLOCK)
            weight[:, lo - start : hi - start] = values[
                :, lo - block * _BLOCK : hi - block * _BLOCK
            ]


def _global_batch(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    n = cfg.batch * cfg.world_size
    return torch.randn(n, cfg.dim, generator=gen), torch.randint(
        0, cfg.num_classes, (n,), generator=gen
    )


def _pml_value(cfg: Config, x: torch.Tensor, y: torch.Tensor) -> float:
    """PML's ArcFaceLoss (margin in degrees) on the same batch and initial ``W``."""
    pml = pml_losses.ArcFaceLoss(cfg.num_classes, cfg.dim, margin=math.degrees(MARGIN), scale=SCALE)
    _fill_weights(pml.W, 0)
    with torch.no_grad():
        return float(pml.to(x.device)(x, y))


def _warm_up(sharded: bool, device: torch.device) -> None:
    """One tiny step, so that start-up allocations (threads, autograd, optim) are not counted."""
    n = dist.get_world_size() if sharded else 1
    loss_fn = (ShardedMarginSoftmaxLoss if sharded else lambda _t, c, d: ArcFaceLoss(c, d))(
        ArcFaceLoss, 8 * n, 4
    ).to(device)
    x = torch.randn(2, 4, device=device, requires_grad=True)
    loss_fn(x, torch.zeros(2, dtype=torch.long, device=device)).backward()
    torch.optim.SGD(loss_fn.parameters(), lr=0.1).step()


def _worker(rank: int, cfg: Config, store: str, queue) -> None:
    cuda = cfg.backend == "nccl"
    sharded = cfg.sample_rate is not None
    world_size = cfg.world_size if sharded else 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if sharded:
        dist.init_process_group(
            cfg.backend,
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=600),
        )
    torch.manual_seed(rank)
    _warm_up(sharded, device)
    all_x, all_y = _global_batch(cfg)
    base = _peak_rss_mib()
    if sharded:
        loss_fn = ShardedMarginSoftmaxLoss(
            ArcFaceLoss,
            cfg.num_classes,
            cfg.dim,
            sample_rate=cfg.sample_rate,
            margin=MARGIN,
            scale=SCALE,
        )
        _fill_weights(loss_fn.W_local, loss_fn.class_start)
        loss_fn = loss_fn.to(device)
        weights = loss_fn.W_local
        rows = slice(rank * cfg.batch, (rank + 1) * cfg.batch)
    else:
        loss_fn = ArcFaceLoss(cfg.num_classes, cfg.dim, margin=MARGIN, scale=SCALE)
        _fill_weights(loss_fn.W, 0)
        loss_fn = loss_fn.to(device)
        weights = loss_fn.W
        rows = slice(None)
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
    x = all_x[rows].to(device).requires_grad_(True)
    y = all_y[rows].to(device)
    first_loss = float("nan")
    elapsed = 0.0
    for step in range(cfg.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        if sharded:
            dist.barrier()
        start = time.perf_counter()
        loss = loss_fn(x, y)
        if step == 0:
            first_loss = loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
        if step > 0:
            elapsed += time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib() - base
    w_bytes = 2 * weights.numel() * weights.element_size() / 2**20
    del loss_fn, optimizer, weights
    pml = float("nan") if sharded else _pml_value(cfg, all_x.to(device), all_y.to(device))
    queue.put((rank, peak, w_bytes, elapsed, first_loss, pml))
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


def run(cfg: Config) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    n = cfg.world_size if cfg.sample_rate is not None else 1
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_worker, args=(r, cfg, os.path.join(tmp, "store"), queue))
            for r in range(n)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        results = []
        while not queue.empty():
            results.append(queue.get())
        # a rank whose results arrived can still be aborted by gloo in its teardown, when
        # its peer closed the connection first (a signal, negative exit code): judge the
        # run by the results, as tests/distributed/harness.py does by its done markers
        if len(results) < n or any(p.exitcode != 0 and p.exitcode >= 0 for p in procs):
            raise RuntimeError(f"{cfg}: workers exited with {[p.exitcode for p in procs]}")
    global_batch = cfg.batch * cfg.world_size
    return {
        "peak_mib": max(r[1] for r in results),
        "w_mib": max(r[2] for r in results),
        "samples_per_s": global_batch * cfg.steps / max(r[3] for r in results),
        "loss": results[0][4],
        "pml_loss": results[0][5],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="embeddings per rank")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--sample-rate", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank, NCCL"
    )
    parser.add_argument("--backend", choices=["gloo", "nccl"], help="default: the device's")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if (args.backend == "nccl") != (args.device == "cuda"):
        parser.error("the nccl backend runs on cuda, gloo here on cpu")
    if args.quick:
        args.classes, args.dim, args.batch, args.steps = [2_000], 16, 4, 1
    if args.backend == "nccl" and torch.cuda.device_count() < args.world_size:
        parser.error(f"nccl needs {args.world_size} GPUs, found {torch.cuda.device_count()}")
    memory = "peak CUDA MiB" if args.backend == "nccl" else "peak RSS growth MiB"
    print(
        f"backend={args.backend} world_size={args.world_size} D={args.dim} "
        f"batch/rank={args.batch} steps={args.steps} torch threads: "
        f"{max(1, (os.cpu_count() or 1) // args.world_size)} per sharded rank, "
        f"{os.cpu_count()} unsharded\n"
    )
    print(
        f"| C | variant | {memory} (per rank) | W+grad MiB (per rank) | samples/s "
        "| loss, step 0 | PML's ArcFaceLoss, same W and batch |"
    )
    print("|---|---|---|---|---|---|---|")
    for c in args.classes:
        variants = [("unsharded", None)] + [
            (f"sharded x{args.world_size}, sample_rate={r:g}", r) for r in args.sample_rate
        ]
        for name, rate in variants:
            cfg = Config(c, args.dim, args.batch, args.world_size, rate, args.steps, args.backend)
            r = run(cfg)
            print(
                f"| {c:,} | {name} | {r['peak_mib']:.0f} | {r['w_mib']:.0f} "
                f"| {r['samples_per_s']:.1f} | {r['loss']:.6f} "
                f"| {'' if math.isnan(r['pml_loss']) else format(r['pml_loss'], '.6f')} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
