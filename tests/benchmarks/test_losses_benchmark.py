"""benchmarks/losses.py on quick sizes: every implementation gives PML's value in the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMPLS = {"ours", "ours-unchecked", "ours-bounded", "plain", "pml", "floor"}


def test_quick_losses_benchmark_agrees_with_pml_on_materialized_and_blocked_sizes():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # 64 x 100 logits are materialized, 128 x 5000 run the blocked function
    cmd = [sys.executable, str(ROOT / "benchmarks" / "losses.py"), "--repeats", "1"]
    cmd += ["--sizes", "64x128x100,128x64x5000", "--no-memory", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True)
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert {(r[0], r[2]) for r in rows} >= {
        (size, impl) for size in ("64x128x100", "128x64x5000") for impl in IMPLS
    }
    losses = {r[1] for r in rows if r[1] != "-"}
    assert losses == {"arcface", "cosface", "sphereface", "nsl"}
    for size, loss, impl, ms, *_, gap in rows:
        assert float(ms) > 0
        if impl != "floor":
            assert float(gap) <= 1e-4, (size, loss, impl, gap)  # fp32 rounding of a ~10-60 loss


def test_subcenter_rows_have_their_own_floor_and_agree_with_pml():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "losses.py"), "--repeats", "1"]
    cmd += ["--sizes", "64x128x300", "--no-memory", "--threads", "1", "--losses", "subcenter"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True)
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    impls = {(r[1], r[2]) for r in rows}
    assert impls == {("subcenter", i) for i in IMPLS} | {("-", "floor")}  # fused: a bounded row
    for _, loss, impl, ms, *_, gap in rows:
        assert float(ms) > 0
        if impl not in ("floor", "pml"):
            assert float(gap) <= 1e-4, (loss, impl, gap)


def test_losses_without_pml_counterpart_run_ours_only():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "losses.py"), "--repeats", "1"]
    cmd += ["--sizes", "64x128x300", "--no-memory", "--threads", "1"]
    cmd += ["--losses", "elasticface,adacos,magface,adaface,curricularface"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True)
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert {(r[1], r[2]) for r in rows} == {("-", "floor")} | {
        (loss, i)
        for loss in ("elasticface", "adacos", "magface", "adaface", "curricularface")
        for i in ("ours", "ours-unchecked", "ours-bounded")
    }


def test_sample_rate_adds_a_partial_fc_row_of_ours():
    """--sample-rate R times ours with Partial FC beside the full losses (the README's
    Partial FC figures); its value is another loss's, so no |d| PML is shown."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "losses.py"), "--repeats", "1"]
    cmd += ["--sizes", "64x32x300", "--no-memory", "--threads", "1"]
    cmd += ["--losses", "arcface,adacos", "--sample-rate", "0.2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True)
    lines = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    rows = {(r[1], r[2]): r for r in lines}
    assert ("arcface", "ours-sampled") in rows and ("adacos", "ours-sampled") in rows
    assert rows[("arcface", "ours-sampled")][-1] == "nan"
    assert float(rows[("arcface", "ours")][-1]) <= 1e-4
    bad = subprocess.run([*cmd[:-1], "1.5"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--sample-rate must be in (0, 1]" in bad.stderr
