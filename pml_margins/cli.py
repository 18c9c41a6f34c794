"""Command line entry point: ``pml-margins <command>`` (also ``python -m pml_margins``).

Each command lives in its own module exposing ``register(subparsers)``, which adds
an ``argparse`` sub-parser whose ``func`` default runs the command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
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
    """``--device`` as a ``torch.device``; ``ValueError`` for a name torch does not know
    or CUDA that is not there (each command prints it as its one error line)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: not a device: {name!r} (cpu, cuda, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    return device


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
    ...`` line and gives status 2, as argparse's own errors do."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SystemExit as stop:
        if isinstance(stop.code, str) and stop.code.startswith("error: "):
            print(f"pml-margins {args.command}: {stop.code}", file=sys.stderr)
            return 2
        raise
