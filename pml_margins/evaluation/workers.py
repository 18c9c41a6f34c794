"""Run block tasks on a few threads, each with its own scratch state.

The exact k-nn on CPU does two things per block of the similarity matrix: a
matrix product (numpy's OpenBLAS) and a top-k selection (faiss's OpenMP heaps).
Run one after the other with each library using every core, the two thread
pools get in each other's way: each spins its idle workers for a while after a
call, stealing the cores the other library needs next (on our 2-core box the k-nn
of a CUB-sized set took 0.37-0.48 s that way). Instead each worker thread here
runs whole tasks -- product, then selection -- with both libraries limited to
one thread, into its own buffers and its own running top-k; the per-worker
results are merged at the end. Both libraries release the GIL during their calls.

Tasks are handed out in their given order, so each worker sees an ascending
subsequence of them (what :class:`~.topk.RunningTopK` needs).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["one_thread_per_library", "run_workers"]

Task = TypeVar("Task")
State = TypeVar("State")
Result = TypeVar("Result")


_CONTROLLER = None
_LIMIT_LOCK = threading.Lock()
_LIMIT_DEPTH = 0
_LIMIT = None


@contextlib.contextmanager
def one_thread_per_library() -> Iterator[None]:
    """Limit the BLAS libraries to one thread for the duration (restored after).

    faiss's OpenMP thread count is a per-thread setting: each worker sets its
    own (see :func:`run_workers`). The threadpoolctl controller (a scan of the
    loaded libraries, about 1 ms) is made once. Calls overlapping from several
    threads share one limit: the first in sets it, the last out restores the
    original setting (not an intermediate one).
    """
    global _CONTROLLER, _LIMIT_DEPTH, _LIMIT
    from threadpoolctl import ThreadpoolController

    with _LIMIT_LOCK:
        if _CONTROLLER is None:
            _CONTROLLER = ThreadpoolController()
        if _LIMIT_DEPTH == 0:
            _LIMIT = _CONTROLLER.limit(limits=1, user_api="blas")
        _LIMIT_DEPTH += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _LIMIT_DEPTH -= 1
            if _LIMIT_DEPTH == 0 and _LIMIT is not None:
                _LIMIT.restore_original_limits()
                _LIMIT = None


def _limit_faiss_threads() -> None:
    import faiss

    faiss.omp_set_num_threads(1)  # OpenMP: affects only the calling thread


def run_workers(
    tasks: Sequence[Task],
    num_workers: int,
    make_state: Callable[[], State],
    work: Callable[[State, Task], None],
    finish: Callable[[State], Result],
    *,
    progress: bool = False,
    desc: str = "k-nn",
) -> list[Result]:
    """``work(state, task)`` for every task, on ``num_workers`` threads.

    Each worker makes its own state with ``make_state()``, takes the next task
    in order until none is left, and ends with ``finish(state)``. With one
    worker everything runs in the calling thread, with the libraries' thread
    settings untouched. The first exception raised by a worker stops the others
    and is raised here.

    Returns:
        The workers' ``finish`` results, in worker order (workers that got no
        task included).
    """
    bar = tqdm(total=len(tasks), desc=desc, unit="block", disable=not progress)
    if num_workers <= 1 or len(tasks) <= 1:
        state = make_state()
        for task in tasks:
            work(state, task)
            bar.update()
        bar.close()
        return [finish(state)]

    lock = threading.Lock()
    pending = iter(tasks)
    errors: list[BaseException] = []
    results: list[Result | None] = [None] * num_workers

    def next_task() -> tuple[bool, Task | None]:
        with lock:
            if errors:
                return False, None
            for task in pending:
                return True, task
            return False, None

    def worker(index: int) -> None:
        try:
            _limit_faiss_threads()
            state = make_state()
            while True:
                found, task = next_task()
                if not found:
                    break
                work(state, task)
                with lock:
                    bar.update()
            results[index] = finish(state)
        except BaseException as error:  # handed to the calling thread
            with lock:
                errors.append(error)

    with one_thread_per_library():
        threads = [
            threading.Thread(target=worker, args=(i,), name=f"pml-margins-knn-{i}", daemon=True)
            for i in range(num_workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    bar.close()
    if errors:
        raise errors[0]
    return [result for result in results if result is not None]
