"""The profiling script runs end to end on its quick sizes and prints its three tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_profile_prints_the_loss_and_both_calculator_tables():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_steps.py"), "--quick"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
    heads = [line for line in done.stdout.splitlines() if line.startswith("## ")]
    assert [h.split(":")[0] for h in heads] == ["## loss", "## calculator", "## calculator"]
    assert "k='max_bin_count'" in heads[1] and "k=None" in heads[2]
    assert done.stdout.count("Self CPU time total") == 3  # one table each on CPU
