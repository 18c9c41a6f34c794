"""Run a function on ``world_size`` gloo ranks in spawned processes, bounded in time.

The parent never joins a collective itself: it starts the workers, waits up to
``timeout`` seconds, terminates every worker still alive (on failure or time-out)
and re-raises the first worker's traceback. Workers write their results to files.
"""

from __future__ import annotations

import datetime
import importlib
import multiprocessing as mp
import os
import pathlib
import sys
import time
import traceback
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _entry(
    target: str,
    rank: int,
    world_size: int,
    store: str,
    out: str,
    backend: str,
    kwargs: dict[str, Any],
) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        module, _, name = target.rpartition(".")
        getattr(importlib.import_module(module), name)(
            rank, world_size, pathlib.Path(out), **kwargs
        )
        # the work is done and written; what follows is teardown, in which gloo can
        # abort a rank whose peer closed its connection first (a SIGABRT seen twice in
        # ~15 full runs on a loaded 2-core box), so the parent judges by this marker
        pathlib.Path(out, f"done_{rank}").touch()
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        pathlib.Path(out, f"error_{rank}.txt").write_text(traceback.format_exc())
        sys.exit(1)


def run_workers(
    target: str,
    world_size: int,
    out: pathlib.Path,
    timeout: float = 240.0,
    backend: str = "gloo",
    **kwargs: Any,
) -> None:
    """Run ``target(rank, world_size, out, **kwargs)`` (a dotted name) on every rank."""
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    ctx = mp.get_context("spawn")
    env_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env_path) if p)
    procs = [
        ctx.Process(
            target=_entry, args=(target, r, world_size, str(store), str(out), backend, kwargs)
        )
        for r in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} on {world_size} ranks did not finish in {timeout} s")
            if any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(0.5)  # let the failing rank finish writing its traceback
                break
            time.sleep(0.05)
    finally:
        if env_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_path
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = sorted(out.glob("error_*.txt"))
    if errors:
        details = "\n".join(f"--- {e.name}\n{e.read_text()}" for e in errors)
        raise RuntimeError(f"{len(errors)} worker(s) failed:\n{details}")
    bad = [
        p.exitcode
        for rank, p in enumerate(procs)
        if p.exitcode != 0 and not (out / f"done_{rank}").exists()
    ]
    if bad:
        raise RuntimeError(f"workers exited with codes {[p.exitcode for p in procs]}")
