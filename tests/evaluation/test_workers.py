"""The k-nn worker threads: order, states, errors, restored thread settings."""

from __future__ import annotations

import threading

import pytest

from pml_margins.evaluation.workers import one_thread_per_library, run_workers


def _record(state, task):
    state.append(task)


@pytest.mark.parametrize("num_workers", [1, 2, 3, 8])
def test_every_task_once_each_worker_in_ascending_order(num_workers):
    tasks = list(range(57))
    results = run_workers(tasks, num_workers, list, _record, tuple)
    assert 1 <= len(results) <= num_workers
    assert sorted(t for r in results for t in r) == tasks
    for r in results:
        assert list(r) == sorted(r)


def test_one_worker_runs_in_the_calling_thread():
    seen = []
    run_workers([1, 2], 1, list, lambda s, t: seen.append(threading.current_thread()), len)
    assert seen == [threading.current_thread()] * 2


def test_a_worker_error_is_raised_in_the_caller():
    def work(state, task):
        if task == 13:
            raise RuntimeError("block 13 failed")
        state.append(task)

    with pytest.raises(RuntimeError, match="block 13 failed"):
        run_workers(list(range(40)), 2, list, work, tuple)


def test_blas_thread_limit_is_restored():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    with one_thread_per_library():
        inside = [
            p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"
        ]
        assert all(n == 1 for n in inside)
    after = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    assert after == before
