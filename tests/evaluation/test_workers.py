"""The k-nn worker threads: order, states, errors, restored thread settings."""

from __future__ import annotations

import threading

import pytest

from pml_margins.evaluation.workers import one_thread_per_library, run_workers


def _blas_threads() -> list[int]:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]


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
    before = _blas_threads()
    with one_thread_per_library():
        assert all(n == 1 for n in _blas_threads())
    assert _blas_threads() == before


def test_overlapping_limits_restore_the_original_setting():
    before = _blas_threads()
    first, second = one_thread_per_library(), one_thread_per_library()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first out must not restore yet
    assert all(n == 1 for n in _blas_threads())
    second.__exit__(None, None, None)
    assert _blas_threads() == before


def test_concurrent_knn_calls_agree_and_restore_blas_threads():
    import torch

    from pml_margins.evaluation import exact_knn

    before = _blas_threads()
    x = torch.randn(300, 16)
    expected = exact_knn(x, x, 10, exclude_self=True)[1]
    results = [None] * 4

    def run(i):
        results[i] = exact_knn(x, x, 10, exclude_self=True, block_rows=50)[1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, expected) for r in results)
    assert _blas_threads() == before
