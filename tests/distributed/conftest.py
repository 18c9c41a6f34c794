"""One gloo run on 2 ranks, then one on 3 ranks (loading the 2-rank checkpoint re-sharded)."""

from __future__ import annotations

import pathlib

import pytest

from pml_margins.distributed.checkpoint import load_shard, reshard
from tests.distributed.harness import run_workers

WORLD_SIZES = (2, 3)


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, pathlib.Path]:
    import torch

    two = tmp_path_factory.mktemp("ws2")
    run_workers("tests.distributed.workers.all_scenarios", 2, two)
    three = tmp_path_factory.mktemp("ws3")
    shards = [load_shard(two / f"ckpt_{r}.pt") for r in range(2)]
    for rank, shard in enumerate(reshard(shards, 3)):
        torch.save(shard, three / f"ckpt_{rank}.pt")
    run_workers("tests.distributed.workers.all_scenarios", 3, three, load_from=str(three))
    return {2: two, 3: three}
