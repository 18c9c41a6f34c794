"""Command-line defects found by this session's review, each test failing on the code
before its fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.bench.conftest import run_cli
from tests.bench.test_cli_bench import TINY


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan", "miner_epsilon must be finite"),
        ("-1", "miner_epsilon must be >= 0"),
        ("abc", "miner_epsilon must be a real number"),
    ],
)
def test_circle_miner_epsilon_is_checked_before_training(tmp_path: Path, value, message) -> None:
    """NaN or -1 mined no pair (a loss of 0 every step: an untrained model reported, status
    0); "abc" failed with a traceback once Circle's turn came, after the other losses."""
    argv = ["bench", *TINY, "--losses", "nsl,circle", "--loss-arg", f"circle.miner_epsilon={value}"]
    with pytest.raises(SystemExit, match=message):
        run_cli([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--embedding-size", "1000000000000"], r"--embedding-size must be <= 65536"),
        (["--shift", "8"], r"--shift must be below the images' side \(8 pixels\)"),
        (["--image-size", "65536"], r"--image-size must be in \[1, 4096\]"),
    ],
)
def test_sizes_beyond_what_can_run_are_one_line(tmp_path: Path, flags, message) -> None:
    """A 1e12 embedding size or a shift of 1e6 ended in the allocator's traceback, a glyph
    size of 65,536 in FreeType's; any shift of at least the image's side blanks every
    training image."""
    data = ["--dataset", "glyphs"] if "--image-size" in flags else []
    with pytest.raises(SystemExit, match=message):
        run_cli(["bench", *TINY, *data, *flags, "--out", str(tmp_path / "out")])


def test_a_dangling_link_as_out_is_one_line(tmp_path: Path) -> None:
    """ablate made the folder with a bare os.makedirs: FileExistsError's traceback, after
    the glyph set was rendered."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere" / "x")
    for command in (["ablate", "--sweep", "warmup", "--epochs", "1"], ["bench", *TINY]):
        with pytest.raises(SystemExit, match="a symbolic link to nothing"):
            run_cli([*command, "--out", str(link)])
        with pytest.raises(SystemExit, match="a symbolic link to nothing"):
            run_cli([*command, "--out", str(link / "sub")])


@pytest.mark.skipif(shutil.which("xelatex") is not None, reason="a TeX system writes .pgf")
def test_a_figure_format_that_needs_tex_is_refused_up_front(tmp_path: Path) -> None:
    """sphere --out f.pgf trained, then failed in matplotlib ('xelatex' not found) and left
    a partial file."""
    with pytest.raises(SystemExit, match=r"\.pgf needs xelatex"):
        run_cli(["sphere", "--epochs", "1", "--out", str(tmp_path / "f.pgf")])
    assert not list(tmp_path.iterdir())


def test_reevaluation_reads_an_explicit_losses_list_and_each_checkpoint_once(
    tmp_path: Path,
) -> None:
    """--embeddings-only with the default --losses list spelled out was taken as no list
    (no error for the missing checkpoints); --losses '' wrote an empty result; one
    --checkpoint given twice made two rows."""
    import json

    from pml_margins.bench.registry import DEFAULT_LOSSES

    out = tmp_path / "out"
    assert run_cli(["bench", *TINY, "--losses", "nsl", "--out", str(out)]) == 0
    again = ["bench", *TINY, "--embeddings-only", "--out", str(out)]
    with pytest.raises(SystemExit, match="no checkpoint of arcface, center, circle"):
        run_cli([*again, "--losses", ",".join(DEFAULT_LOSSES)])
    with pytest.raises(SystemExit, match="--losses names no loss"):
        run_cli([*again, "--losses", ""])
    checkpoint = str(out / "checkpoints" / "nsl.pt")
    twice = ["--checkpoint", checkpoint, "--checkpoint", str(Path(checkpoint).resolve())]
    assert run_cli([*again, *twice]) == 0
    rows = json.loads((out / "reevaluated.json").read_text())["losses"]
    assert [row["name"] for row in rows] == ["nsl"]


def test_the_console_script_prints_one_line_for_ctrl_c(monkeypatch, capsys) -> None:
    """Ctrl-C printed a KeyboardInterrupt traceback of 13 frames; the console script now
    prints one line with the shell's status for SIGINT, while main() still propagates it
    (a Python caller looping over commands stops)."""
    from pml_margins import cli

    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli.entry()
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == "pml-margins: interrupted"
