"""The accuracy benchmark runs end to end on its quick sizes (ours and PML agree)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_accuracy_benchmark_prints_equal_metrics_and_recall_table():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--repeats", "1"]
    cmd += ["--rounds", "2"]  # ours, PML and matmul in turn, twice
    cmd += ["--only", "CUB-like (quick), query / reference", "--recall-ks", "1", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("| CUB-like")]
    assert len(lines) == 2, done.stdout
    assert lines[0].rstrip(" |").endswith("0.0e+00"), lines[0]  # ours == PML on every metric
    assert "error" not in done.stdout
    recall_values = [float(v) for v in lines[1].split("|")[-2].split(",")]
    assert 0.0 < recall_values[0] <= recall_values[1] <= 1.0


def test_quick_accuracy_benchmark_with_pml_default_k():
    """``--k none``: both calculators with PML's default k=None (whole ranked lists)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--repeats", "1"]
    cmd += ["--only", "CUB-like (quick)", "--k", "none"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
    (line,) = [row for row in done.stdout.splitlines() if row.startswith("| CUB-like")]
    # ours == PML on every metric, within PML's float32 sums of the whole-list MAP
    assert float(line.rstrip(" |").rsplit("|", 1)[1]) <= 1e-7, line
