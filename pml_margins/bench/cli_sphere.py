"""``pml-margins sphere``: the seeds' figure -- how each margin separates classes by angle.

Trains 2-D and 3-D embeddings of all ten digits with each loss (same network, seed
and schedule) and saves one PNG: the held-out images' features on the unit circle
(top row, with the class-weight directions) and on the unit sphere (bottom row).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["SPHERE_LOSSES", "register", "run_sphere"]

#: what the figure shows by default (Center loss is added when available)
SPHERE_LOSSES: tuple[str, ...] = ("softmax", "nsl", "sphereface", "cosface", "arcface", "center")


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
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/sphere.png", help="PNG path (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_sphere)


def run_sphere(args: argparse.Namespace) -> int:
    """The ``sphere`` command; returns the exit status."""
    from pml_margins.bench import train

    with train.torch_threads(args.threads):
        return _run_sphere(args)


def _run_sphere(args: argparse.Namespace) -> int:
    from pml_margins.bench import data, evaluate, models, registry, sphere_plot, train

    digits = data.load_digits_all_classes(seed=args.seed)
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    dims = [int(d) for d in args.dims.split(",") if d.strip()]
    if not names or not dims or any(d not in (2, 3) for d in dims):
        raise SystemExit("--losses must name at least one loss and --dims be 2, 3 or 2,3")
    cfg = train.TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
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
            setup.label = f"{setup.label} ({dim}-D)"
            train.train_embedding(model, setup, digits.train, cfg)
            emb, labels = train.embed(model, digits.test, device=args.device)
            p1 = evaluate.evaluate_retrieval(emb, labels, (1,))["precision_at_1"]
            panels[dim].append(
                sphere_plot.SpherePanel(
                    label=setup.label.rsplit(" (", 1)[0],
                    embeddings=emb.numpy(),
                    labels=labels.numpy(),
                    weights=sphere_plot.class_weight_directions(setup.loss),
                    precision_at_1=p1,
                )
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sphere_plot.plot_sphere_grid(panels.get(2, []), panels.get(3, []), args.out)
    print(f"wrote {args.out}")
    return 0
