"""The accuracy benchmark runs end to end on its quick sizes (ours and PML agree)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_one_repeat_reports_no_later_working_memory():
    """With ``--repeats 1`` there is no call after the first: the "later" working memory
    printed the first call's figure again; it is now n/a (and so is the ratio)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--repeats", "1"]
    cmd += ["--only", "CUB-like (quick)"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
    (line,) = [row for row in done.stdout.splitlines() if row.startswith("| CUB-like")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[8].endswith("/ n/a") and cells[9].endswith("/ n/a") and cells[10] == "n/a"


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU refusal")
@pytest.mark.parametrize("script", ["accuracy.py", "losses.py"])
def test_cuda_without_a_gpu_is_one_error_line(script):
    """``--device cuda`` without a GPU: accuracy.py printed an error row per case and
    exited 0, losses.py a traceback; both now stop at once with argparse's status 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--device", "cuda", "--quick"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "no CUDA device here" in done.stderr.splitlines()[-1]
