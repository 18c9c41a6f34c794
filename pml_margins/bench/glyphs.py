"""Font glyphs as a many-class retrieval set: one class per character, one image per font.

matplotlib ships TrueType fonts (DejaVu Sans/Serif/Mono in several styles, STIX,
Computer Modern). A character drawn by every font that covers it is a class of
images of the same symbol by different type designers -- an Omniglot-like set with
thousands of classes, built offline from files that are already installed.

The set is deterministic: fonts in sorted file-name order, characters in code-point
order, each glyph rendered with FreeType (``matplotlib.ft2font``), cropped to its
ink and centred in a ``size x size`` square. Glyphs larger than the square are
shrunk to fit (keeping their aspect ratio); smaller ones keep their size, so that
``.`` and ``•`` stay different.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pml_margins.bench.data import RetrievalData

__all__ = [
    "EXCLUDED_FONTS",
    "TEX_ENCODED_FONTS",
    "TEX_MISNAMED",
    "GlyphFontsError",
    "GlyphSet",
    "build_glyph_set",
    "glyph_font_files",
    "load_glyph_split",
    "render_glyph",
]

#: fonts left out: a font of "missing glyph" boxes, the STIX size variants of big
#: operators and Computer Modern's extension/symbol fonts (pieces of brackets and
#: operators mapped onto ordinary code points).
EXCLUDED_FONTS: tuple[str, ...] = ("LastResort", "STIXSiz", "cmex10", "cmsy10")

#: fonts whose character map is TeX's encoding, not Unicode (matplotlib's BaKoMa Computer
#: Modern): a code point draws what TeX puts there (cmr10's U+00A7 is Sigma, its "{" an en
#: dash); only the characters whose glyph's name says they are that character are taken
TEX_ENCODED_FONTS: tuple[str, ...] = ("cmb10", "cmmi10", "cmr10", "cmss10", "cmti10", "cmtt10")
#: characters of those fonts whose glyph is named as them but draws another: cmti10's
#: "dollar" is a pound sign (TeX's ``\pounds`` is the italic dollar)
TEX_MISNAMED: dict[str, str] = {"cmti10": "$"}

#: Unicode categories kept: letters, digits/numbers, punctuation and symbols
#: (no marks, separators or control/format/private-use characters).
_KEPT_CATEGORIES = ("L", "N", "P", "S")


class GlyphFontsError(FileNotFoundError):
    """matplotlib's font folder is missing or holds no usable TrueType font."""


@dataclass(frozen=True)
class GlyphSet:
    """Rendered glyphs: ``images[i]`` is ``characters[labels[i]]`` in ``fonts[font_ids[i]]``.

    Attributes:
        images: ``(N, size, size)`` uint8, ink = 255.
        labels: ``(N,)`` int64 class ids, ``0..len(characters)-1`` in code-point order.
        font_ids: ``(N,)`` int64 index into ``fonts``.
        characters: the characters, one per class.
        fonts: font file names (not full paths), sorted.
    """

    images: np.ndarray
    labels: np.ndarray
    font_ids: np.ndarray
    characters: tuple[str, ...]
    fonts: tuple[str, ...]


def glyph_font_files(font_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Paths of the TrueType fonts used, sorted by file name.

    Args:
        font_dir: folder of ``.ttf`` files; default matplotlib's ``mpl-data/fonts/ttf``.

    Raises:
        GlyphFontsError: the folder is missing or holds no usable ``.ttf`` file.
    """
    if font_dir is None:
        import matplotlib

        font_dir = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    font_dir = os.fspath(font_dir)
    if not os.path.isdir(font_dir):
        raise GlyphFontsError(
            f"font folder {font_dir} not found: the glyph benchmark renders matplotlib's "
            "bundled fonts (reinstall matplotlib, or use --dataset digits)"
        )
    names = sorted(
        name
        for name in os.listdir(font_dir)
        if name.lower().endswith(".ttf") and not name.startswith(EXCLUDED_FONTS)
    )
    if not names:
        raise GlyphFontsError(
            f"no usable .ttf font in {font_dir}: the glyph benchmark renders matplotlib's "
            "bundled fonts (reinstall matplotlib, or use --dataset digits)"
        )
    return [os.path.join(font_dir, name) for name in names]


def _is_kept(code: int) -> bool:
    char = chr(code)
    return char.isprintable() and unicodedata.category(char)[0] in _KEPT_CATEGORIES


def _unicode_codes(font: object, tex_encoded: bool, misnamed: str = "") -> list[int]:
    """The code points ``font`` (an ``FT2Font``) draws as themselves: every one of its
    character map, or for a :data:`TEX_ENCODED_FONTS` font those whose glyph's name
    (the Adobe Glyph List's, through fontTools, a matplotlib dependency) is that code
    point's character, but the characters in ``misnamed`` (:data:`TEX_MISNAMED`); a glyph
    of a name the list does not know is left out (cmmi10's old-style digits among them:
    the list maps ``zerooldstyle`` to a private-use code point)."""
    charmap = font.get_charmap()
    if not tex_encoded:
        return list(charmap)
    from fontTools.agl import toUnicode

    return [
        c
        for c, g in charmap.items()
        if toUnicode(font.get_glyph_name(g)) == chr(c) and chr(c) not in misnamed
    ]


def render_glyph(font: object, char: str, size: int) -> np.ndarray | None:
    """``char`` in ``font`` (an ``FT2Font``) as a ``size x size`` uint8 image, or ``None``.

    The glyph is drawn at ``size`` pixels per em, cropped to its ink, shrunk to fit
    if needed and centred. ``None`` when the glyph has no ink (blank glyph).
    """
    font.set_size(size, 72)  # 72 dpi: points are pixels
    font.set_text(char, 0.0)
    font.draw_glyphs_to_bitmap(antialiased=True)
    ink = np.asarray(font.get_image())
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if rows.size == 0:
        return None
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = ink.shape
    if max(height, width) > size:
        from PIL import Image

        factor = size / max(height, width)
        shape = (max(1, round(width * factor)), max(1, round(height * factor)))
        ink = np.asarray(Image.fromarray(ink).resize(shape, Image.BILINEAR))
        height, width = ink.shape
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - height) // 2, (size - width) // 2
    out[top : top + height, left : left + width] = ink
    return out


def build_glyph_set(
    size: int = 32,
    min_fonts: int = 12,
    font_files: Sequence[str] | None = None,
    characters: str | None = None,
    max_classes: int | None = None,
) -> GlyphSet:
    """Render every kept character covered by at least ``min_fonts`` fonts, in every such font.

    Args:
        size: image side in pixels.
        min_fonts: a character becomes a class when at least this many fonts draw it
            (with ink); fewer images per class make retrieval of it meaningless.
        font_files: TrueType files; default :func:`glyph_font_files`.
        characters: restrict to these characters (default: every letter, number,
            punctuation mark and symbol the fonts cover).
        max_classes: keep only the first this many classes (code-point order), for
            quick runs; ``None`` keeps all.

    Raises:
        ValueError: ``size < 8`` or ``min_fonts < 2``, or no character is covered
            by ``min_fonts`` fonts.
        GlyphFontsError: from :func:`glyph_font_files`.
    """
    from matplotlib.ft2font import FT2Font

    if size < 8:
        raise ValueError(f"glyph size must be >= 8 pixels, got {size}")
    if max_classes is not None and max_classes < 2:
        raise ValueError(f"max_classes must be >= 2, got {max_classes}")
    if min_fonts < 2:
        raise ValueError(f"min_fonts must be >= 2 (a class needs two images), got {min_fonts}")
    paths = sorted(font_files or glyph_font_files(), key=os.path.basename)
    fonts = [FT2Font(path) for path in paths]
    wanted = None if characters is None else {ord(c) for c in characters}
    coverage: dict[int, list[int]] = {}
    for font_id, (path, font) in enumerate(zip(paths, fonts, strict=True)):
        name = os.path.basename(path)
        misnamed = next((v for k, v in TEX_MISNAMED.items() if name.startswith(k)), "")
        for code in _unicode_codes(font, name.startswith(TEX_ENCODED_FONTS), misnamed):
            if (wanted is None or code in wanted) and _is_kept(code):
                coverage.setdefault(code, []).append(font_id)
    images, labels, font_ids, chars = [], [], [], []
    for code in sorted(coverage):
        if max_classes is not None and len(chars) == max_classes:
            break
        if len(coverage[code]) < min_fonts:
            continue
        rendered = [(fid, render_glyph(fonts[fid], chr(code), size)) for fid in coverage[code]]
        rendered = [(fid, image) for fid, image in rendered if image is not None]
        if len(rendered) < min_fonts:
            continue
        for fid, image in rendered:
            images.append(image)
            labels.append(len(chars))
            font_ids.append(fid)
        chars.append(chr(code))
    if not chars:
        raise ValueError(
            f"no character is drawn by at least {min_fonts} of the {len(fonts)} fonts "
            f"({', '.join(os.path.basename(p) for p in paths)}); lower min_fonts"
        )
    return GlyphSet(
        images=np.stack(images),
        labels=np.asarray(labels, dtype=np.int64),
        font_ids=np.asarray(font_ids, dtype=np.int64),
        characters=tuple(chars),
        fonts=tuple(os.path.basename(p) for p in paths),
    )


def load_glyph_split(
    size: int = 32,
    min_fonts: int = 12,
    font_files: Sequence[str] | None = None,
    max_classes: int | None = None,
) -> RetrievalData:
    """The glyph set split by character: even class ids train, odd ones are retrieved.

    Training labels are remapped to ``0..C-1``; test labels keep their class ids.
    Pixels are scaled to ``0..1``. ``info`` records the fonts, the characters of each
    split and the counts, for ``results.json``.

    Raises:
        ValueError: ``max_classes < 4``, or fewer than two classes on either side (one
            training class gives every softmax loss 0, one retrieved class every metric
            1), or from :func:`build_glyph_set`.
        GlyphFontsError: matplotlib's fonts are missing.
    """
    import torch
    from torch.utils.data import TensorDataset

    if max_classes is not None and max_classes < 4:
        raise ValueError(
            f"max_classes must be >= 4 (every other character trains: two training and two "
            f"retrieved classes at least), got {max_classes}"
        )
    glyphs = build_glyph_set(
        size=size, min_fonts=min_fonts, font_files=font_files, max_classes=max_classes
    )
    if len(glyphs.characters) < 4:
        raise ValueError(
            f"only {len(glyphs.characters)} characters are drawn by at least {min_fonts} "
            "fonts: the split needs 4 (two training and two retrieved classes); lower min_fonts"
        )
    images = torch.from_numpy(glyphs.images).float().div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(glyphs.labels)
    is_train = labels % 2 == 0
    train_chars = glyphs.characters[0::2]
    test_chars = glyphs.characters[1::2]
    return RetrievalData(
        name="glyphs",
        train=TensorDataset(images[is_train], labels[is_train] // 2),
        test=TensorDataset(images[~is_train], labels[~is_train]),
        num_train_classes=len(train_chars),
        input_shape=(1, size, size),
        info={
            "image_size": size,
            "min_fonts": min_fonts,
            "max_classes": max_classes,
            "fonts": list(glyphs.fonts),
            "train_characters": "".join(train_chars),
            "test_characters": "".join(test_chars),
        },
    )
