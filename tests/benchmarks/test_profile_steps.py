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


def test_the_k_none_table_runs_the_whole_list_engine(monkeypatch):
    # P@1, R-Precision and MAP@R alone read no deeper than the largest class, so the
    # "whole-list" table profiled the short k-NN; the whole list's MAP makes it whole
    import argparse

    import pml_margins.evaluation.whole_lists as whole_lists_module

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import losses as losses_benchmark
    import profile_steps

    calls = []
    real = whole_lists_module.whole_lists

    def spy(query, reference, k, *args, **kwargs):
        calls.append((len(query), len(reference), k))
        return real(query, reference, k, *args, **kwargs)

    monkeypatch.setattr(whole_lists_module, "whole_lists", spy)
    profile_steps.profile_calculator((300, 16, 20), None, "cpu", 3)
    assert (300, 300, 299) in calls
    # and the loss benchmark's bf16 floor is the three products only (autocast cast W
    # twice and x twice each step)
    import torch

    args = argparse.Namespace(device="cpu", dtype="bf16", sample_rate=1.0)
    floor = losses_benchmark.Case("floor", "-", (32, 16, 50), args)
    with torch.profiler.profile() as prof:
        floor.step()
    names = [event.name for event in prof.events()]
    assert names.count("aten::mm") == 3 and "aten::_to_copy" not in names
