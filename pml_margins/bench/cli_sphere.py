"""``pml-margins sphere``: the seeds' figure -- how each margin separates classes by angle.

Trains 2-D and 3-D embeddings of all ten digits with each loss (same network, seed
and schedule) and saves one figure: the held-out images' features on the unit
circle (top row, with the class-weight directions) and on the unit sphere (bottom
row). Prints one line per trained model (P@1 on the held-out images, steps, time).
Bad input: one error line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pml_margins.cli import check_out_folder, check_seed, device_arg
from pml_margins.threads import thread_count_problem

__all__ = ["SPHERE_LOSSES", "SphereError", "register", "run_sphere"]

#: what the figure shows by default (Center loss is added when available)
SPHERE_LOSSES: tuple[str, ...] = ("softmax", "nsl", "sphereface", "cosface", "arcface", "center")


class SphereError(Exception):
    """A bad input: printed as one ``pml-margins sphere: error: ...`` line, exit status 2."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sphere",
        help="train 2-D/3-D digit embeddings per loss and plot them on the circle/sphere",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--losses", default=",".join(SPHERE_LOSSES), help="comma-separated (default: %(default)s)"
    )
    p.add_argument("--dims", default="2,3", help="embedding sizes to plot (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=40, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="data split and training (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument(
        "--out",
        default="out/sphere.png",
        help="figure path; its suffix picks the format (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress output")
    p.set_defaults(func=run_sphere)


def run_sphere(args: argparse.Namespace) -> int:
    """The ``sphere`` command; returns the exit status (2 for bad input)."""
    from pml_margins.bench import train

    try:
        names, dims = _check(args)
        with train.torch_threads(args.threads):
            return _run_sphere(args, names, dims)
    except SphereError as error:
        print(f"pml-margins sphere: error: {error}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """Validate the command line before any training; returns the losses and dimensions."""
    from pml_margins.bench import registry

    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    if not names:
        raise SphereError("--losses names no loss")
    unknown = [n for n in names if n not in registry.LOSSES]
    if unknown:
        raise SphereError(
            f"--losses: unknown {', '.join(unknown)} (choose from {', '.join(registry.LOSSES)})"
        )
    parts = [d.strip() for d in args.dims.split(",") if d.strip()]
    if not parts or any(d not in ("2", "3") for d in parts):
        raise SphereError(f"--dims must be 2, 3 or 2,3, got {args.dims!r}")
    for flag in ("epochs", "batch_size"):
        value = getattr(args, flag)
        if value < 1:
            raise SphereError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if problem := thread_count_problem(args.threads):
        raise SphereError(f"--threads {problem}")
    try:
        device_arg(args.device)  # an unknown name, a device that is not here: as eval's
        check_seed(args.seed)
    except ValueError as error:
        raise SphereError(str(error)) from None
    _check_out(args.out)
    return list(dict.fromkeys(names)), sorted({int(d) for d in parts})


def _check_out(path: str) -> None:
    """The figure can be written there: not a folder, a format matplotlib writes."""
    import shutil

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if os.path.isdir(path) or os.path.basename(path) in ("", ".", ".."):  # names a folder
        what = "is a directory" if os.path.isdir(path) else "names a folder (or nothing)"
        raise SphereError(f"--out {path}: {what}, give a file name such as sphere.png")
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    formats = dict(FigureCanvasAgg(Figure()).get_supported_filetypes())
    tex = matplotlib.rcParams["pgf.texsystem"]
    if shutil.which(tex) is None:  # (PGF is written by a TeX system: a traceback and a
        formats.pop("pgf", None)  # partial file after the whole training)
    if suffix == "pgf" and "pgf" not in formats:
        raise SphereError(f"--out {path}: .pgf needs {tex} (a TeX system), not found here")
    if suffix and suffix not in formats:
        raise SphereError(
            f"--out {path}: matplotlib cannot write .{suffix} (use one of: {', '.join(formats)})"
        )
    try:  # a file in the way, or a folder it cannot write in
        check_out_folder(os.path.dirname(os.path.abspath(path)), f"--out {path}: its folder")
    except ValueError as error:
        raise SphereError(str(error)) from None


def saved_figure_path(out: str) -> str:
    """The file matplotlib's ``savefig(out)`` writes (its own rule): ``out`` when
    ``os.path.splitext`` gives it a format, else ``out`` without trailing dots plus the
    ``savefig.format`` setting's suffix (``.png`` by default: ``dot.`` is ``dot.png``,
    ``.png`` is ``.png.png``)."""
    if os.path.splitext(out)[1][1:]:
        return out
    import matplotlib

    return out.rstrip(".") + "." + matplotlib.rcParams["savefig.format"]


def _run_sphere(args: argparse.Namespace, names: list[str], dims: list[int]) -> int:
    from pml_margins.bench import data, evaluate, models, registry, sphere_plot, train

    digits = data.load_digits_all_classes(seed=args.seed)
    cfg = train.TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if len(digits.train) < args.batch_size:
        raise SphereError(
            f"--batch-size {args.batch_size} is larger than the {len(digits.train)} training images"
        )
    panels: dict[int, list[sphere_plot.SpherePanel]] = {d: [] for d in dims}
    for name in names:
        for dim in dims:
            train.seed_everything(args.seed)
            model, _ = models.build_model(models.model_config("mlp", dim, in_features=64))
            try:
                setup = registry.build_loss(name, 10, dim)
            except ImportError as err:
                print(f"skipping {name}: {err}")
                break
            label, setup.label = setup.label, f"{setup.label} ({dim}-D)"
            try:
                run = train.train_embedding(model, setup, digits.train, cfg)
            except (train.TrainingDiverged, ValueError) as err:  # diverged; --batch-size 1
                raise SphereError(str(err)) from None
            emb, labels = train.embed(model, digits.test, device=args.device)
            if problem := train.diverged_embeddings(emb, setup.label):
                raise SphereError(problem)
            p1 = evaluate.evaluate_retrieval(emb, labels, (1,))["precision_at_1"]
            print(
                f"{setup.label}: P@1 {100 * p1:.1f}%, {run.steps} steps, {run.seconds:.1f} s",
                flush=True,
            )
            panels[dim].append(
                sphere_plot.SpherePanel(
                    label=label,
                    embeddings=emb.numpy(),
                    labels=labels.numpy(),
                    weights=sphere_plot.class_weight_directions(setup.loss),
                    sub_centers=sphere_plot.sub_centers_of(setup.loss),
                    precision_at_1=p1,
                )
            )
    if not any(panels.values()):
        raise SphereError("no loss could be trained, nothing to plot")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sphere_plot.plot_sphere_grid(panels.get(2, []), panels.get(3, []), args.out)
    print(f"wrote {saved_figure_path(args.out)}")
    return 0
