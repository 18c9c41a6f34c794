"""Where the time goes: torch.profiler tables of a loss step and of the calculator.

Profiles, on ``--device`` (``cpu`` or ``cuda``):

* ``loss``: ``--steps`` forward + backward steps of our ArcFace at ``--loss-size``
  (``B x D x C``, default the loss benchmark's 256 x 512 x 10k),
* ``calculator``: one ``RetrievalAccuracyCalculator.get_accuracy`` (P@1, R-Precision,
  MAP@R) on ``--eval-size`` clustered embeddings (``N x D x classes``, default SOP's
  test size), with ``k="max_bin_count"`` and, at ``--whole-list-size``, PML's default
  ``k=None`` with the whole list's MAP as well (the whole-list path; those three alone
  read no deeper than the largest class, whatever ``k``),

and prints for each the ops with the largest self time on the host and, on CUDA, on the
device (with call counts: on a GPU a step is often bound by launches, not arithmetic).
The figures name the hot spots for the next change; the timings of record come from
``losses.py`` and ``accuracy.py``.

    PYTHONPATH=. python3 benchmarks/profile_steps.py --device cuda
    PYTHONPATH=. python3 benchmarks/profile_steps.py --quick     # small sizes, smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from accuracy import clustered, metrics_for, sync  # this folder's calculator benchmark
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.losses import ArcFaceLoss


def _size(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected AxBxC with positive integers, got {text!r}")
    return parts  # type: ignore[return-value]


def _table(prof: profile, device: str, rows: int) -> str:
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=rows)]
    if device == "cuda":
        tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=rows))
    return "\n".join(tables)


def _activities(device: str) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])


def profile_loss(size: tuple[int, int, int], steps: int, device: str, rows: int) -> str:
    batch, dim, classes = size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
    loss_fn = ArcFaceLoss(classes, dim).to(device)

    def step() -> None:  # fresh gradients each step, as benchmarks/losses.py times it
        x.grad = loss_fn.W.grad = None
        loss_fn(x, labels).backward()

    for _ in range(2):  # warm: allocator, kernels
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    ms = 1e3 * (time.perf_counter() - start) / steps
    with profile(activities=_activities(device)) as prof:
        for _ in range(steps):
            step()
        sync(device)
    head = f"## loss: ArcFace {batch}x{dim}x{classes} on {device}: {ms:.2f} ms/step"
    return head + "\n" + _table(prof, device, rows)


def profile_calculator(size: tuple[int, int, int], k: str | None, device: str, rows: int) -> str:
    n, dim, classes = size
    x, y = (torch.from_numpy(a).to(device) for a in clustered(n, dim, classes))
    # metrics_for: at k=None it adds the whole list's MAP, without which the calculator
    # cuts k to the largest class (P@1, R-Precision and MAP@R read no deeper)
    calc = RetrievalAccuracyCalculator(include=metrics_for(k), k=k)
    calc.get_accuracy(x[: min(n, 512)], y[: min(n, 512)])  # warm
    sync(device)
    start = time.perf_counter()
    calc.get_accuracy(x, y)
    sync(device)
    seconds = time.perf_counter() - start
    with profile(activities=_activities(device)) as prof:
        calc.get_accuracy(x, y)
        sync(device)
    head = f"## calculator: {n}x{dim}, {classes} classes, k={k!r} on {device}: {seconds:.2f} s"
    return head + "\n" + _table(prof, device, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--loss-size", type=_size, default=(256, 512, 10_000))
    parser.add_argument("--eval-size", type=_size, default=(60_502, 512, 11_316))
    parser.add_argument("--whole-list-size", type=_size, default=(5_924, 512, 100))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25, help="ops per table")
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.quick:
        args.loss_size, args.eval_size, args.whole_list_size = (
            (32, 16, 200),
            (600, 16, 40),
            (300, 16, 20),
        )
        args.steps = 2
    print(profile_loss(args.loss_size, args.steps, args.device, args.rows), flush=True)
    print(profile_calculator(args.eval_size, "max_bin_count", args.device, args.rows), flush=True)
    print(profile_calculator(args.whole_list_size, None, args.device, args.rows), flush=True)


if __name__ == "__main__":
    main()
