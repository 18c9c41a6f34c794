"""The spawning harness itself: a failing rank is reported and nothing is left running."""

from __future__ import annotations

import multiprocessing

import pytest

from tests.distributed.harness import run_workers


def test_failing_rank_is_reported_and_all_workers_are_stopped(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="deliberate failure on rank 1") as info:
        run_workers("tests.distributed.workers.fail_on_rank_1", 3, tmp_path)
    assert "error_1.txt" in str(info.value)
    assert multiprocessing.active_children() == [], "a worker was left running"
