"""How many CPU threads a caller may ask for (the k-nn's ``num_threads``, ``--threads``)."""

from __future__ import annotations

__all__ = ["MAX_THREADS", "thread_count_problem"]

#: the most CPU threads a caller may ask for: torch's pool fails with ``bad_alloc`` (or
#: out of memory at import) far above
MAX_THREADS = 1024


def thread_count_problem(value: object) -> str | None:
    """Why ``value`` is not a thread count (an ``int`` in ``[1, MAX_THREADS]``), or ``None``."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_THREADS:
        return None
    return f"must be an integer in [1, {MAX_THREADS}], got {value!r}"
