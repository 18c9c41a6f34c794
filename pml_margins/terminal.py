"""Whether progress bars are drawn: tqdm writes them to stderr."""

from __future__ import annotations

import sys

__all__ = ["bars_reach_a_terminal"]


def bars_reach_a_terminal() -> bool:
    """Whether ``sys.stderr``, where tqdm draws its bars, is a terminal. A redirected or
    piped stderr gets no bar: a log file would keep every carriage-return redraw (a
    terminal on stdout says nothing about where the bars go)."""
    stream = sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())
