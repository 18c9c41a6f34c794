"""benchmarks/circle.py and benchmarks/distributed.py on quick sizes: ours equals PML."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quick_circle_benchmark_ours_equals_pml() -> None:
    out = _run("circle.py", "--repeats", "1", "--sizes", "64", "--dim", "64", "--device", "cpu")
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["64"]]
    assert [r[1] for r in rows] == ["labels", "MS-miner"], out
    for row in rows:
        ours, pml = float(row[-2]), float(row[-1])
        assert ours > 0 and ours == pytest.approx(pml, rel=1e-5), row


@pytest.mark.slow
def test_quick_distributed_benchmark_ours_equals_pml_and_the_unsharded_loss() -> None:
    out = _run("distributed.py")
    rows = {
        cells[1]: cells
        for line in out.splitlines()
        if line.startswith("| 2,000 |")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    unsharded = rows["unsharded"]
    exact = rows["sharded x2, sample_rate=1"]
    partial = rows["sharded x2, sample_rate=0.1"]
    ours, pml = float(unsharded[5]), float(unsharded[6])
    assert ours == pytest.approx(pml, rel=1e-5), unsharded  # ours vs PML, same W and batch
    assert float(exact[5]) == pytest.approx(ours, rel=1e-5), exact  # sharded == unsharded
    # Partial FC drops negatives from the normalizer: a lower bound on the full loss
    assert float(partial[5]) <= float(exact[5]) + 1e-4, partial


def test_distributed_benchmark_rejects_nccl_on_cpu() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--backend", "nccl"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 2 and "nccl" in done.stderr


def test_glyph_step_benchmark_times_both_sides():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "glyph_step.py"), "--steps", "2"]
    cmd += ["--warmup", "1", "--max-classes", "30", "--batch", "16", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True)
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["arcface", "cosface"]
    for _, ours_ms, pml_ms, ratio in rows:
        assert float(ours_ms) > 0 and float(pml_ms) > 0
        assert abs(float(ratio) - float(pml_ms) / float(ours_ms)) < 0.05
