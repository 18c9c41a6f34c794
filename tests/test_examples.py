"""Every script in examples/ runs with --tiny as a subprocess and prints what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


CASES = [
    pytest.param("01_arcface_plain_loop.py", ["margin = 0.3 rad", "test accuracy"], id="01"),
    pytest.param(
        "02_circle_pair_mining.py",
        ["retrieval among unseen digits", "recall_at_8"],
        id="02",
    ),
    pytest.param(
        "03_softmax_center_joint.py",
        ["| lambda | intra/inter distance |", "| 0.0 |", "| 0.1 |"],
        id="03",
    ),
    pytest.param(
        "04_evaluate_saved_embeddings.py",
        ["| embeddings | R@1 | R@2 | R@4 | R@8 |", "| pixels.pt |", "| random16.npz |"],
        id="04",
    ),
    pytest.param(
        "05_margin_warmup.py",
        # the resumed scheduler at the step it was saved at (not 0: found by review)
        ["margin 0.500 rad", re.compile(r"resumed scheduler at step [1-9]\d*, margin 0\.500")],
        id="05",
    ),
]


# launched under torchrun: tests/test_example_distributed.py
TORCHRUN_EXAMPLES = {"06_distributed_partial_fc.py"}


def test_every_example_is_tested() -> None:
    tested = {p.values[0] for p in CASES} | TORCHRUN_EXAMPLES
    assert tested == {p.name for p in EXAMPLES.glob("[0-9]*.py")}


@pytest.mark.parametrize(("script", "expected"), CASES)
def test_example_runs(script: str, expected: list[str]) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in expected:
        if isinstance(text, re.Pattern):
            assert text.search(proc.stdout), proc.stdout
        else:
            assert text in proc.stdout, proc.stdout
