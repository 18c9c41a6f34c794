"""``pml-margins eval``: retrieval accuracy of saved embeddings, as a table and JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["format_table", "load_array", "register", "run"]

#: above this many query × reference pairs the k-nn shows a progress bar
PROGRESS_MIN_PAIRS = 10**8


def load_array(path: str | Path, key: str | None = None) -> torch.Tensor:
    """Load one array from ``.npy``, ``.npz`` or ``.pt``.

    An ``.npz`` (or a ``.pt`` holding a dict) must hold one array, or one named
    ``key``.

    Raises:
        ValueError: unknown suffix, or no single array to pick.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return torch.from_numpy(_pick({k: archive[k] for k in archive.files}, key, path))
    if suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = _pick(obj, key, path)
        if isinstance(obj, np.ndarray):
            obj = torch.from_numpy(obj)
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a tensor")
        return obj
    raise ValueError(f"{path}: expected a .npy, .npz or .pt file")


def _pick(arrays: dict[str, Any], key: str | None, path: Path) -> Any:
    if key is not None and key in arrays:
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise ValueError(
        f"{path} holds {sorted(arrays)}; it must hold one array"
        + (f" or one named {key!r}" if key else "")
    )


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of metric names and values (per-class lists shown as their mean)."""
    lines = ["| metric | value |", "|---|---|"]
    for name, value in results.items():
        if isinstance(value, list):
            finite = [v for v in value if not math.isnan(v)]
            mean = sum(finite) / len(finite) if finite else float("nan")
            shown = f"{mean:.4f} (mean of {len(value)} classes)"
        elif isinstance(value, float):
            shown = f"{value:.4f}"
        else:
            shown = str(value)
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines)


def _k_arg(text: str) -> int | str | None:
    if text in ("max_bin_count",):
        return text
    if text in ("all", "None", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"k must be a positive integer, 'max_bin_count' or 'all', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"k must be >= 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` sub-command."""
    p = subparsers.add_parser(
        "eval",
        help="retrieval accuracy (Recall@K, P@1, R-Precision, MAP@R, ...) of saved embeddings",
        description="Exact retrieval accuracy of saved embeddings (.npy, .npz or .pt). Without "
        "a reference set, every query is searched among the others.",
    )
    p.add_argument("--embeddings", required=True, help="query embeddings, (N, D)")
    p.add_argument("--labels", required=True, help="query labels, (N,) integers")
    p.add_argument("--reference-embeddings", help="reference embeddings (default: the query)")
    p.add_argument("--reference-labels", help="reference labels")
    p.add_argument(
        "--ref-includes-query",
        action="store_true",
        help="the reference set starts with the query set (self-matches are excluded)",
    )
    p.add_argument("--metrics", nargs="+", default=(), help="metrics to compute (default: all)")
    p.add_argument("--exclude", nargs="+", default=(), help="metrics to skip")
    p.add_argument("--recall-ks", nargs="+", type=int, default=[1, 2, 4, 8], metavar="K")
    p.add_argument("--k", type=_k_arg, default="max_bin_count", help="int, max_bin_count or all")
    p.add_argument("--distance", choices=("euclidean", "cosine"), default="euclidean")
    p.add_argument("--avg-of-avgs", action="store_true", help="average the per-class averages")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``pml-margins eval``; returns the exit status."""
    from pytorch_metric_learning.distances import CosineSimilarity

    from pml_margins.evaluation.calculator import RetrievalAccuracyCalculator

    if (args.reference_embeddings is None) != (args.reference_labels is None):
        raise SystemExit("error: give both --reference-embeddings and --reference-labels, or none")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    query = load_array(args.embeddings, "embeddings").to(device)
    query_labels = load_array(args.labels, "labels")
    reference = reference_labels = None
    if args.reference_embeddings is not None:
        reference = load_array(args.reference_embeddings, "embeddings").to(device)
        reference_labels = load_array(args.reference_labels, "labels")
    num_ref = len(query) if reference is None else len(reference)
    calc = RetrievalAccuracyCalculator(
        include=tuple(args.metrics),
        exclude=tuple(args.exclude),
        avg_of_avgs=args.avg_of_avgs,
        k=args.k,
        recall_ks=tuple(args.recall_ks),
        distance=CosineSimilarity() if args.distance == "cosine" else None,
        device=device,
        progress=len(query) * num_ref >= PROGRESS_MIN_PAIRS,
    )
    results = calc.get_accuracy(
        query,
        query_labels,
        reference,
        reference_labels,
        ref_includes_query=args.ref_includes_query,
    )
    print(format_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
