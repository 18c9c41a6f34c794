"""``pml-margins ablate``: the seeds' ablations on the glyph benchmark.

Each sweep (:mod:`pml_margins.bench.sweeps`) trains the glyph model once per point
and seed, with the ``bench`` defaults except the swept hyper-parameter, and writes
``<out>/<sweep>.json``, ``<sweep>.md`` (a table) and ``<sweep>.png`` (Recall@1 and
MAP@R against the parameter, ± std over seeds with ``--repeats``).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

from pml_margins.cli import check_out_folder, check_seed
from pml_margins.threads import thread_count_problem

__all__ = ["register", "run_ablate"]


def register(subparsers: Any) -> None:
    from pml_margins.bench.sweeps import SWEEPS

    p = subparsers.add_parser(
        "ablate",
        help="the seeds' ablations (margin, scale, normalization, warm-up) on the glyph set",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sweep",
        action="append",
        choices=(*SWEEPS, "all"),
        help="repeatable; default: all",
    )
    p.add_argument("--epochs", type=int, help="default: the glyph bench default")
    p.add_argument("--repeats", type=int, default=1, help="seeds per point (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the glyph bench's)")
    p.add_argument("--out", default="out/ablate", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_ablate)


def run_ablate(args: argparse.Namespace) -> int:
    """The ``ablate`` command; returns the exit status."""
    from pml_margins.bench import train
    from pml_margins.bench.sweeps import SWEEPS

    names = list(SWEEPS) if not args.sweep or "all" in args.sweep else list(args.sweep)
    for flag in ("epochs", "repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{flag} must be >= 1, got {value}")
    if args.threads is not None and (problem := thread_count_problem(args.threads)):
        raise SystemExit(f"error: --threads {problem}")
    try:  # before the glyph set is rendered
        check_seed(args.seed, args.repeats)
        outputs = [f"{name}{suffix}" for name in names for suffix in (".json", ".md", ".png")]
        check_out_folder(args.out, files=outputs)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    from pml_margins.bench.datasets import DATASETS

    threads = DATASETS["glyphs"].defaults["threads"] if args.threads is None else args.threads
    with train.torch_threads(threads):
        return _run(args, [SWEEPS[n] for n in dict.fromkeys(names)])


def _bench_args(args: argparse.Namespace) -> argparse.Namespace:
    """The ``bench`` settings of the glyph dataset, with this command's overrides (what
    the sweeps' JSON records as their settings)."""
    from pml_margins.bench.datasets import DATASETS

    defaults = dict(DATASETS["glyphs"].defaults, repeats=args.repeats)
    for flag in ("epochs", "threads"):
        if getattr(args, flag) is not None:
            defaults[flag] = getattr(args, flag)
    return argparse.Namespace(
        dataset="glyphs", device="cpu", amp=None, num_workers=0, image_size=None, min_fonts=12,
        no_progress=args.no_progress, **defaults,
    )  # fmt: skip


def _run(args: argparse.Namespace, sweeps: list[Any]) -> int:
    from pml_margins.bench import cli_bench, datasets, report, sweep_report, train
    from pml_margins.bench.sweeps import margin_warmup

    bench_args = _bench_args(args)
    settings = {k: getattr(bench_args, k) for k in cli_bench.SETTINGS}
    data = datasets.load_dataset("glyphs", bench_args)
    os.makedirs(args.out, exist_ok=True)
    for sweep in sweeps:
        start = time.perf_counter()
        rows = []
        for point in sweep.points:
            runs = []
            for repeat in range(args.repeats):
                cfg = train.TrainConfig(
                    epochs=settings["epochs"],
                    batch_size=settings["batch_size"],
                    lr=settings["lr"],
                    seed=args.seed + repeat,
                    progress=not args.no_progress,
                    shift=settings["shift"],
                )
                schedule = margin_warmup() if point.warmup else None
                run, _, setup, _ = cli_bench._train_one(
                    point.loss, bench_args, data, settings, cfg, point.overrides, schedule
                )
                runs.append(run)
            rows.append(sweep_report.summarize_point(point, setup.hyperparameters, runs))
            if not args.no_progress:
                print(f"{sweep.name}: {point.series} {point.x}: {sweep_report.row_text(rows[-1])}")
        result = {
            "sweep": sweep.name,
            "parameter": sweep.parameter,
            "claim": sweep.claim,
            "categorical": sweep.categorical,
            "dataset": "glyphs",
            "train_classes": data.num_train_classes,
            "settings": settings,
            "seeds": [args.seed + r for r in range(args.repeats)],
            "cosface_scale_lower_bound": _scale_bound(data.num_train_classes),
            "environment": report.environment(),
            "points": rows,
            "total_seconds": round(time.perf_counter() - start, 1),
        }
        base = os.path.join(args.out, sweep.name)
        report.write_json(result, base + ".json")
        with open(base + ".md", "w") as f:
            f.write(sweep_report.markdown(result))
        sweep_report.save_plot(result, base + ".png")
        print(f"wrote {base}.json, .md, .png ({result['total_seconds']:.0f} s)")
    return 0


def _scale_bound(num_classes: int) -> float:
    from pml_margins.functional import cosface_scale_lower_bound

    bound = cosface_scale_lower_bound(num_classes, 0.99)
    return round(bound, 2) if math.isfinite(bound) else bound
