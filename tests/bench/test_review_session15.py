"""Defects found by this session's review of the benchmark, each test failing on the code
before its fix."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pml_margins.bench import glyphs


@pytest.fixture(scope="module")
def computer_modern() -> dict[str, str]:
    by_name = {os.path.basename(p): p for p in glyphs.glyph_font_files()}
    return {n: by_name[n + ".ttf"] for n in glyphs.TEX_ENCODED_FONTS if n + ".ttf" in by_name}


def test_tex_encoded_fonts_give_only_the_characters_they_draw(computer_modern) -> None:
    """matplotlib's Computer Modern fonts map code points in TeX's encoding: cmr10's
    U+00A7 draws a Sigma, its '{' an en dash, cmmi10's '!' an omega; the set took them as
    those characters (about 230 wrong labels of 32,234 images, some across the split)."""
    assert set(computer_modern) == set(glyphs.TEX_ENCODED_FONTS)  # all six ship with it
    cmr10 = computer_modern["cmr10"]
    with pytest.raises(ValueError, match="no character is drawn"):  # (it draws none of them)
        glyphs.build_glyph_set(characters="§{", font_files=[cmr10, cmr10], min_fonts=2)
    cmr = glyphs.build_glyph_set(characters="AB§", font_files=[cmr10, cmr10], min_fonts=2)
    assert cmr.characters == ("A", "B")  # letters keep their images
    from matplotlib.ft2font import FT2Font

    font = FT2Font(computer_modern["cmmi10"])
    codes = set(glyphs._unicode_codes(font, tex_encoded=True))
    assert ord("!") not in codes and ord("a") in codes
    assert len(glyphs._unicode_codes(font, tex_encoded=False)) == len(font.get_charmap())


def test_no_image_of_a_tex_encoded_font_is_another_character() -> None:
    """In the default set, every Computer Modern image's character is its glyph's own."""
    from fontTools.agl import toUnicode
    from matplotlib.ft2font import FT2Font

    glyph_set = glyphs.build_glyph_set(characters='§¡¢£{|}!"#:;=<>AaΣΓ')
    by_name = {os.path.basename(p): p for p in glyphs.glyph_font_files()}
    for label, font_id in zip(glyph_set.labels, glyph_set.font_ids, strict=True):
        name = glyph_set.fonts[font_id]
        if not name.startswith(glyphs.TEX_ENCODED_FONTS):
            continue
        font = FT2Font(by_name[name])
        char = glyph_set.characters[label]
        assert toUnicode(font.get_glyph_name(font.get_charmap()[ord(char)])) == char
    assert np.unique(glyph_set.labels).size == len(glyph_set.characters)


@pytest.mark.parametrize(("batch_size", "per_class"), [(4, 2), (6, 2), (8, 4), (12, 4)])
def test_mined_batches_hold_two_classes_at_least(batch_size, per_class) -> None:
    """--batch-size 4 with a miner took MPerClassSampler(m=4): one class per batch, no
    negative pair, Circle loss 0 at every step and a table row for an untrained model."""
    import torch
    from pytorch_metric_learning.miners import MultiSimilarityMiner
    from torch.utils.data import TensorDataset

    from pml_margins.bench import registry, train

    setup = registry.build_loss("circle", 4, 3)
    setup.miner = MultiSimilarityMiner()
    data = TensorDataset(torch.randn(48, 4), torch.arange(48) % 6)
    loader = train._loader(data, setup, train.TrainConfig(batch_size=batch_size))
    for _, labels in loader:
        counts = torch.bincount(labels)
        assert sorted(set(counts[counts > 0].tolist())) == [per_class]
        assert (counts > 0).sum() >= 2


def test_cmti10_s_dollar_is_left_out(computer_modern) -> None:
    """From the review of the fix: cmti10's glyph at '$' is named "dollar" but draws a
    pound sign (TeX's \\pounds is the italic dollar): it passed the name check."""
    from matplotlib.ft2font import FT2Font

    font = FT2Font(computer_modern["cmti10"])
    assert ord("$") in glyphs._unicode_codes(font, True)  # the name alone would keep it
    assert ord("$") not in glyphs._unicode_codes(font, True, glyphs.TEX_MISNAMED["cmti10"])
    glyph_set = glyphs.build_glyph_set(characters="$£")
    dollar = glyph_set.characters.index("$")
    fonts = {glyph_set.fonts[f] for f in glyph_set.font_ids[glyph_set.labels == dollar]}
    assert "cmti10.ttf" not in fonts and "cmr10.ttf" in fonts


def test_cli_corners_from_the_cli_review(tmp_path) -> None:
    """bench --embeddings-only recorded an --amp it said it did not read (no entry said
    which it used); sphere --out 'dot.' printed 'wrote dot.' where matplotlib wrote
    dot.png; sphere --device foo printed torch's list of device types, --device cuda
    named the flag twice; eval --output '' was taken and wrote nothing."""
    import json

    import numpy as np

    from pml_margins.bench.cli_sphere import saved_figure_path
    from pml_margins.cli import main
    from tests.bench.conftest import run_cli
    from tests.bench.test_cli_bench import TINY

    out = tmp_path / "run"
    assert run_cli(["bench", *TINY, "--losses", "softmax", "--amp", "bf16", "--out", str(out)]) == 0
    again = ["bench", *TINY, "--embeddings-only", "--amp", "fp16", "--out", str(out)]
    assert run_cli(again) == 0
    saved = json.loads((out / "reevaluated.json").read_text())
    assert "amp" not in saved["config"] and saved["losses"][0]["amp"] == "bf16"

    assert saved_figure_path("dot.") == "dot.png" and saved_figure_path(".png") == ".png.png"
    assert saved_figure_path("f.svg") == "f.svg" and saved_figure_path("f") == "f.png"
    with pytest.raises(SystemExit, match=r"--device: not a device: 'foo' \(cpu, cuda, \.\.\.\)"):
        run_cli(["sphere", "--device", "foo", "--out", str(tmp_path / "s.png")])

    np.save(tmp_path / "e.npy", np.random.default_rng(0).normal(size=(6, 3)))
    np.save(tmp_path / "y.npy", np.arange(6) % 2)
    args = ["eval", "--embeddings", str(tmp_path / "e.npy"), "--labels", str(tmp_path / "y.npy")]
    assert main([*args, "--output", ""]) == 2


def test_the_printed_figure_follows_savefig_format(monkeypatch) -> None:
    """From the review of the CLI fix: a name without a suffix was given .png where
    matplotlib adds its savefig.format setting's; --device cuda:0 lost its index in the
    error."""
    import matplotlib

    from pml_margins.bench.cli_sphere import saved_figure_path
    from pml_margins.cli import device_arg

    monkeypatch.setitem(matplotlib.rcParams, "savefig.format", "svg")
    assert saved_figure_path("fig") == "fig.svg" and saved_figure_path("f.png") == "f.png"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device cuda:0 but CUDA is not available"):
            device_arg("cuda:0")
