"""``pml-margins bench``: train one embedding model per loss, evaluate retrieval on unseen classes.

Default (no download, ~1-2 min on 2 CPU cores): scikit-learn's 8x8 digits, train on
digits 0-4, retrieve among digits 5-9. ``--dataset cub|sop --data-root DIR`` uses
CUB-200-2011 / Stanford Online Products through PML's dataset classes.

Writes into ``--out``: ``results.json``, ``results.md`` (the table printed),
``recall.png`` and ``checkpoints/<loss>.pt`` (re-evaluated by ``--embeddings-only``).
"""

from __future__ import annotations

import argparse
import ast
import glob
import os
import time
from typing import Any

import torch

__all__ = ["register", "run_bench"]

DIGITS_DEFAULTS = {"epochs": 10, "embedding_size": 64, "batch_size": 128, "lr": 1e-3, "repeats": 5}
IMAGE_DEFAULTS = {"epochs": 20, "embedding_size": 512, "batch_size": 64, "lr": 1e-4, "repeats": 1}


def register(subparsers: Any) -> None:
    from pml_margins.bench.registry import DEFAULT_LOSSES, loss_names

    p = subparsers.add_parser(
        "bench",
        help="retrieval benchmark: train with each loss, evaluate Recall@K on held-out classes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", choices=("digits", "cub", "sop"), default="digits")
    p.add_argument("--data-root", help="folder holding CUB_200_2011/ or Stanford_Online_Products/")
    p.add_argument("--download", action="store_true", help="let PML download CUB/SOP into it")
    p.add_argument(
        "--losses",
        default=",".join(DEFAULT_LOSSES),
        help=f"comma-separated, from: {', '.join(loss_names())} (default: %(default)s)",
    )
    p.add_argument(
        "--loss-arg",
        action="append",
        default=[],
        metavar="LOSS.KEY=VALUE",
        help="override a loss hyper-parameter, e.g. arcface.margin=0.3 (repeatable)",
    )
    p.add_argument("--epochs", type=int, help="default: 10 (digits), 20 (cub/sop)")
    p.add_argument("--batch-size", type=int, help="default: 128 (digits), 64 (cub/sop)")
    p.add_argument("--embedding-size", type=int, help="default: 64 (digits), 512 (cub/sop)")
    p.add_argument("--lr", type=float, help="model learning rate; default 1e-3 / 1e-4")
    p.add_argument("--loss-lr", type=float, default=1e-2, help="class-weight learning rate")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument(
        "--repeats",
        type=int,
        help="seeds per loss (seed, seed+1, ...): the table shows mean ± std; "
        "default 5 (digits), 1 (cub/sop)",
    )
    p.add_argument("--train-classes", default="0,1,2,3,4", help="digits used for training")
    p.add_argument("--backbone", default="resnet50", help="cub/sop: timm/torchvision model")
    p.add_argument("--weights", help="cub/sop: local state dict of pretrained backbone weights")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads; default 1 for digits (tiny matrices: more threads only "
        "add contention, ~10x slower on a busy 2-core machine), torch's default otherwise",
    )
    p.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (autocast)")
    p.add_argument("--out", default="out/bench", help="output folder (default: %(default)s)")
    p.add_argument(
        "--embeddings-only",
        action="store_true",
        help="no training: evaluate saved checkpoints (--checkpoint, default <out>/checkpoints)",
    )
    p.add_argument("--checkpoint", action="append", default=[], help="a saved .pt (repeatable)")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="digits: skip the 'raw pixels' row (retrieval on the 64 input pixels, no training)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    p.set_defaults(func=run_bench)


def _parse_loss_args(items: list[str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, field = key.partition(".")
        if not (sep and dot and name and field):
            raise SystemExit(f"--loss-arg expects LOSS.KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        overrides.setdefault(name, {})[field] = value
    return overrides


def _load_data(args: argparse.Namespace) -> Any:
    from pml_margins.bench import data

    if args.dataset == "digits":
        classes = [int(c) for c in args.train_classes.split(",") if c.strip()]
        return data.load_digits_split(classes)
    if not args.data_root:
        raise SystemExit(f"--dataset {args.dataset} needs --data-root DIR")
    try:
        return data.load_image_dataset(
            args.dataset, args.data_root, download=args.download, image_size=args.image_size
        )
    except data.DatasetFolderError as err:
        raise SystemExit(f"error: {err}") from err


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    defaults = DIGITS_DEFAULTS if args.dataset == "digits" else IMAGE_DEFAULTS
    settings = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in defaults.items()}
    for key, value in settings.items():
        if key != "lr" and value < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    return settings


def _model_config(args: argparse.Namespace, bench_data: Any, embedding_size: int) -> dict:
    from pml_margins.bench.models import model_config

    if args.dataset == "digits":
        n_in = 1
        for s in bench_data.input_shape:
            n_in *= s
        return model_config("mlp", embedding_size, in_features=n_in, hidden=[256, 256])
    return model_config(args.backbone, embedding_size, weights_path=args.weights)


def _finish(results: dict[str, Any], out: str) -> None:
    from pml_margins.bench import report

    table = report.markdown_table(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    report.write_json(results, os.path.join(out, "results.json"))
    report.plot_recall(results, os.path.join(out, "recall.png"))
    print(table, end="")
    print(f"\nwrote {out}/results.json, results.md, recall.png")


def run_bench(args: argparse.Namespace) -> int:
    """The ``bench`` command; returns the exit status."""
    from pml_margins.bench import train

    with train.torch_threads(args.threads or (1 if args.dataset == "digits" else None)):
        return _run_bench(args)


def _run_bench(args: argparse.Namespace) -> int:
    from pml_margins.bench import registry, report, train

    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    bench_data = _load_data(args)
    settings = _settings(args)
    results: dict[str, Any] = {
        "dataset": bench_data.name,
        "recall_ks": list(bench_data.recall_ks),
        "protocol": (
            f"train on {bench_data.num_train_classes} classes, retrieve among "
            f"{len(bench_data.test)} images of the other classes (each image a query)"
        ),
        "config": {k: v for k, v in vars(args).items() if k != "func"} | settings,
        "environment": report.environment(),
        "losses": [],
    }
    if args.embeddings_only:
        return _evaluate_checkpoints(args, bench_data, results, start)

    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    overrides = _parse_loss_args(args.loss_arg)
    unknown = sorted(set(names) - set(registry.LOSSES)) + sorted(set(overrides) - set(names))
    if unknown:
        raise SystemExit(f"unknown or unused loss names: {', '.join(unknown)}")
    cfg = train.TrainConfig(
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        loss_lr=args.loss_lr,
        device=args.device,
        amp=args.amp,
        seed=args.seed,
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    checkpoints = os.path.join(args.out, "checkpoints")
    os.makedirs(checkpoints, exist_ok=True)
    for name in names:
        runs = []
        for repeat in range(settings["repeats"]):
            cfg.seed = args.seed + repeat
            run, model, setup, config = _train_one(
                name, args, bench_data, settings, cfg, overrides.get(name, {})
            )
            runs.append(run)
            if repeat == 0:  # the checkpoint is the first seed's model
                torch.save(
                    {
                        "model_config": config,
                        "model_state": model.cpu().state_dict(),
                        "loss_state": setup.loss.cpu().state_dict(),
                        "dataset": bench_data.name,
                        "name": name,
                        "label": setup.label,
                        "hyperparameters": setup.hyperparameters,
                        "train_seconds": run["train_seconds"],
                        "seed": args.seed,
                    },
                    os.path.join(checkpoints, f"{name}.pt"),
                )
        results["losses"].append(_summarize(name, setup, runs))
    if bench_data.name == "digits" and not args.no_baseline:
        results["losses"].append(_pixel_baseline(bench_data))
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    _finish(results, args.out)
    return 0


def _train_one(
    name: str,
    args: argparse.Namespace,
    bench_data: Any,
    settings: dict[str, Any],
    cfg: Any,
    overrides: dict[str, Any],
) -> tuple[dict[str, Any], torch.nn.Module, Any, dict[str, Any]]:
    """Train and evaluate one (loss, seed); returns the run's record, model, setup, config."""
    from pml_margins.bench import evaluate, models, registry, train

    train.seed_everything(cfg.seed)
    config = _model_config(args, bench_data, settings["embedding_size"])
    model, description = models.build_model(config)
    setup = registry.build_loss(
        name, bench_data.num_train_classes, settings["embedding_size"], **overrides
    )
    run = train.train_embedding(model, setup, bench_data.train, cfg)
    emb, labels = train.embed(
        model,
        bench_data.test,
        device=args.device,
        amp=args.amp,
        num_workers=args.num_workers,
        keep_on_device=True,
    )
    record = {
        "seed": cfg.seed,
        "model": description,
        "train_seconds": round(run.seconds, 2),
        "steps": run.steps,
        "final_train_loss": run.epoch_losses[-1],
        "metrics": evaluate.evaluate_retrieval(emb, labels, bench_data.recall_ks),
    }
    return record, model, setup, config


def _summarize(name: str, setup: Any, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: metrics averaged over the seeds (std when more than one), runs kept."""
    keys = runs[0]["metrics"].keys()
    values = {k: torch.tensor([r["metrics"][k] for r in runs], dtype=torch.float64) for k in keys}
    entry = {
        "name": name,
        "label": setup.label,
        "model": runs[0]["model"],
        "hyperparameters": setup.hyperparameters,
        "seeds": [r["seed"] for r in runs],
        "train_seconds": round(sum(r["train_seconds"] for r in runs) / len(runs), 2),
        "steps": runs[0]["steps"],
        "metrics": {k: float(v.mean()) for k, v in values.items()},
        "runs": runs,
    }
    if len(runs) > 1:
        entry["metrics_std"] = {k: float(v.std()) for k, v in values.items()}
    return entry


def _pixel_baseline(bench_data: Any) -> dict[str, Any]:
    """Retrieval on the raw input pixels (cosine), the reference a learned embedding must beat."""
    from pml_margins.bench import evaluate

    inputs, labels = bench_data.test.tensors
    return {
        "name": "pixels",
        "label": "Raw pixels (no training)",
        "model": "identity on the flattened input",
        "hyperparameters": {},
        "train_seconds": 0.0,
        "steps": 0,
        "metrics": evaluate.evaluate_retrieval(inputs.flatten(1), labels, bench_data.recall_ks),
    }


def _evaluate_checkpoints(
    args: argparse.Namespace, bench_data: Any, results: dict[str, Any], start: float
) -> int:
    from pml_margins.bench import evaluate, models, train

    paths = args.checkpoint or sorted(glob.glob(os.path.join(args.out, "checkpoints", "*.pt")))
    if not paths:
        raise SystemExit(
            f"--embeddings-only: no checkpoints given and none in {args.out}/checkpoints"
        )
    for path in paths:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("dataset") != bench_data.name:
            raise SystemExit(
                f"{path} was trained on {saved.get('dataset')!r}, not --dataset {bench_data.name}"
            )
        # the checkpoint holds every weight: no pretrained weights to load first
        model, description = models.build_model({**saved["model_config"], "weights_path": None})
        model.load_state_dict(saved["model_state"])
        emb, labels = train.embed(
            model,
            bench_data.test,
            device=args.device,
            amp=args.amp,
            num_workers=args.num_workers,
            keep_on_device=True,
        )
        results["losses"].append(
            {
                "name": saved["name"],
                "label": saved["label"],
                "model": description,
                "checkpoint": path,
                "hyperparameters": saved.get("hyperparameters", {}),
                "train_seconds": saved.get("train_seconds"),
                "metrics": evaluate.evaluate_retrieval(emb, labels, bench_data.recall_ks),
            }
        )
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    _finish(results, args.out)
    return 0
