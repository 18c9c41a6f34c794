"""Progress bars are drawn only where tqdm draws them to: a terminal on stderr."""

import io
import sys

import numpy as np
import pytest

from pml_margins import terminal
from pml_margins.cli import main
from pml_margins.evaluation import cli_eval


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("stdout_tty", [False, True])
@pytest.mark.parametrize("stderr_tty", [False, True])
def test_bars_follow_stderr_not_stdout(monkeypatch, stdout_tty, stderr_tty):
    monkeypatch.setattr(sys, "stdout", _Stream(stdout_tty))
    monkeypatch.setattr(sys, "stderr", _Stream(stderr_tty))
    assert terminal.bars_reach_a_terminal() is stderr_tty


def test_no_stderr_at_all_means_no_bars(monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)  # (pythonw, a daemon)
    assert terminal.bars_reach_a_terminal() is False


@pytest.mark.parametrize("tty", [False, True])
def test_eval_draws_its_bar_on_a_terminal_only(tmp_path, monkeypatch, tty):
    # a redirected stderr (a log) got tqdm's carriage-return redraws at SOP size
    rng = np.random.default_rng(0)
    np.save(tmp_path / "e.npy", rng.normal(size=(300, 8)).astype("f4"))
    np.save(tmp_path / "l.npy", rng.integers(0, 10, 300))
    monkeypatch.setattr(cli_eval, "PROGRESS_MIN_PAIRS", 1)  # a bar at any size
    err = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", err)
    argv = ["eval", "--embeddings", str(tmp_path / "e.npy"), "--labels"]
    assert main([*argv, str(tmp_path / "l.npy"), "--metrics", "precision_at_1"]) == 0
    assert ("k-nn" in err.getvalue()) is tty
