"""Memory per rank and throughput of the sharded margin softmax vs the unsharded loss.

Each configuration runs in fresh processes (so that peak memory is its own):

* ``unsharded``: one process, ``ArcFaceLoss(C, D)`` on the whole batch of
  ``world_size * batch`` embeddings;
* ``sharded``: ``world_size`` ranks, ``ShardedMarginSoftmaxLoss`` with ``C / world_size``
  classes each, ``batch`` embeddings per rank (same global batch), at each
  ``--sample-rate`` (1 = exact, < 1 = Partial FC).

Every step is forward, backward and an SGD step on ``W``. Memory: on CPU the
growth of the process's peak RSS (``ru_maxrss``) over its value after start-up
and one tiny warm-up step;
on CUDA ``torch.cuda.max_memory_allocated``. ``W+grad`` is the analytic size of
the (local) weights and their gradient. Throughput: global samples per second,
after one warm-up step, the slowest rank's time.

Usage::

    python3 benchmarks/distributed.py                       # CPU, gloo, C = 100k, 300k, 1M
    python3 benchmarks/distributed.py --quick               # smoke test, seconds
    python3 benchmarks/distributed.py --backend nccl --world-size 8 --dim 512 --batch 128
"""

from __future__ import annotations

import argparse
import datetime
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

from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.losses import ArcFaceLoss


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
    base = _peak_rss_mib()
    if sharded:
        loss_fn = ShardedMarginSoftmaxLoss(
            ArcFaceLoss, cfg.num_classes, cfg.dim, sample_rate=cfg.sample_rate
        ).to(device)
        weights = loss_fn.W_local
        batch = cfg.batch
    else:
        loss_fn = ArcFaceLoss(cfg.num_classes, cfg.dim).to(device)
        weights = loss_fn.W
        batch = cfg.batch * cfg.world_size
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
    x = torch.randn(batch, cfg.dim, device=device, requires_grad=True)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    elapsed = 0.0
    for step in range(cfg.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        if sharded:
            dist.barrier()
        start = time.perf_counter()
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
        if step > 0:
            elapsed += time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib() - base
    w_bytes = 2 * weights.numel() * weights.element_size() / 2**20
    queue.put((rank, peak, w_bytes, elapsed, float(loss.detach())))
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
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"{cfg}: workers exited with {[p.exitcode for p in procs]}")
    results = [queue.get() for _ in range(n)]
    global_batch = cfg.batch * cfg.world_size
    return {
        "peak_mib": max(r[1] for r in results),
        "w_mib": max(r[2] for r in results),
        "samples_per_s": global_batch * cfg.steps / max(r[3] for r in results),
        "loss": results[0][4],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="embeddings per rank")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--sample-rate", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.dim, args.batch, args.steps = [2_000], 16, 4, 1
    if args.backend == "nccl" and torch.cuda.device_count() < args.world_size:
        parser.error(f"nccl needs {args.world_size} GPUs, found {torch.cuda.device_count()}")
    memory = "peak CUDA MiB" if args.backend == "nccl" else "peak RSS growth MiB"
    print(
        f"backend={args.backend} world_size={args.world_size} D={args.dim} "
        f"batch/rank={args.batch} steps={args.steps} threads={os.cpu_count()}\n"
    )
    print(f"| C | variant | {memory} (per rank) | W+grad MiB (per rank) | samples/s |")
    print("|---|---|---|---|---|")
    for c in args.classes:
        variants = [("unsharded", None)] + [
            (f"sharded x{args.world_size}, sample_rate={r:g}", r) for r in args.sample_rate
        ]
        for name, rate in variants:
            cfg = Config(c, args.dim, args.batch, args.world_size, rate, args.steps, args.backend)
            r = run(cfg)
            print(
                f"| {c:,} | {name} | {r['peak_mib']:.0f} | {r['w_mib']:.0f} "
                f"| {r['samples_per_s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
