"""Command line entry point: ``pml-margins <command>`` (also ``python -m pml_margins``).

Each command lives in its own module exposing ``register(subparsers)``, which adds
an ``argparse`` sub-parser whose ``func`` default runs the command.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# module path of each command, imported lazily so that ``--help`` stays fast
COMMAND_MODULES: tuple[str, ...] = (
    "pml_margins.evaluation.cli_eval",
    "pml_margins.bench.cli_bench",
    "pml_margins.bench.cli_sphere",
    "pml_margins.bench.cli_ablate",
)


def device_arg(name: str) -> torch.device:
    """``--device`` as a ``torch.device``; ``ValueError`` for a name torch does not know,
    or a device that is not here (CUDA, MPS, XPU, ... absent, a CUDA index beyond the
    devices, ``meta``, which holds no data): each command prints it as its one error line."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: not a device: {name!r} (cpu, cuda, ...)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
        return device
    if device.type == "mps":
        available = torch.backends.mps.is_available()
    else:
        module = getattr(torch, device.type, None)
        available = callable(getattr(module, "is_available", None)) and module.is_available()
    if not available:
        raise ValueError(f"--device {name}: {device.type} is not available here (cpu, cuda, ...)")
    return device


#: seeds numpy and the data loaders accept: 0 <= seed < 2^32
SEED_LIMIT = 2**32


def check_seed(seed: int, runs: int = 1) -> None:
    """``ValueError`` unless ``seed`` and the ``runs - 1`` seeds after it are in
    ``[0, 2^32)`` (numpy's and the loaders' range; repeats use ``seed + r``)."""
    if seed < 0 or seed + runs - 1 >= SEED_LIMIT:
        last = "" if runs == 1 else f" (and --seed + {runs - 1} for the repeats)"
        raise ValueError(f"--seed must lie in [0, 2^32 - 1]{last}, got {seed}")


def check_out_folder(path: str, flag: str = "--out", files: Sequence[str] = ()) -> None:
    """``ValueError`` when ``path`` cannot become a folder that this process can write:
    it, or the nearest part of it that exists, is a file, or that part is not writable
    (caught before any work, not when the results are written), or one of the ``files``
    to be written there is a folder."""
    target = os.path.abspath(path)
    for part in (target, *Path(target).parents):
        if os.path.islink(part) and not os.path.exists(part):  # (makedirs: FileExistsError)
            where = "" if part == target else f" ({part})"
            raise ValueError(f"{flag} {path}: a symbolic link to nothing{where}")
        if os.path.exists(part):
            if not os.path.isdir(part):
                what = "exists and is not a folder" if part == target else f"{part} is a file"
                raise ValueError(f"{flag} {path}: {what}")
            try:  # a read-only mount, permissions (root passes os.access on sysfs)
                with tempfile.TemporaryFile(dir=part):
                    pass
            except OSError as err:
                raise ValueError(
                    f"{flag} {path}: cannot write in {part} ({err.strerror})"
                ) from None
            if part == target:
                taken = [f for f in files if os.path.isdir(os.path.join(target, f))]
                if taken:
                    raise ValueError(f"{flag} {path}: {', '.join(taken)} is a folder")
            return


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pml-margins",
        description="Margin-based metric-learning losses and exact retrieval evaluation.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns its exit status. A command's bad-input exit (``SystemExit``
    with an ``"error: ..."`` message) is printed as one ``pml-margins <command>: error:
    ...`` line and gives status 2, as argparse's own errors do. A ``SIGTERM`` (``kill``,
    ``timeout``, a batch scheduler) ends the command as Ctrl-C does, through its clean-up
    (a run's staged checkpoints), with status 143. Ctrl-C propagates (a Python caller
    looping over commands stops); the console script (:func:`entry`) turns it into one
    line."""
    args = build_parser().parse_args(argv)
    try:
        with _terminate_cleanly():
            return int(args.func(args) or 0)
    except SystemExit as stop:
        if isinstance(stop.code, str) and stop.code.startswith("error: "):
            print(f"pml-margins {args.command}: {stop.code}", file=sys.stderr)
            return 2
        raise


def entry() -> None:
    """The ``pml-margins`` console script: :func:`main`, and Ctrl-C as one ``interrupted``
    line (after the command's clean-up) with status 130, the shell's for SIGINT, instead
    of a traceback."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("pml-margins: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """``SIGTERM`` raises ``SystemExit(143)`` in the main thread until exit, so that
    ``finally`` blocks run (Python's default ends the process without them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
