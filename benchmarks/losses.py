"""Speed and memory of our class-weight losses against PML's and the matrix-product floor.

For ArcFace, CosFace, SphereFace and NSL (and, with ``--losses``, Sub-center ArcFace
ElasticFace-Arc, dynamic AdaCos, MagFace, AdaFace and CurricularFace) at each (B, D, C), times
one forward + backward of

* ``ours``: pml_margins' loss, default mode (the dense function on materialized logits
  for small problems: ``MATERIALIZE_MAX_ELEMENTS``, ``DENSE_MAX_ELEMENTS``; on an
  accelerator up to 2^26 logits; else the blocked function with one saved (B, C) buffer),
* ``ours-unchecked``: the same under ``pml_margins.value_checks(False)`` (the
  difference is the cost of the input checks),
* ``ours-bounded``: the same with ``chunk_size="auto"`` (no (B, C) tensor),
* ``ours-sampled``: with ``--sample-rate R < 1``, the same with Partial FC's
  ``sample_rate=R`` (another loss: its ``|d| PML`` is not shown),
* ``plain``: a plain torch implementation, as a user would write it (normalize,
  matmul, gather the target cosine, margin, scatter, scale, cross-entropy),
* ``pml``: pytorch-metric-learning's loss with the same hyper-parameters and ``W``
  (not for ElasticFace, AdaCos, MagFace, AdaFace and CurricularFace, which PML lacks, nor
  their ``plain`` rows),
* ``floor``: the three matrix products of that size (x W, G W^T, x^T G); for
  Sub-center ArcFace its own floor with ``K`` times the columns (row ``floor``, loss
  ``subcenter``),

interleaved so that a noisy, shared machine slows all alike, each round in its own
random order (``--order shuffle``, seeded; ``--order rotate``: A B C, B C A, C A B,
...): on this box the case timed right after PML's step ran 170-340 us slower at 256 x
512 x 100 (whichever case it was), which a fixed order charged to ``ours`` every round,
and a rotated one still gives each case the same predecessor (``ours`` timed after the
floor or PML, ``ours-unchecked`` after ``ours``: 30-230 us apart at 64-256 x 128-512 x
100, where the same two steps alternated in one loop differ by under 3 us). Reports
medians; ``paired`` is the median over rounds of each round's time over that round's
floor (the machine's load drifts between rounds more than within one). Each timed step
follows an untimed step of the same case (``--warm-steps``, default 1), as in a training
loop, where one loss runs step after step: without it, a case timed right after another
case's large buffers may pay the allocator's page faults for them (``ours``, timed first
of each loss, was 1-7 ms slower than ``ours-unchecked`` at 10k classes, while the checks
themselves cost 0.05 ms).
Before timing, the loss values of ``ours``, ``plain`` and ``pml``
on the same inputs and ``W`` are compared: the ``|d| PML`` column is the absolute
difference of the row's value from PML's, in the run's dtype (``--dtype bf16``/``fp16``:
both under the same autocast, so it shows the half dtype's rounding). Peak activation
memory of one step is measured with
``torch.profiler(profile_memory=True)`` on CPU or ``torch.cuda.max_memory_allocated``
on CUDA; W's gradient (D x C) is subtracted, so the column reads "memory beyond
W and its gradient".

Usage::

    python3 benchmarks/losses.py                      # full CPU run (slow: minutes)
    python3 benchmarks/losses.py --quick              # small sizes, smoke test
    python3 benchmarks/losses.py --small              # C = 100 and 1,000 rows only
    python3 benchmarks/losses.py --device cuda --dtype bf16
    python3 benchmarks/losses.py --sizes 512x512x100000 --losses arcface --repeats 5
    python3 benchmarks/losses.py --sizes 256x512x10000 --losses arcface,subcenter
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_metric_learning.losses as pml
import torch.nn.functional as F

import pml_margins
import pml_margins.losses as ours
from pml_margins.functional import sphereface_psi

#: the common case (CUB trains on 100 classes, the glyph set on ~1,200)
SMALL_SIZES = [
    (batch, dim, classes) for classes in (100, 1_000) for batch in (64, 256) for dim in (128, 512)
]
FULL_SIZES = [*SMALL_SIZES, (256, 512, 10_000), (512, 512, 100_000), (512, 512, 1_000_000)]
QUICK_SIZES = [(64, 128, 100), (64, 64, 2_000), (128, 64, 20_000), (128, 64, 100_000)]
#: hyper-parameters shared by every implementation
ARC_MARGIN, COS_MARGIN, SCALE, NSL_SCALE = 0.5, 0.35, 64.0, 30.0
#: default mode and PML only up to this many classes (bounded mode beyond)
DEFAULT_MAX_CLASSES = 100_000
LOSSES = ("arcface", "cosface", "sphereface", "nsl")
#: losses run only when named in --losses
EXTRA_LOSSES = ("subcenter", "elasticface", "adacos", "magface", "adaface", "curricularface")
#: losses with neither a PML nor a plain-torch counterpart here
OURS_ONLY_LOSSES = ("elasticface", "adacos", "magface", "adaface", "curricularface")
#: ElasticFace-Arc's margin standard deviation (the paper's, radians)
ELASTIC_SIGMA = 0.05
#: sub-centres per class of Sub-center ArcFace (the paper's K)
SUB_CENTERS = 3
#: columns of W per class, where not 1
COLUMNS_PER_CLASS = {"subcenter": SUB_CENTERS}


class PlainTorchLoss(torch.nn.Module):
    """A plain torch margin softmax, as written by hand: the baseline for small problems."""

    def __init__(self, name: str, num_classes: int, dim: int) -> None:
        super().__init__()
        self.name = name
        per_class = COLUMNS_PER_CLASS.get(name, 1)
        self.W = torch.nn.Parameter(torch.empty(dim, num_classes * per_class).normal_())

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.W, dim=0)
        cos = F.normalize(x, dim=1) @ w
        if self.name == "subcenter":
            cos = cos.unflatten(1, (-1, SUB_CENTERS)).max(dim=2).values
        target = cos.gather(1, labels.unsqueeze(1))
        if self.name in ("arcface", "subcenter"):
            sin = torch.sqrt((1 - target * target).clamp_min(0))
            margined = target * math.cos(ARC_MARGIN) - sin * math.sin(ARC_MARGIN)
            beyond = target - ARC_MARGIN * math.sin(ARC_MARGIN)  # theta + m > pi
            target = torch.where(target > math.cos(math.pi - ARC_MARGIN), margined, beyond)
        elif self.name == "cosface":
            target = target - COS_MARGIN
        elif self.name == "sphereface":
            target = sphereface_psi(target, 4)
        if self.name == "sphereface":  # (the norms only where they are the scale)
            scale = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        else:
            scale = NSL_SCALE if self.name == "nsl" else SCALE
        logits = cos.scatter(1, labels.unsqueeze(1), target) * scale
        return F.cross_entropy(logits, labels)


def make_loss(
    name: str, impl: str, num_classes: int, dim: int, sample_rate: float = 1.0
) -> torch.nn.Module:
    """Same hyper-parameters on every side (PML's ArcFace margin is in degrees);
    ``sample_rate``: Partial FC's, for ``ours-sampled``."""
    if impl == "plain":
        return PlainTorchLoss(name, num_classes, dim)
    if impl == "pml":
        return {
            "arcface": lambda: pml.ArcFaceLoss(
                num_classes, dim, margin=math.degrees(ARC_MARGIN), scale=SCALE
            ),
            "cosface": lambda: pml.CosFaceLoss(num_classes, dim, margin=COS_MARGIN, scale=SCALE),
            "sphereface": lambda: pml.SphereFaceLoss(num_classes, dim, margin=4, scale=1),
            "nsl": lambda: pml.NormalizedSoftmaxLoss(num_classes, dim, temperature=1 / NSL_SCALE),
            "subcenter": lambda: pml.SubCenterArcFaceLoss(
                num_classes=num_classes,
                embedding_size=dim,
                margin=math.degrees(ARC_MARGIN),
                scale=SCALE,
                sub_centers=SUB_CENTERS,
            ),
        }[name]()
    kwargs: dict = {"chunk_size": "auto"} if impl == "ours-bounded" else {}
    if impl == "ours-sampled":
        kwargs = {"sample_rate": sample_rate}
    return {
        "arcface": lambda: ours.ArcFaceLoss(
            num_classes, dim, margin=ARC_MARGIN, scale=SCALE, **kwargs
        ),
        "cosface": lambda: ours.CosFaceLoss(
            num_classes, dim, margin=COS_MARGIN, scale=SCALE, **kwargs
        ),
        "sphereface": lambda: ours.SphereFaceLoss(num_classes, dim, margin=4, **kwargs),
        "nsl": lambda: ours.NormSoftmaxLoss(num_classes, dim, scale=NSL_SCALE, **kwargs),
        "subcenter": lambda: ours.SubCenterArcFaceLoss(
            num_classes, dim, ARC_MARGIN, SCALE, SUB_CENTERS, **kwargs
        ),
        "elasticface": lambda: ours.ElasticFaceLoss(
            num_classes, dim, ARC_MARGIN, ELASTIC_SIGMA, SCALE, **kwargs
        ),
        "adacos": lambda: ours.AdaCosLoss(num_classes, dim, dynamic=True, **kwargs),
        # the benchmark's features have norms near sqrt(dim): the norm range brackets them
        "magface": lambda: ours.MagFaceLoss(
            num_classes, dim, SCALE, 0.5 * math.sqrt(dim), 2 * math.sqrt(dim), **kwargs
        ),
        # the paper's m, h and t_alpha; its running norm statistics need no norm range
        "adaface": lambda: ours.AdaFaceLoss(num_classes, dim, scale=SCALE, **kwargs),
        "curricularface": lambda: ours.CurricularFaceLoss(
            num_classes, dim, ARC_MARGIN, SCALE, **kwargs
        ),
    }[name]()


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Case:
    """One thing to time: a loss implementation or the floor, with its inputs."""

    def __init__(self, impl: str, loss: str, size: tuple[int, int, int], args) -> None:
        batch, dim, num_classes = size
        self.impl, self.loss_name, self.device, self.dtype = impl, loss, args.device, args.dtype
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, dim, generator=gen).to(args.device).requires_grad_(True)
        self.labels = torch.randint(0, num_classes, (batch,), generator=gen).to(args.device)
        columns = num_classes * COLUMNS_PER_CLASS.get(loss, 1)
        if impl == "floor":
            self.w = torch.randn(dim, columns, generator=gen).to(args.device)
            self.loss = None
            # the products' operands in the autocast dtype, cast once: autocast caches no
            # cast of a tensor that needs no gradient, and would cast W twice and x twice
            # every step, passes that are not the three products
            half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
            self.floor_operands = (
                (self.x.detach().to(half), self.w.to(half)) if half else (self.x.detach(), self.w)
            )
        else:
            rate = getattr(args, "sample_rate", 1.0)
            self.loss = make_loss(loss, impl, num_classes, dim, rate).to(args.device)
            with torch.no_grad():  # one W for every implementation
                gen.manual_seed(1)
                self.loss.W.copy_(torch.randn(dim, columns, generator=gen))
            self.w = self.loss.W

    def value(self) -> float:
        """The loss on this case's inputs (no backward)."""
        with torch.no_grad(), autocast(self.device, self.dtype):
            return float(self.loss(self.x, self.labels))

    def step(self) -> None:
        checks = pml_margins.value_checks(self.impl != "ours-unchecked")
        with autocast(self.device, self.dtype), checks:
            if self.loss is None:  # the floor: forward product and both gradients
                x, w = self.floor_operands
                logits = x @ w
                _ = logits @ w.t()
                _ = x.t() @ logits
                del logits
            else:
                self.loss(self.x, self.labels).backward()
        if self.loss is not None:
            self.loss.W.grad = None
            self.x.grad = None
        sync(self.device)

    def time(self) -> float:
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start


def measure_memory(impl: str, loss: str, size: tuple[int, int, int], args) -> float:
    """Peak activation memory (bytes) of one step, beyond W and its gradient.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: ``torch.profiler`` with
    ``profile_memory=True``: the running sum of its allocation/free records, in
    time order, gives the peak of live tensor bytes (independent of the
    allocator's caching, unlike RSS).
    """
    if impl == "floor":
        return float("nan")
    case = Case(impl, loss, size, args)
    case.step()  # warm-up
    grad_bytes = case.w.numel() * case.w.element_size()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        case.step()
        return torch.cuda.max_memory_allocated() - base - grad_bytes
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        case.step()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        current += record.nbytes()
        peak = max(peak, current)
    return peak - grad_bytes


def run(args) -> list[dict]:
    sizes = QUICK_SIZES if args.quick else (SMALL_SIZES if args.small else FULL_SIZES)
    if args.sizes:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        big = size[2] > args.default_max_classes
        impls = ["ours-bounded"] if big else ["ours", "ours-unchecked", "ours-bounded", "plain"]
        if getattr(args, "sample_rate", 1.0) < 1:
            impls.insert(1 if big else 3, "ours-sampled")
        if not big or args.pml_large:
            impls.append("pml")
        cases = {("floor", "-"): Case("floor", "-", size, args)}
        for loss in args.losses.split(","):
            if loss in COLUMNS_PER_CLASS:  # its own floor: K times the columns
                cases[("floor", loss)] = Case("floor", loss, size, args)
            for impl in impls:
                if not (impl in ("plain", "pml") and loss in OURS_ONLY_LOSSES):
                    cases[(impl, loss)] = Case(impl, loss, size, args)
        loss_values = {k: case.value() for k, case in cases.items() if case.loss is not None}
        for case in cases.values():  # warm-up
            case.step()
        times: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
        keys, order = list(cases), random.Random(0)
        for r in range(args.repeats):  # interleaved, each round in its own order (doc)
            if args.order == "shuffle":
                round_keys = order.sample(keys, len(keys))
            else:  # rotated: A B C, B C A, ...
                round_keys = keys[r % len(keys) :] + keys[: r % len(keys)]
            for key in round_keys:
                case = cases[key]
                for _ in range(args.warm_steps):  # the step before, as in a training loop
                    case.step()
                times[key].append(case.time())
        del cases
        for (impl, loss), values in times.items():
            floor_times = times[("floor", loss if loss in COLUMNS_PER_CLASS else "-")]
            floor = statistics.median(floor_times)
            row = {
                "size": "x".join(map(str, size)),
                "loss": loss,
                "impl": impl,
                "ms": 1e3 * statistics.median(values),
                "floor_ms": 1e3 * floor,
                # each round's time over the same round's floor: the machine's load drifts
                "floor_ratio_paired": statistics.median(
                    v / f for v, f in zip(values, floor_times, strict=True)
                ),
                "mem_MB": float("nan"),
                "value": loss_values.get((impl, loss), float("nan")),
                "pml_gap": abs(loss_values[(impl, loss)] - loss_values[("pml", loss)])
                if ("pml", loss) in loss_values
                and (impl, loss) in loss_values
                and impl != "ours-sampled"  # (another loss: the sampled classes' softmax)
                else float("nan"),
            }
            if not args.no_memory:
                row["mem_MB"] = measure_memory(impl, loss, size, args) / 2**20
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _milliseconds(ms: float) -> str:
    """``ms`` in 9 characters, with three significant digits below 100 (a small problem's
    floor takes tens of microseconds on a fast CPU: never printed as 0.0)."""
    return f"{ms:9.1f}" if ms >= 100 else f"{ms:9.3g}"


def print_table(rows: list[dict], args) -> None:
    print(
        f"device={args.device} dtype={args.dtype} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} repeats={args.repeats} (medians, interleaved)"
    )
    header = (
        f"{'B x D x C':>16} {'loss':>10} {'impl':>12} {'ms':>9} {'x floor':>8} {'paired':>7} "
        f"{'PML/ours':>8} {'act MB':>9} {'mem/PML':>8} {'|d| PML':>9}"
    )
    print(header)
    print("-" * len(header))
    by_key = {(r["size"], r["loss"], r["impl"]): r for r in rows}
    for r in rows:
        pml_row = by_key.get((r["size"], r["loss"], "pml"))
        compared = pml_row and r["impl"] not in ("pml", "floor")
        speedup = pml_row["ms"] / r["ms"] if compared else float("nan")
        mem_ratio = r["mem_MB"] / pml_row["mem_MB"] if compared else float("nan")
        print(
            f"{r['size']:>16} {r['loss']:>10} {r['impl']:>12} {_milliseconds(r['ms'])} "
            f"{r['ms'] / r['floor_ms']:8.2f} {r['floor_ratio_paired']:7.2f} "
            f"{speedup:8.2f} {r['mem_MB']:9.1f} {mem_ratio:8.3f} "
            f"{r['pml_gap']:9.1e}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--small", action="store_true", help="only the C = 100 / 1,000 rows")
    parser.add_argument("--sizes", default="", help="comma-separated BxDxC, e.g. 256x512x10000")
    parser.add_argument(
        "--losses",
        default=",".join(LOSSES),
        help=f"comma-separated, from {', '.join(LOSSES + EXTRA_LOSSES)}",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--order",
        choices=("shuffle", "rotate"),
        default="shuffle",
        help="each round's order of the cases: random (seeded) or rotated by one",
    )
    parser.add_argument(
        "--warm-steps",
        type=int,
        default=1,
        help="untimed steps of the same case before each timed one (0: none)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--default-max-classes", type=int, default=DEFAULT_MAX_CLASSES)
    parser.add_argument("--pml-large", action="store_true", help="also run PML above that")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory column")
    parser.add_argument(
        "--sample-rate",
        type=float,
        default=1.0,
        help="below 1: also time ours with Partial FC at this rate (row ours-sampled)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.sample_rate <= 1:
        parser.error(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    print_table(run(args), args)


if __name__ == "__main__":
    main()
