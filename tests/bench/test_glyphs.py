"""The glyph set: fonts, rendering (against Pillow's renderer), determinism and the split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pml_margins.bench import glyphs

FONTS = ["DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "cmr10.ttf", "STIXGeneral.ttf"]


@pytest.fixture(scope="module")
def font_paths() -> list[str]:
    by_name = {os.path.basename(p): p for p in glyphs.glyph_font_files()}
    return [by_name[name] for name in FONTS]


def test_default_fonts_leave_out_the_special_ones() -> None:
    names = [os.path.basename(p) for p in glyphs.glyph_font_files()]
    assert names == sorted(names) and "DejaVuSans.ttf" in names
    assert not any(n.startswith(("LastResort", "STIXSiz", "cmex10", "cmsy10")) for n in names)


def test_missing_or_empty_font_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(glyphs.GlyphFontsError, match=r"not found.*matplotlib"):
        glyphs.glyph_font_files(tmp_path / "nope")
    (tmp_path / "LastResortHE-Regular.ttf").write_bytes(b"")
    with pytest.raises(glyphs.GlyphFontsError, match=r"no usable \.ttf"):
        glyphs.glyph_font_files(tmp_path)


def _ink_box(image: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float64)


@pytest.mark.parametrize("char", ["A", "g", "%", "ß"])
def test_render_matches_pillow_and_is_centred(font_paths: list[str], char: str) -> None:
    from matplotlib.ft2font import FT2Font
    from PIL import ImageFont

    image = glyphs.render_glyph(FT2Font(font_paths[0]), char, 32)
    assert image is not None and image.shape == (32, 32) and image.dtype == np.uint8
    # independent reference: Pillow's FreeType rendering of the same font at 32 px/em
    mask = ImageFont.truetype(font_paths[0], 32).getmask(char)
    reference = _ink_box(np.asarray(mask, dtype=np.uint8).reshape(mask.size[1], mask.size[0]))
    ours = _ink_box(image)
    assert abs(ours.shape[0] - reference.shape[0]) <= 1
    assert abs(ours.shape[1] - reference.shape[1]) <= 1
    h, w = min(ours.shape[0], reference.shape[0]), min(ours.shape[1], reference.shape[1])
    corr = np.corrcoef(ours[:h, :w].ravel(), reference[:h, :w].ravel())[0, 1]
    assert corr > 0.6  # hinting differs between the two renderers
    # centred by the ink's bounding box
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    assert abs(rows[0] - (31 - rows[-1])) <= 1 and abs(cols[0] - (31 - cols[-1])) <= 1


def test_small_glyphs_keep_their_size_and_large_ones_fit(font_paths: list[str]) -> None:
    from matplotlib.ft2font import FT2Font

    font = FT2Font(font_paths[0])
    dot, letter = glyphs.render_glyph(font, ".", 32), glyphs.render_glyph(font, "W", 32)
    assert (dot > 0).sum() * 10 < (letter > 0).sum()
    big = glyphs.render_glyph(font, "W", 8)  # "W" is wider than 8 px at 8 px/em -> shrunk
    assert big is not None and big.shape == (8, 8)
    assert glyphs.render_glyph(font, " ", 32) is None  # no ink


def test_glyph_set_is_deterministic_and_counts_fonts(font_paths: list[str]) -> None:
    a = glyphs.build_glyph_set(16, min_fonts=3, font_files=font_paths, characters="AbΩ€ﬁ.")
    b = glyphs.build_glyph_set(16, min_fonts=3, font_files=font_paths, characters="AbΩ€ﬁ.")
    assert np.array_equal(a.images, b.images) and a.characters == b.characters
    assert a.fonts == tuple(sorted(FONTS))
    for label, char in enumerate(a.characters):
        font_ids = a.font_ids[a.labels == label]
        assert len(font_ids) >= 3 and len(set(font_ids.tolist())) == len(font_ids)
        for fid in font_ids:  # every image is that character in a font that has it
            from matplotlib.ft2font import FT2Font

            assert ord(char) in FT2Font(font_paths[FONTS.index(a.fonts[fid])]).get_charmap()
    assert list(a.characters) == sorted(a.characters)
    assert a.images.shape == (len(a.labels), 16, 16)


def test_glyph_set_bad_arguments(font_paths: list[str]) -> None:
    with pytest.raises(ValueError, match="size must be >= 8"):
        glyphs.build_glyph_set(4, font_files=font_paths)
    with pytest.raises(ValueError, match="min_fonts must be >= 2"):
        glyphs.build_glyph_set(16, min_fonts=1, font_files=font_paths)
    with pytest.raises(ValueError, match="no character is drawn by at least 5"):
        glyphs.build_glyph_set(16, min_fonts=5, font_files=font_paths, characters="A")
    with pytest.raises(ValueError, match="max_classes"):
        glyphs.build_glyph_set(16, font_files=font_paths, max_classes=1)


def test_split_is_class_disjoint_and_records_what_it_used(font_paths: list[str]) -> None:
    split = glyphs.load_glyph_split(16, min_fonts=3, font_files=font_paths, max_classes=10)
    train_x, train_y = split.train.tensors
    _, test_y = split.test.tensors
    assert split.name == "glyphs" and split.num_train_classes == 5
    assert sorted(set(train_y.tolist())) == list(range(5))
    assert sorted(set(test_y.tolist())) == [1, 3, 5, 7, 9]
    info = split.info
    assert set(info["train_characters"]).isdisjoint(info["test_characters"])
    assert len(info["train_characters"]) == 5 and info["fonts"] == sorted(FONTS)
    assert train_x.shape[1:] == (1, 16, 16) and 0 <= float(train_x.min())
    assert float(train_x.max()) <= 1.0
    assert len(train_y) + len(test_y) == len(
        glyphs.build_glyph_set(16, min_fonts=3, font_files=font_paths, max_classes=10).labels
    )
