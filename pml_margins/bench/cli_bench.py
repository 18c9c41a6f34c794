"""``pml-margins bench``: train one embedding model per loss, evaluate retrieval on unseen classes.

Default (no download, a few minutes on 2 CPU cores): the glyph set -- characters
drawn in matplotlib's fonts, one class per character; train on half of the
characters, retrieve among the images of the other half. ``--dataset digits``
is scikit-learn's 8x8 digits; ``--dataset cub|sop --data-root DIR`` uses
CUB-200-2011 / Stanford Online Products through PML's dataset classes.

Writes into ``--out``: ``results.json``, ``results.md`` (the table printed),
``recall.png`` and ``checkpoints/<loss>.pt``; ``--embeddings-only`` re-evaluates the
checkpoints into ``reevaluated.json``, ``reevaluated.md`` and ``reevaluated.png``
beside them (the training run's files, with their mean over seeds, stay). A training
run keeps its checkpoints aside until its results are written and then replaces
``checkpoints/`` with them (through a symlink, its target) and removes the previous
run's ``reevaluated.*``: the folder's files always come from one run (a failed or
interrupted run leaves the previous run's set as it was).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import glob
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch

from pml_margins.cli import check_out_folder, check_seed, device_arg
from pml_margins.threads import thread_count_problem
from pml_margins.torch_files import not_written_by_torch_save

__all__ = ["register", "run_bench"]

#: settings a dataset gives defaults for (see :class:`pml_margins.bench.datasets.DatasetSpec`)
SETTINGS: tuple[str, ...] = (
    "epochs",
    "embedding_size",
    "batch_size",
    "lr",
    "repeats",
    "threads",
    "shift",
)


def register(subparsers: Any) -> None:
    from pml_margins.bench.datasets import DATASETS, DEFAULT_DATASET
    from pml_margins.bench.registry import DEFAULT_LOSSES, loss_names

    def per_dataset(key: str) -> str:
        return "default: " + ", ".join(
            f"{spec.defaults[key]} ({name})" for name, spec in DATASETS.items()
        )

    p = subparsers.add_parser(
        "bench",
        help="retrieval benchmark: train with each loss, evaluate Recall@K on held-out classes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        choices=tuple(DATASETS),
        default=DEFAULT_DATASET,
        help="; ".join(f"{name}: {spec.summary}" for name, spec in DATASETS.items())
        + " (default: %(default)s)",
    )
    p.add_argument("--data-root", help="folder holding CUB_200_2011/ or Stanford_Online_Products/")
    p.add_argument("--download", action="store_true", help="let PML download CUB/SOP into it")
    p.add_argument(
        "--losses",
        action=_RecordedFlag,
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
    p.add_argument("--epochs", type=int, help=per_dataset("epochs"))
    p.add_argument("--batch-size", type=int, help=per_dataset("batch_size"))
    p.add_argument("--embedding-size", type=int, help=per_dataset("embedding_size"))
    p.add_argument("--lr", type=float, help="model learning rate; " + per_dataset("lr"))
    p.add_argument("--loss-lr", type=float, default=1e-2, help="class-weight learning rate")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument(
        "--repeats",
        type=int,
        help="seeds per loss (seed, seed+1, ...): the table shows mean ± std; "
        + per_dataset("repeats"),
    )
    p.add_argument(
        "--shift",
        type=int,
        help="random translation of training images, pixels; " + per_dataset("shift"),
    )
    p.add_argument(
        "--train-classes", help="digits: the digits used for training (default: 0,1,2,3,4)"
    )
    p.add_argument(
        "--min-fonts",
        type=int,
        help="glyphs: a character is a class when this many fonts draw it (default: 12)",
    )
    p.add_argument(
        "--max-classes",
        type=int,
        help="glyphs: keep only the first N characters (quick runs; default: all)",
    )
    p.add_argument("--backbone", help="cub/sop: timm/torchvision model (default: resnet50)")
    p.add_argument("--weights", help="cub/sop: local state dict of pretrained backbone weights")
    p.add_argument(
        "--image-size", type=int, help="glyphs: 32 (default; a multiple of 16), cub/sop: 224"
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader worker processes (default 0: load in this process); a run repeats "
        "at a given value, but each value draws the augmentations from its own streams",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads; " + per_dataset("threads") + " (None: torch's default); "
        "small networks run faster on 1 (more threads only add contention)",
    )
    p.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (autocast)")
    p.add_argument("--out", default="out/bench", help="output folder (default: %(default)s)")
    p.add_argument(
        "--embeddings-only",
        action="store_true",
        help="no training: evaluate saved checkpoints (--checkpoint, default <out>/checkpoints; "
        "a --losses list picks among them) into <out>/reevaluated.{json,md,png}; training "
        "and model flags are not read (a note names those given)",
    )
    p.add_argument("--checkpoint", action="append", default=[], help="a saved .pt (repeatable)")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="glyphs/digits: skip the 'raw pixels' row (retrieval on the input pixels)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (default: a bar on a terminal, one line per epoch otherwise)",
    )
    # what --embeddings-only compares the flags it does not read with (_given)
    p.set_defaults(
        func=run_bench,
        flag_defaults={k: p.get_default(k) for k in (*_NOT_REEVALUATED, "losses")},
        explicit_flags=(),
    )


def _parse_loss_args(items: list[str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, field = key.partition(".")
        if not (sep and dot and name and field):
            raise SystemExit(f"error: --loss-arg expects LOSS.KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = _float_word(raw)
        overrides.setdefault(name, {})[field] = value
    return overrides


def _float_word(raw: str) -> Any:
    """``raw`` as the float it spells when it is ``nan``/``inf``/``infinity`` (signed, any
    case: no Python literal, so that the loss's check names the value), else as given."""
    if raw.strip().lstrip("+-").lower() in ("nan", "inf", "infinity"):
        return float(raw)
    return raw


def one_line(err: BaseException) -> str:
    """The line of an error's message that says what went wrong: the first, or for an
    error that a DataLoader worker wrapped ("Caught ... in DataLoader worker process 0"
    and the worker's traceback) the original exception's last line, which names it, without
    its ``Type:`` prefix (the same line as with no workers)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        last = lines[-1].strip()
        return re.sub(r"^[A-Za-z_][\w.]*(Error|Exception|Warning): ", "", last) or last
    return lines[0] if lines else type(err).__name__


def _load_data(args: argparse.Namespace) -> Any:
    from pml_margins.bench import datasets

    try:
        return datasets.load_dataset(args.dataset, args)
    except (ValueError, FileNotFoundError) as err:
        message = str(err)  # the loaders' argument names as this command's flags
        for name, flag in _LOADER_FLAGS.items():
            message = re.sub(rf"(?<![\w/\\.-]){name}(?![\w/\\-]|\.\w)", flag, message)  # not paths
        raise SystemExit(f"error: {message}") from err


#: the data loaders' argument names in their messages, and the flags that set them
_LOADER_FLAGS = {
    "train_classes": "--train-classes",
    "max_classes": "--max-classes",
    "min_fonts": "--min-fonts",
    "glyph size": "--image-size",
}


#: flags that only some datasets read, with those datasets (``--no-baseline``, which only
#: turns a row off, is accepted everywhere)
_DATASET_FLAGS = {
    "data_root": ("cub", "sop"),
    "download": ("cub", "sop"),
    "backbone": ("cub", "sop"),
    "weights": ("cub", "sop"),
    "train_classes": ("digits",),
    "min_fonts": ("glyphs",),
    "max_classes": ("glyphs",),
    "image_size": ("glyphs", "cub", "sop"),
}


def _check_dataset_flags(args: argparse.Namespace) -> None:
    """A flag given for a dataset that does not read it is an error, not a silent no-op
    (recorded in results.json as if it had been used)."""
    for name, datasets in _DATASET_FLAGS.items():
        value = getattr(args, name)
        if value is not None and value is not False and args.dataset not in datasets:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(
                f"error: {flag} applies to --dataset {' or '.join(datasets)}, not {args.dataset}"
            )
    if args.weights is not None and args.backbone == "small-cnn":  # it would go unread
        raise SystemExit(
            "error: --weights: --backbone small-cnn has no pretrained weights to load "
            "(drop --weights, or name a timm/torchvision --backbone)"
        )


def _run_config(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    """What results.json records: the flags this dataset reads, with the values used
    (the loaders' defaults where none was given), and the settings (for a
    re-evaluation, only those it reads)."""
    from pml_margins.bench.datasets import LOADER_DEFAULTS

    used = LOADER_DEFAULTS[args.dataset]
    config = {
        k: used.get(k) if v is None else v
        for k, v in vars(args).items()
        if k not in ("func", "flag_defaults", "explicit_flags")
        and args.dataset in _DATASET_FLAGS.get(k, (args.dataset,))
    } | settings
    if args.embeddings_only:  # nothing trained: each checkpoint's entry says how it was
        # (and with which --amp it is embedded: its own, where it recorded one)
        unread = {*_NOT_REEVALUATED, "amp", *({"losses"} - set(_given(args, ("losses",))))}
        config = {k: v for k, v in config.items() if k not in unread}
    return config


#: what only training reads (a re-evaluation records each checkpoint's own instead)
_TRAINING_ONLY = frozenset(
    {"losses", "loss_arg", "epochs", "embedding_size", "batch_size", "lr", "loss_lr"}
    | {"repeats", "shift", "seed"}
)
#: flags --embeddings-only does not read: training's (but --losses, which picks the
#: checkpoints), and the model's (each checkpoint holds its network and weights)
_NOT_REEVALUATED = (*sorted(_TRAINING_ONLY - {"losses"}), "backbone", "weights")


class _RecordedFlag(argparse.Action):
    """Stores the value, and the flag's name in ``explicit_flags``: given on the command
    line, whatever its value (``--losses`` spelled out as its default still picks the
    checkpoints of ``--embeddings-only``, which then must all be there)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.explicit_flags = (*getattr(namespace, "explicit_flags", ()), self.dest)


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """Those of ``names`` given: on the command line (a :class:`_RecordedFlag`), or with
    another value than the parser's default."""
    defaults = getattr(args, "flag_defaults", {})
    explicit = getattr(args, "explicit_flags", ())
    return [
        k for k in names if k in explicit or (k in defaults and getattr(args, k) != defaults[k])
    ]


def _note_unread_flags(args: argparse.Namespace) -> None:
    """With ``--embeddings-only`` (the training command re-run with it, say), one line on
    stderr naming the flags given that it does not read, rather than a silent no-op."""
    given = _given(args, _NOT_REEVALUATED)
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        print(
            f"note: --embeddings-only evaluates each checkpoint as it was trained: it does "
            f"not read {flags}",
            file=sys.stderr,
        )


#: the largest --image-size (FreeType draws glyphs below 65,536 pixels; CUB/SOP train at
#: 224) and --embedding-size (a (D, C) W beyond it fails in the allocator, a traceback)
MAX_IMAGE_SIZE, MAX_EMBEDDING = 4096, 65536


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line settings, the dataset's defaults where none is given; checked."""
    from pml_margins.bench.datasets import DATASETS

    defaults = DATASETS[args.dataset].defaults
    settings = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in SETTINGS}
    for key, value in settings.items():
        if value is None or key == "threads":  # checked below
            continue
        low = 0 if key == "shift" else 1
        if (key == "lr" and not 0 < value < math.inf) or (key != "lr" and value < low):
            flag = "--" + key.replace("_", "-")
            bound = "a finite number > 0" if key == "lr" else f">= {low}"
            raise SystemExit(f"error: {flag} must be {bound}, got {value}")
    problem = None if settings["threads"] is None else thread_count_problem(settings["threads"])
    if problem:
        raise SystemExit(f"error: --threads {problem}")
    if not 0 <= args.loss_lr < math.inf:  # 0 freezes the class weights
        raise SystemExit(f"error: --loss-lr must be a finite number >= 0, got {args.loss_lr}")
    if args.num_workers < 0:
        raise SystemExit(f"error: --num-workers must be >= 0, got {args.num_workers}")
    if args.image_size is not None and not 1 <= args.image_size <= MAX_IMAGE_SIZE:
        raise SystemExit(
            f"error: --image-size must be in [1, {MAX_IMAGE_SIZE}], got {args.image_size}"
        )
    if settings["embedding_size"] is not None and settings["embedding_size"] > MAX_EMBEDDING:
        raise SystemExit(  # (a raw allocator error, after the data loaded)
            f"error: --embedding-size must be <= {MAX_EMBEDDING}, got {settings['embedding_size']}"
        )
    _check_dataset_flags(args)
    if args.embeddings_only:
        _note_unread_flags(args)
    if args.dataset == "glyphs" and args.image_size is not None:
        from pml_margins.bench.datasets import GLYPH_MODEL

        step = GLYPH_MODEL["unshuffle"] * 2 ** len(GLYPH_MODEL["widths"])
        if args.image_size % step:  # before rendering the glyphs (~30 s), not after
            raise SystemExit(
                f"error: --image-size must be a multiple of {step} for the glyph CNN, "
                f"got {args.image_size}"
            )
    try:
        device_arg(args.device)
        check_seed(args.seed, 1 if args.embeddings_only else settings["repeats"])
        check_out_folder(args.out, files=(*RESULT_FILES, *REEVALUATED_FILES))
        checkpoints = os.path.join(args.out, CHECKPOINTS)
        if os.path.lexists(checkpoints) and not os.path.isdir(checkpoints):  # a dangling link
            raise ValueError(f"--out {args.out}: {CHECKPOINTS} exists and is not a folder")
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if args.checkpoint and not args.embeddings_only:
        raise SystemExit("error: --checkpoint re-evaluates a model: give --embeddings-only too")
    return settings


def _data_counts(bench_data: Any) -> dict[str, int]:
    from pml_margins.bench.train import dataset_labels

    test_labels = dataset_labels(bench_data.test)
    return {
        "train_classes": bench_data.num_train_classes,
        "test_classes": len(set(test_labels)),
        "train_images": len(bench_data.train),
        "test_images": len(test_labels),
    }


#: what a run writes into --out (a re-evaluation: REEVALUATED_FILES), json, table, plot
RESULT_FILES = ("results.json", "results.md", "recall.png")
REEVALUATED_FILES = ("reevaluated.json", "reevaluated.md", "reevaluated.png")
#: the folder of a training run's checkpoints in --out
CHECKPOINTS = "checkpoints"


def _finish(results: dict[str, Any], out: str, reevaluated: bool = False) -> None:
    """Write the run's json, table and plot into ``out``: each to a hidden temporary name
    first, then all moved over the previous run's (``os.replace``, one file at a time)
    only once all three are written, so that a write that fails (a full disk, a dangling
    link at ``recall.png``) leaves the previous set (and, in the caller, its checkpoints)
    as they were, with a one-line error."""
    from pml_margins.bench import report

    table = report.markdown_table(results)
    names = REEVALUATED_FILES if reevaluated else RESULT_FILES
    paths = [os.path.join(out, name) for name in names]
    temporary = [
        os.path.join(out, f".{name}.{os.getpid()}.tmp{os.path.splitext(name)[1]}") for name in names
    ]
    try:
        report.write_json(results, temporary[0])
        with open(temporary[1], "w") as f:
            f.write(table)
        report.plot_recall(results, temporary[2])
        for written, path in zip(temporary, paths, strict=True):
            os.replace(written, path)
    except OSError as err:
        raise SystemExit(f"error: cannot write the results into {out}: {one_line(err)}") from err
    finally:
        for written in temporary:
            with contextlib.suppress(OSError):
                os.remove(written)
    print(table, end="")
    print(f"\nwrote {out}/{', '.join(names)}")


def run_bench(args: argparse.Namespace) -> int:
    """The ``bench`` command; returns the exit status."""
    from pml_margins.bench import train

    settings = _settings(args)
    existed = os.path.isdir(args.out)
    try:
        with train.torch_threads(settings["threads"]):
            return _run_bench(args, settings)
    except BaseException:  # a run that fails leaves no empty output folder of its own
        if not existed and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)
        raise


def _loss_plan(args: argparse.Namespace) -> tuple[list[str], dict[str, dict[str, Any]]]:
    from pml_margins.bench import registry

    names = list(dict.fromkeys(n.strip() for n in args.losses.split(",") if n.strip()))
    overrides = _parse_loss_args(args.loss_arg)
    unknown = sorted(set(names) - set(registry.LOSSES)) + sorted(set(overrides) - set(names))
    if unknown:
        raise SystemExit(
            f"error: unknown or unused loss names: {', '.join(unknown)} "
            f"(choose from {', '.join(registry.LOSSES)})"
        )
    if not names:
        raise SystemExit("error: --losses names no loss")
    return names, overrides


def _run_bench(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    from pml_margins.bench import report, train

    start = time.perf_counter()
    names, overrides = ([], {}) if args.embeddings_only else _loss_plan(args)
    bench_data = _load_data(args)
    if not args.embeddings_only:
        _check_losses(names, overrides, bench_data, settings, args)
    counts = _data_counts(bench_data)
    results: dict[str, Any] = {
        "dataset": bench_data.name,
        **counts,
        "recall_ks": list(bench_data.recall_ks),
        "protocol": (
            f"train on {counts['train_classes']} classes ({counts['train_images']} images), "
            f"retrieve among {counts['test_images']} images of {counts['test_classes']} "
            "other classes (each image queries all the others)"
        ),
        "dataset_info": bench_data.info,
        "config": _run_config(args, settings),
        "environment": report.environment(),
        "losses": [],
    }
    if args.embeddings_only:
        return _evaluate_checkpoints(args, bench_data, results, start)
    _make_out(args.out)  # after every check: a failed run leaves no empty output folder

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
        shift=settings["shift"],
    )
    # the run's checkpoints wait in a folder beside checkpoints/ (through a symlink: beside
    # its target, on the same file system) until the results are written (module doc)
    checkpoints = os.path.realpath(os.path.join(args.out, CHECKPOINTS))
    staged = _new_folder(os.path.dirname(checkpoints), f".{CHECKPOINTS}-")
    try:
        _train_all(args, names, overrides, bench_data, settings, cfg, results, staged)
        if _has_pixel_baseline(args) and not args.no_baseline:
            results["losses"].append(_pixel_baseline(bench_data))
        results["total_seconds"] = round(time.perf_counter() - start, 1)
        _finish(results, args.out)
        _replace_folder(staged, checkpoints)
    finally:
        if os.path.isdir(staged):  # a failed or interrupted run
            shutil.rmtree(staged, ignore_errors=True)
    for name in REEVALUATED_FILES:  # they described the previous run's checkpoints
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(args.out, name))
    return 0


def _new_folder(parent: str, prefix: str) -> str:
    """A new, empty folder ``parent/<prefix><random>`` (with the umask's permissions)."""
    path = os.path.join(parent, prefix + uuid.uuid4().hex[:16])
    try:
        os.mkdir(path)
    except OSError as err:
        raise SystemExit(f"error: cannot make a folder in {parent}: {err.strerror}") from None
    return path


def _replace_folder(new: str, path: str) -> None:
    """Move folder ``new`` to ``path``, whose previous folder (if any) is removed; if the
    move fails, the previous folder is put back."""
    old = None
    if os.path.lexists(path):
        old = _new_folder(os.path.dirname(path), f".{os.path.basename(path)}-old-")
        os.replace(path, os.path.join(old, "previous"))
    try:
        os.replace(new, path)
    except OSError:
        if old is not None:
            os.replace(os.path.join(old, "previous"), path)
            os.rmdir(old)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _train_all(
    args: argparse.Namespace,
    names: list[str],
    overrides: dict[str, dict[str, Any]],
    bench_data: Any,
    settings: dict[str, Any],
    cfg: Any,
    results: dict[str, Any],
    checkpoints: str,
) -> None:
    """Train each loss (``settings["repeats"]`` seeds), save the first seed's model in
    ``checkpoints`` and append each loss's summary to ``results["losses"]``."""
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
                        "data_settings": _data_settings(args),
                        "name": name,
                        "label": setup.label,
                        "hyperparameters": setup.hyperparameters,
                        "train_seconds": run["train_seconds"],
                        "images_per_second": run["images_per_second"],
                        "seed": args.seed,
                        "amp": args.amp,  # (a re-evaluation embeds as the run did)
                    },
                    os.path.join(checkpoints, f"{name}.pt"),
                )
        entry = _summarize(name, setup, runs)
        results["losses"].append(entry)
        if not args.no_progress:
            r1 = entry["metrics"][f"recall_at_{bench_data.recall_ks[0]}"]
            print(
                f"{setup.label}: done, R@{bench_data.recall_ks[0]} {100 * r1:.1f}, "
                f"{entry['train_seconds']:.1f} s/run",
                flush=True,
            )


def _make_out(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"error: --out {out}: cannot create it: {err.strerror}") from None


def _check_losses(
    names: list[str],
    overrides: dict[str, dict[str, Any]],
    bench_data: Any,
    settings: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    """Build every loss once before any training: a bad ``--loss-arg`` of the last loss
    is an error now, not after the others have trained."""
    from pml_margins.bench import datasets, registry

    side = min(bench_data.input_shape[-2:]) if len(bench_data.input_shape) >= 2 else None
    if settings["shift"] and side is not None and settings["shift"] >= side:
        raise SystemExit(  # (every training image moved out of its frame: blank inputs)
            f"error: --shift must be below the images' side ({side} pixels), "
            f"got {settings['shift']}"
        )
    for name in names:
        try:
            registry.build_loss(
                name,
                bench_data.num_train_classes,
                settings["embedding_size"],
                **datasets.loss_overrides(args.dataset, name, overrides.get(name, {})),
            )
        except (ValueError, TypeError, ImportError) as err:
            message = one_line(err)  # (named already where the registry names the loss)
            shown = message if message.startswith(f"loss {name!r}") else f"{name}: {message}"
            raise SystemExit(f"error: {shown}") from None


def _has_pixel_baseline(args: argparse.Namespace) -> bool:
    from pml_margins.bench.datasets import DATASETS

    return DATASETS[args.dataset].pixel_baseline


def _train_one(
    name: str,
    args: argparse.Namespace,
    bench_data: Any,
    settings: dict[str, Any],
    cfg: Any,
    overrides: dict[str, Any],
    schedule: Any = None,
) -> tuple[dict[str, Any], torch.nn.Module, Any, dict[str, Any]]:
    """Train and evaluate one (loss, seed); returns the run's record, model, setup, config.

    ``schedule`` (``LossSetup.schedule``) is stepped with the optimizer, e.g. a margin warm-up.
    """
    from pml_margins.bench import datasets, evaluate, models, registry, train

    train.seed_everything(cfg.seed)
    config = datasets.DATASETS[args.dataset].model(bench_data, settings["embedding_size"], args)
    try:
        model, description = models.build_model(config)
    except (ValueError, OSError) as err:  # an unknown backbone, unusable --weights
        raise SystemExit(f"error: {one_line(err)}") from err
    if isinstance(model, models.ConvEmbedder) and config["kind"] != "small-cnn":
        # the small CNN stood in for a backbone neither timm nor torchvision could build:
        # the checkpoint records what was built (re-evaluated later, with timm installed)
        config = {"kind": "small-cnn", "embedding_size": config["embedding_size"]}
    elif isinstance(model, models.BackboneEmbedder):  # and the library that built it
        config = {**config, "library": model.library}
    try:
        setup = registry.build_loss(
            name,
            bench_data.num_train_classes,
            settings["embedding_size"],
            **datasets.loss_overrides(args.dataset, name, overrides),
        )
    except (ValueError, ImportError) as err:
        raise SystemExit(f"error: {err}") from err
    if schedule is not None:
        setup.schedule = schedule
    try:
        run = train.train_embedding(model, setup, bench_data.train, cfg)
    # a batch larger than the training set, a diverging loss, an unreadable image
    except (ValueError, train.TrainingDiverged, OSError) as err:
        raise SystemExit(f"error: {one_line(err)}") from err
    emb, labels = _embed_test_set(model, bench_data, args, setup.label, args.amp)
    record = {
        "seed": cfg.seed,
        "model": description,
        "train_seconds": round(run.seconds, 2),
        "images_per_second": round(run.images_per_second, 1),
        "forward_dtype": run.forward_dtype,
        "steps": run.steps,
        "final_train_loss": run.epoch_losses[-1],
        "metrics": evaluate.evaluate_retrieval(emb, labels, bench_data.recall_ks),
    }
    return record, model, setup, config


def _embed_test_set(
    model: torch.nn.Module,
    bench_data: Any,
    args: argparse.Namespace,
    label: str,
    amp: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split's embeddings and labels, under autocast ``amp``; an unreadable
    image, or a model whose test embeddings are NaN/Inf (it diverged in its last steps),
    is one error line."""
    from pml_margins.bench import train

    try:
        emb, labels = train.embed(
            model,
            bench_data.test,
            device=args.device,
            amp=amp,
            num_workers=args.num_workers,
            keep_on_device=True,
            progress=not args.no_progress,
            label=f"{label}: test embeddings",
        )
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError, a truncated file
        raise SystemExit(f"error: {one_line(err)}") from err
    if problem := train.diverged_embeddings(emb, label):
        raise SystemExit(f"error: {problem}")
    return emb, labels


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
        "images_per_second": round(sum(r["images_per_second"] for r in runs) / len(runs), 1),
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
        "images_per_second": None,
        "steps": 0,
        "metrics": evaluate.evaluate_retrieval(inputs.flatten(1), labels, bench_data.recall_ks),
    }


_CHECKPOINT_KEYS = ("model_config", "model_state", "dataset", "name", "label")
#: the flags that decide a dataset's split and inputs (recorded in checkpoints); which
#: dataset reads which: :data:`_DATASET_FLAGS`
_SPLIT_FLAGS = ("train_classes", "min_fonts", "max_classes", "image_size")


def _data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The values of the flags that decide ``--dataset``'s split and inputs."""
    return {k: getattr(args, k) for k in _SPLIT_FLAGS if args.dataset in _DATASET_FLAGS[k]}


def _effective(dataset: str, settings: dict[str, Any]) -> dict[str, Any]:
    """:func:`_data_settings` as the data loaders read them: a flag left out is its
    default (``--image-size 32`` is the glyph set's default), digit classes a set."""
    from pml_margins.bench.datasets import LOADER_DEFAULTS

    defaults = LOADER_DEFAULTS.get(dataset, {})
    out = {k: defaults.get(k) if v is None else v for k, v in settings.items()}
    if "train_classes" in out:
        try:
            classes = sorted({int(c) for c in str(out["train_classes"]).split(",") if c.strip()})
            out["train_classes"] = ",".join(str(c) for c in classes)
        except ValueError:
            pass  # compared as given (the loader names the bad value)
    return out


def _read_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint written by ``bench``; a clear exit message for anything else."""
    import pickle

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message blames weights_only whatever
        cause = str(err.__context__ or err)  # the file is: the unpickler's own error, and
        reason = (cause.splitlines() or [""])[0].split(". Please")[0]  # the three causes
        raise SystemExit(
            f"error: cannot read checkpoint {path}: torch.load(weights_only=True) failed "
            f"({reason}): not a torch checkpoint, a damaged one, or one holding objects "
            "weights_only does not load"
        ) from None
    except Exception as err:  # a text file, a truncated zip, ...: one line
        message = (str(err).splitlines() or [""])[0]
        reason = f"{type(err).__name__}: {message or 'an empty or truncated file'}"
        reason = not_written_by_torch_save(path) or reason
        raise SystemExit(f"error: cannot read checkpoint {path}: {reason}") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise SystemExit(
            f"error: {path} is not a pml-margins bench checkpoint (missing {', '.join(missing)})"
        )
    return saved


def _checked_checkpoint(path: str, args: argparse.Namespace, bench_data: Any) -> dict[str, Any]:
    """A bench checkpoint trained on this dataset and split; else one error line."""
    saved = _read_checkpoint(path)
    if saved.get("dataset") != bench_data.name:
        raise SystemExit(
            f"error: {path} was trained on {saved.get('dataset')!r}, "
            f"not --dataset {bench_data.name}"
        )
    trained = saved.get("data_settings", _data_settings(args))  # older: not recorded
    now = _effective(bench_data.name, _data_settings(args))
    then = _effective(bench_data.name, trained)
    differ = [k for k, v in now.items() if then.get(k) != v]
    if differ:  # another split: the "held-out" classes may include trained ones
        shown = ", ".join(f"--{k.replace('_', '-')} {then.get(k)} (not {now[k]})" for k in differ)
        raise SystemExit(
            f"error: {path} was trained with {shown}: pass the same settings, or its "
            "test classes are not the held-out ones"
        )
    return saved


def _evaluate_checkpoints(
    args: argparse.Namespace, bench_data: Any, results: dict[str, Any], start: float
) -> int:
    from pml_margins.bench import evaluate, models
    from pml_margins.bench.registry import LOSSES

    given = {}  # each file once (a checkpoint named twice made two identical rows)
    for path in args.checkpoint:
        given.setdefault(os.path.realpath(path), path)
    paths = list(given.values()) or sorted(glob.glob(os.path.join(args.out, CHECKPOINTS, "*.pt")))
    if not paths:
        raise SystemExit(
            f"error: --embeddings-only: no checkpoints given and none in {args.out}/checkpoints"
        )
    checked = [(path, _checked_checkpoint(path, args, bench_data)) for path in paths]
    if _given(args, ("losses",)):  # only these losses' checkpoints
        wanted = list(dict.fromkeys(n.strip() for n in args.losses.split(",") if n.strip()))
        if not wanted:
            raise SystemExit("error: --losses names no loss")
        missing = sorted(set(wanted) - {saved["name"] for _, saved in checked})
        if missing:
            raise SystemExit(
                f"error: --losses: no checkpoint of {', '.join(missing)} among "
                f"{args.checkpoint or args.out + '/checkpoints'}"
            )
        checked = [item for item in checked if item[1]["name"] in wanted]
    if not args.checkpoint:  # a folder's checkpoints in the registry's order
        order = {name: i for i, name in enumerate(LOSSES)}
        checked.sort(key=lambda item: order.get(item[1]["name"], len(order)))
    _make_out(args.out)  # after every check: a failed run leaves no empty output folder
    for path, saved in checked:
        # the checkpoint holds every weight: no pretrained weights to load first
        model, description = models.build_model({**saved["model_config"], "weights_path": None})
        try:
            model.load_state_dict(saved["model_state"])
        except RuntimeError as err:  # a model_config that builds another network
            raise SystemExit(
                f"error: {path}: its weights do not fit the model it describes "
                f"({description}): {one_line(err)}"
            ) from None
        amp = saved.get("amp", args.amp)  # (a checkpoint saved before it was kept: --amp)
        if "amp" in saved and args.amp is not None and args.amp != amp:
            trained = "--amp " + amp if amp else "no --amp"
            print(
                f"note: {saved['name']} was trained with {trained} and is evaluated so "
                f"(--amp {args.amp} not read)",
                file=sys.stderr,
            )
        emb, labels = _embed_test_set(model, bench_data, args, saved["name"], amp)
        results["losses"].append(
            {
                "name": saved["name"],
                "label": saved["label"],
                "model": description,
                "checkpoint": path,
                "amp": amp,  # (the checkpoint's own where it kept one, else --amp)
                "hyperparameters": saved.get("hyperparameters", {}),
                "train_seconds": saved.get("train_seconds"),
                "images_per_second": saved.get("images_per_second"),
                "metrics": evaluate.evaluate_retrieval(emb, labels, bench_data.recall_ks),
            }
        )
    if _has_pixel_baseline(args) and not args.no_baseline:
        results["losses"].append(_pixel_baseline(bench_data))
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    _finish(results, args.out, reevaluated=True)
    return 0
