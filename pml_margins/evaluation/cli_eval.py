"""``pml-margins eval``: retrieval accuracy of saved embeddings, as a table and JSON."""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pml_margins.terminal import bars_reach_a_terminal
from pml_margins.torch_files import TORCH_SAVE_HEADERS, error_name

__all__ = ["format_table", "load_array", "register", "run"]

#: above this many query × reference pairs the k-nn shows a progress bar (stderr a terminal)
PROGRESS_MIN_PAIRS = 10**8
#: ``knn.BACKENDS``, spelled out: importing the engine here would slow ``--help``
BACKEND_CHOICES = ("auto", "faiss", "torch")


def load_array(path: str | Path, key: str | None = None) -> torch.Tensor:
    """Load one array from ``.npy``, ``.npz`` or ``.pt``.

    An ``.npz`` (or a ``.pt`` holding a dict) must hold one array, or one named
    ``key``.

    Raises:
        ValueError: unknown suffix, or no single array to pick.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _MAGIC:
        _check_magic(path, suffix)
    if suffix == ".npy":
        return _from_numpy(np.load(path, allow_pickle=False))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return _from_numpy(_pick({k: archive[k] for k in archive.files}, key, path))
    if suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = _pick(obj, key, path)
        if isinstance(obj, np.ndarray):
            obj = _from_numpy(obj)
        if not isinstance(obj, torch.Tensor):
            kind = type(obj).__name__
            article = "an" if kind[:1].lower() in "aeiou" else "a"
            raise ValueError(f"{path} holds {article} {kind}, not a tensor")
        return obj
    raise ValueError(f"{path}: expected a .npy, .npz or .pt file")


#: how each numpy format starts: its NPY header, or a zip archive's first record
#: (``np.load`` takes a file with neither for a pickle, and says so)
_MAGIC = {
    ".npy": (b"\x93NUMPY",),
    ".npz": (b"PK\x03\x04", b"PK\x05\x06"),
    ".pt": TORCH_SAVE_HEADERS,  # (else torch.load's legacy reader: "KeyError: 101")
}


def _check_magic(path: Path, suffix: str) -> None:
    """``ValueError`` naming what ``path`` holds when it does not start as its ``suffix``
    says (``np.load`` would read a zip named ``.npy`` as an archive, an array named
    ``.npz`` as an array, and refuse anything else as "pickled data")."""
    with open(path, "rb") as file:
        head = file.read(6)
    if head.startswith(_MAGIC[suffix]):
        return
    if not head:
        kind = "empty"
    elif head.startswith(_MAGIC[".npy"]):
        kind = "a .npy array"
    elif head.startswith(_MAGIC[".npz"]):
        kind = "a zip archive (.npz or .pt)"
    elif head.startswith(b"\x80"):
        kind = "a pickle (a .pt file of torch < 1.6)"
    else:
        kind = "neither a .npy array, a zip archive (.npz, .pt) nor a pickle"
    raise ValueError(f"{path}: not a {suffix} file: it is {kind}")


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """A tensor of ``array``, in native byte order (torch reads no other); ``ValueError``
    for an array of strings, bytes or objects (torch's message lists its own types)."""
    kind = {"U": "strings", "S": "bytes", "V": "records", "O": "objects"}.get(array.dtype.kind)
    if kind is not None:
        raise ValueError(f"it holds {kind} (dtype {array.dtype}), not numbers")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(array)


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


def _json_ready(value: Any) -> Any:
    """NaN (a metric with no query to average) as None, which JSON writes as null."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _load(path: str, key: str) -> torch.Tensor:
    """:func:`load_array`, every failure as one ``SystemExit`` line naming the file."""
    if Path(path).is_dir():
        raise CliError(f"{path}: is a directory, not a .npy, .npz or .pt file")
    try:
        loaded = load_array(path, key)
    except pickle.UnpicklingError:
        raise CliError(
            f"{path}: cannot read: torch.load(weights_only=True) refuses it (it holds Python "
            "objects besides tensors and arrays); save the tensor alone"
        ) from None
    except Exception as error:  # a corrupt zip, a file of another kind, ...: one line
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        reason = (str(reason).splitlines() or [""])[0].removeprefix(f"{path}: ")
        reason = reason or f"{type(error).__name__} (an empty or truncated file?)"
        if not isinstance(error, (OSError, ValueError, TypeError, RuntimeError, EOFError)):
            reason = f"not a valid {Path(path).suffix} file ({error_name(error)}: {reason})"
        raise CliError(f"{path}: cannot read: {reason}") from None
    if isinstance(loaded, torch.Tensor) and loaded.is_meta:
        raise CliError(f"{path}: its tensor has no data (a meta tensor): save a real one")
    return loaded


def _recall_ks(args: argparse.Namespace) -> tuple[int, ...]:
    """``--recall-ks`` and every ``recall_at_K`` that ``--metrics`` names (asking for
    ``recall_at_3`` is asking for K = 3)."""
    named = [m.removeprefix("recall_at_") for m in args.metrics if m.startswith("recall_at_")]
    # (only K as written: "03" is no metric's name, and is refused as unknown)
    ks = (k for k in named if k.isdigit() and int(k) > 0 and str(int(k)) == k)
    return tuple(args.recall_ks) + tuple(int(k) for k in ks)


def _check_output(output: str) -> None:
    """``CliError`` before any work when ``output`` cannot be written: a folder, a path
    through a file, a folder that does not exist, or one this process cannot write in.
    Nothing is created or changed: an existing regular file is opened for appending and
    closed; for a new file (a dangling link's target too) a temporary file is made in its
    folder; a pipe or a device is left to the final write (opening it would signal its
    reader the end)."""
    try:
        _check_writable(Path(output), output)
    except (OSError, RuntimeError) as error:  # a name too long, a loop of links
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise CliError(f"{output}: cannot write: {reason}") from None


def _check_writable(path: Path, output: str) -> None:
    if path.is_dir():
        raise CliError(f"{output}: cannot write: it is a directory (give a file name)")
    target = path.resolve()  # through symbolic links, dangling ones included
    for part in target.parents:
        if part.exists():
            if not part.is_dir():
                raise CliError(f"{output}: cannot write: {part} is a file")
            break
    if not target.parent.is_dir():
        raise CliError(f"{output}: cannot write: its directory does not exist")
    if target.is_file():
        with target.open("a"):
            pass
    elif not target.exists():
        with tempfile.TemporaryFile(dir=target.parent):
            pass


def _check_metric_names(args: argparse.Namespace, calculator: type) -> None:
    """``--metrics``/``--exclude`` name known metrics and leave at least one to compute."""
    known = calculator(recall_ks=_recall_ks(args)).original_function_dict
    for flag, names in (("--metrics", args.metrics), ("--exclude", args.exclude)):
        unknown = [m for m in names if m not in known]
        if unknown:
            any_k = " (or recall_at_K for any K)" if flag == "--metrics" else ""
            raise CliError(
                f"{flag}: unknown metric {', '.join(unknown)}; choose from "
                f"{', '.join(sorted(known))}{any_k}"
            )
    left = [m for m in (args.metrics or known) if m not in args.exclude]
    if not left:
        raise CliError("--metrics and --exclude leave no metric to compute")


def _rows(values: torch.Tensor) -> int:
    """Rows of a loaded array, for the progress bar's choice (none for a 0-d, nested or
    sparse one, which the calculator names)."""
    if values.is_nested or values.layout != torch.strided or not values.ndim:
        return 0
    return values.shape[0]


#: the calculator's argument names as this command's flags, for its error messages
_FLAGS = (
    ("ref_includes_query=True", "--ref-includes-query"),
    ("the first len(query) rows of reference and reference_labels", "the first rows of "
     "--reference-embeddings and --reference-labels"),
    ("equal query and query_labels", "equal --embeddings and --labels"),
    ("num_threads", "--num-threads"),
    ("avg_of_avgs", "--avg-of-avgs"),
    ("recall_ks", "--recall-ks"),
)  # fmt: skip


def _in_flags(message: str) -> str:
    """``message`` with the calculator's argument names written as the flags that set them."""
    for name, flag in _FLAGS:
        message = message.replace(name, flag)
    return message


class CliError(Exception):
    """A bad input: printed as one ``pml-margins eval: error: ...`` line, exit status 2."""


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
        "a reference set, every query is searched among the others. The metrics are printed "
        "to stdout as a Markdown table; --output also writes them as JSON (NaN as null). "
        "Metrics: precision_at_1, r_precision, mean_average_precision_at_r, "
        "mean_average_precision, mean_reciprocal_rank, recall_at_K (one per --recall-ks, and "
        "any K named in --metrics), num_excluded_queries, NMI, AMI. Bad input: one error line, "
        "exit status 2.",
    )
    p.add_argument("--embeddings", required=True, help="query embeddings, (N, D)")
    p.add_argument(
        "--labels",
        required=True,
        help="query labels, (N,): integers, or floats compared for equality",
    )
    p.add_argument("--reference-embeddings", help="reference embeddings (default: the query)")
    p.add_argument("--reference-labels", help="reference labels")
    p.add_argument(
        "--ref-includes-query",
        action="store_true",
        help="the reference set starts with the query set (self-matches are excluded)",
    )
    p.add_argument("--metrics", nargs="+", default=(), help="metrics to compute (default: all)")
    p.add_argument("--exclude", nargs="+", default=(), help="metrics to skip")
    p.add_argument(
        "--recall-ks",
        nargs="+",
        type=int,
        default=[1, 2, 4, 8],
        metavar="K",
        help="cut-offs K of the recall_at_K metrics: a query counts if one of its K nearest "
        "references shares its label (default: 1 2 4 8)",
    )
    p.add_argument(
        "--k",
        type=_k_arg,
        default="max_bin_count",
        help="neighbours for PML's metrics: an int, max_bin_count (default) or all",
    )
    p.add_argument(
        "--distance",
        choices=("euclidean", "cosine"),
        default="euclidean",
        help="euclidean: distance between the raw embeddings; cosine: similarity of the "
        "L2-normalized embeddings (default: euclidean)",
    )
    p.add_argument("--avg-of-avgs", action="store_true", help="average the per-class averages")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="candidate selection of the exact k-nn: faiss's heaps (CPU), torch.topk (any "
        "device) or auto (faiss on CPU); the results do not depend on it",
    )
    p.add_argument(
        "--num-threads",
        type=int,
        help="CPU threads of torch, BLAS and faiss during the k-nn (default: torch's)",
    )
    p.add_argument("--output", help="write the results as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``pml-margins eval``; returns the exit status (2 for bad input)."""
    try:
        return _run(args)
    except CliError as error:
        print(f"pml-margins eval: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from pytorch_metric_learning.distances import CosineSimilarity

    from pml_margins.cli import device_arg
    from pml_margins.evaluation.calculator import RetrievalAccuracyCalculator

    if (args.reference_embeddings is None) != (args.reference_labels is None):
        raise CliError("give both --reference-embeddings and --reference-labels, or none")
    try:
        device = device_arg(args.device)
    except ValueError as error:
        raise CliError(str(error)) from None
    if any(k < 1 for k in args.recall_ks):
        raise CliError(f"--recall-ks must be positive, got {args.recall_ks}")
    if args.output == "":
        raise CliError("--output: an empty path names no file")
    if args.output:
        _check_output(args.output)
    _check_metric_names(args, RetrievalAccuracyCalculator)
    query = _load(args.embeddings, "embeddings")
    query_labels = _load(args.labels, "labels")
    reference = reference_labels = None
    if args.reference_embeddings is not None:
        reference = _load(args.reference_embeddings, "embeddings")
        reference_labels = _load(args.reference_labels, "labels")
    pairs = _rows(query) * _rows(query if reference is None else reference)
    try:
        calc = RetrievalAccuracyCalculator(
            include=tuple(args.metrics),
            exclude=tuple(args.exclude),
            avg_of_avgs=args.avg_of_avgs,
            k=args.k,
            recall_ks=_recall_ks(args),
            distance=CosineSimilarity() if args.distance == "cosine" else None,
            device=device,
            progress=pairs >= PROGRESS_MIN_PAIRS and bars_reach_a_terminal(),
            backend=args.backend,
            num_threads=args.num_threads,
        )
    except ValueError as error:
        raise CliError(_in_flags(str(error).splitlines()[0])) from None
    names = {
        "query": args.embeddings,
        "query_labels": args.labels,
        "reference": args.reference_embeddings,
        "reference_labels": args.reference_labels,
    }
    try:
        results = calc.get_accuracy(
            query.to(device),
            query_labels,
            None if reference is None else reference.to(device),
            reference_labels,
            ref_includes_query=args.ref_includes_query,
        )
    except (TypeError, ValueError) as error:
        message = str(error).splitlines()[0]
        culprit = next((f for n, f in names.items() if f and message.startswith(n + " ")), None)
        raise CliError(f"{culprit}: {message}" if culprit else _in_flags(message)) from None
    print(format_table(results))
    if args.output:
        try:
            Path(args.output).write_text(json.dumps(_json_ready(results), indent=2) + "\n")
        except OSError as error:
            raise CliError(f"{args.output}: cannot write: {error.strerror}") from None
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
