"""Benchmark: pml_margins CircleLoss vs PML's CircleLoss, forward + backward.

Runs the two implementations interleaved (A B, B A, ...: each goes first every other
round) on the same inputs and reports the median time of each, their ratio, and the value
difference of the same run. Sizes: B = 256, 1024, 4096 with D = 512, labels only and with
``MultiSimilarityMiner`` (mining is done once, outside the timed region).

Usage::

    PYTHONPATH=. python3 benchmarks/circle.py            # full table
    PYTHONPATH=. python3 benchmarks/circle.py --quick    # small sizes, seconds
    PYTHONPATH=. python3 benchmarks/circle.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from pml_margins.losses import CircleLoss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(loss_fn: torch.nn.Module, x: torch.Tensor, *args: object) -> Callable[[], float]:
    def run() -> float:
        emb = x.detach().requires_grad_(True)
        _sync(x.device)
        start = time.perf_counter()
        loss = loss_fn(emb, *args)
        loss.backward()
        _sync(x.device)
        return time.perf_counter() - start

    return run


def bench(
    batch: int, dim: int, mined: bool, repeats: int, classes: int, device: str = "cpu"
) -> dict[str, float]:
    """Median fwd+bwd seconds of ours and PML's, interleaved, and the value difference."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, dim, generator=gen).to(device)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
    args: tuple[object, ...] = (labels,)
    if mined:
        args = (labels, pml_miners.MultiSimilarityMiner(epsilon=0.1)(x, labels))
    ours, theirs = CircleLoss(m=0.25, gamma=256), pml_losses.CircleLoss(m=0.25, gamma=256)
    value_ours, value_theirs = ours(x, *args).item(), theirs(x, *args).item()
    run_ours, run_theirs = _fwd_bwd(ours, x, *args), _fwd_bwd(theirs, x, *args)
    run_ours(), run_theirs()  # warm-up
    t_ours, t_theirs = [], []
    for i in range(repeats):  # each side first every other round: neither always follows
        if i % 2:  # the other's step (whose buffers and caches it would inherit)
            t_theirs.append(run_theirs())
            t_ours.append(run_ours())
        else:
            t_ours.append(run_ours())
            t_theirs.append(run_theirs())
    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    return {
        "ours_ms": 1e3 * med_ours,
        "pml_ms": 1e3 * med_theirs,
        "speedup": med_theirs / med_ours,
        "abs_diff": abs(value_ours - value_theirs),
        "value": value_ours,
        "pml_value": value_theirs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="batch sizes")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ((64, 256) if args.quick else (256, 1024, 4096))
    repeats = args.repeats or (5 if args.quick else 9)
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"D={args.dim}"
    )
    header = f"{'B':>5} {'pairs':>8} {'ours ms':>9} {'PML ms':>9} {'speedup':>8} {'|diff|':>9}"
    print(f"{header} {'ours loss':>12} {'PML loss':>12}")
    for batch in sizes:
        for mined in (False, True):
            r = bench(batch, args.dim, mined, repeats, max(batch // 4, 2), args.device)
            kind = "MS-miner" if mined else "labels"
            print(
                f"{batch:>5} {kind:>8} {r['ours_ms']:>9.2f} {r['pml_ms']:>9.2f} "
                f"{r['speedup']:>7.2f}x {r['abs_diff']:>9.2e} "
                f"{r['value']:>12.6f} {r['pml_value']:>12.6f}"
            )


if __name__ == "__main__":
    main()
