"""Text burned into the pixels of a Secondary Capture (the heat-map SC's verdict and DEMO warning).

Burned-in text is pixel data, so a viewer shows it whatever it does with the header, which is why
the SC says Burned In Annotation (0028,0301) YES (PS3.3 C.7.6.1, C.8.6.2). It must therefore be
legible on every image size the node meets, and never leave the image: the text is drawn with a
real font (Pillow's packaged FreeType build of Aileron Regular, ``ImageFont.load_default(size)``:
no system font and no extra dependency, so the Docker image renders the same glyphs as CI), white
with a dark outline placed from the same glyph positions, so the fill always lies inside its
outline, and scaled to the image. A line too wide is wrapped (at spaces, else between characters)
and the font shrunk until the block fits: nothing is cut off.
"""

from __future__ import annotations

import functools
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dicom_node.errors import TooSmallForText

logger = logging.getLogger(__name__)

#: Font size (em, pixels) as a fraction of the image's shorter side: 26 px (capitals 19 px high)
#: on a 1024 px radiograph, a little larger than the OpenCV text was.
FONT_FRACTION = 1 / 40
#: Capitals 8 px high: the smallest size at which the heat-map lines keep every glyph's fill whole
#: and apart under a 1 px outline (tests/test_burn_in.py counts them). Smaller only when the image
#: leaves no room for more.
MIN_LEGIBLE_PX = 11
#: The text block stays in the top part of the image (the annotation area), off the lungs, unless
#: the image is too small for legible text there.
AREA_FRACTION = 1 / 3
#: Wrapped continuation lines are indented, so a reader sees where each original line starts.
CONTINUATION = "  "
FILL = (255, 255, 255)
OUTLINE = (0, 0, 0)


@dataclass(frozen=True)
class TextLayout:
    """Where and how the lines are drawn; ``box`` bounds every pixel the text touches."""

    size: int  # font em size, pixels
    stroke: int  # outline width, pixels
    lines: tuple[str, ...]  # as drawn: ASCII, wrapped
    origins: tuple[tuple[int, int], ...]  # each line's left/ascender anchor ("la")
    box: tuple[int, int, int, int]  # left, top, right, bottom (exclusive), outline included


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's packaged Aileron Regular at ``size`` px. load_default(size) needs Pillow >= 10.1
    built with FreeType (every wheel is); without FreeType it raises rather than fall back to
    the fixed-size bitmap font. The basic layout engine: ASCII needs no shaping, and raqm
    (optional, a system library) would make the layout depend on the host."""
    packaged = ImageFont.load_default(size=size)
    if not isinstance(packaged, ImageFont.FreeTypeFont):  # pragma: no cover - Pillow < 10.1
        raise RuntimeError("Pillow >= 10.1 with FreeType is needed to draw burned-in text")
    return packaged.font_variant(layout_engine=ImageFont.Layout.BASIC)


def printable(text: str) -> str:
    """The text in the characters the packaged font has (printable ASCII): accents are dropped
    ("é" -> "e"), other characters become "?" and control characters a space, so no glyph is
    drawn as a missing-glyph box. The exact wording stays in the SR and the header."""
    decomposed = unicodedata.normalize("NFKD", text)
    out = []
    for char in decomposed:
        if unicodedata.combining(char):
            continue
        if " " <= char <= "~":
            out.append(char)
        else:
            out.append(" " if char.isspace() or unicodedata.category(char)[0] == "C" else "?")
    return "".join(out)


def _wrap(line: str, fits: Callable[[str], bool]) -> list[str]:
    """Greedy wrapping at spaces, continuation lines indented; a word wider than the line is
    split between characters."""
    if fits(line):
        return [line]
    pieces: list[str] = []
    current = ""

    def flush() -> None:
        nonlocal current
        if current.strip():
            pieces.append(current.rstrip())
        current = CONTINUATION if pieces else ""

    for word in re.findall(r"\S+\s*", line):
        if not fits(current + word.rstrip()):
            flush()
        if fits(current + word.rstrip()):
            current += word
            continue
        for char in word:
            if current.strip() and not fits(current + char):
                flush()
            current += char  # a character wider than the line leaves the caller to shrink
    flush()
    return pieces or [""]


@functools.lru_cache(maxsize=4096)
def _glyph_box(size: int, stroke: int, char: str) -> tuple[int, int, int, int]:
    left, top, right, bottom = font(size).getbbox(char, stroke_width=stroke, anchor="la")
    # A FreeType font's box is in whole pixels; Pillow types every font's box as float.
    return int(left), int(top), int(right), int(bottom)


def _glyphs(text: str, size: int, stroke: int) -> list[tuple[int, str]]:
    """Each visible character with its offset from the line's origin. The outline widens every
    glyph by ``stroke`` on each side while the font's advances assume none, so outlines of
    neighbours would merge ("DEMOMODEL" at 11 px); ``stroke`` extra pixels per character keep
    them apart. The basic layout has no kerning to lose by placing characters one by one."""
    typeface = font(size)
    glyphs = []
    x = 0
    for char in text:
        if not char.isspace():
            glyphs.append((x, char))
        x += round(typeface.getlength(char)) + stroke
    return glyphs


def _extent(text: str, size: int, stroke: int) -> tuple[int, int, int, int] | None:
    """The ink of ``text`` (outline included) relative to its origin; None when blank."""
    boxes = [
        (x + left, top, x + right, bottom)
        for x, char in _glyphs(text, size, stroke)
        for left, top, right, bottom in [_glyph_box(size, stroke, char)]
    ]
    if not boxes:
        return None
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _fit(lines: Sequence[str], size: int, width: int, bottom: int) -> TextLayout | None:
    """The layout at ``size`` whose ink lies in [0, width) x [0, bottom - margin), or None."""
    stroke = max(1, round(size / 12))
    margin = max(1, round(size / 3))

    def fits(text: str) -> bool:
        ink = _extent(text, size, stroke)
        # Measured from the origin, so a continuation's indent counts.
        return ink is None or ink[2] - min(0, ink[0]) <= width - 2 * margin

    drawn = [piece for line in lines for piece in _wrap(line, fits)]
    if not all(fits(text) for text in drawn):
        return None  # a single character wider than the image
    ascent, descent = font(size).getmetrics()
    pitch = ascent + descent + 2 * stroke + max(1, round(size * 0.1))
    extents = [_extent(text, size, stroke) or (0, 0, 0, 0) for text in drawn]
    # Outlines start at the margin whatever the glyphs' bearings; lines share one origin column.
    x0 = margin - min([0, *(left for left, _, _, _ in extents)])
    y0 = margin - min([0, *(top for _, top, _, _ in extents)])
    origins = tuple((x0, y0 + i * pitch) for i in range(len(extents)))
    ink = [
        (x + ext[0], y + ext[1], x + ext[2], y + ext[3])
        for (x, y), ext in zip(origins, extents, strict=True)
        if ext[2] > ext[0]
    ]
    if not ink:
        box = (margin, margin, margin, margin)
    else:
        box = (
            min(b[0] for b in ink),
            min(b[1] for b in ink),
            max(b[2] for b in ink),
            max(b[3] for b in ink),
        )
    if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > bottom - margin:
        return None
    return TextLayout(size, stroke, tuple(drawn), origins, box)


def layout(height: int, width: int, lines: Sequence[str]) -> TextLayout:
    """The largest layout up to the image's proportional size that fits: first in the top
    ``AREA_FRACTION`` at a legible size, then (small images only) anywhere in the image at
    whatever size fits, with a warning. An image too small for any of it is refused."""
    if height < 1 or width < 1:
        raise TooSmallForText(f"cannot burn text into a {height} x {width} image")
    text = [printable(line) for line in lines]
    proportional = max(MIN_LEGIBLE_PX, round(min(height, width) * FONT_FRACTION))
    area = max(1, int(height * AREA_FRACTION))
    for size in range(proportional, MIN_LEGIBLE_PX - 1, -1):
        if (fitted := _fit(text, size, width, area)) is not None:
            return fitted
    for size in range(proportional, 0, -1):
        if (fitted := _fit(text, size, width, height)) is not None:
            if size < MIN_LEGIBLE_PX:
                logger.warning(
                    "a %d x %d image holds its burned-in text only at %d px, below the legible "
                    "%d px",
                    height,
                    width,
                    size,
                    MIN_LEGIBLE_PX,
                )
            return fitted
    raise TooSmallForText(
        f"a {height} x {width} image cannot hold {len(text)} lines of burned-in text"
    )


def burn_in(picture: np.ndarray, lines: Sequence[str]) -> TextLayout:
    """Draw ``lines`` top left on ``picture`` (uint8, rows x columns x RGB), in place: white with
    a dark outline, sized to the image (see :func:`layout`). Returns where the text went."""
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB picture, got {picture.dtype} {picture.shape}")
    placed = layout(picture.shape[0], picture.shape[1], lines)
    # Only the rows the text covers go through Pillow: a 4096 px image is 48 MB to copy twice.
    band = picture[: placed.box[3]]
    image = Image.fromarray(np.ascontiguousarray(band))
    draw = ImageDraw.Draw(image)
    typeface = font(placed.size)
    glyphs = [
        ((x + dx, y), char)
        for text, (x, y) in zip(placed.lines, placed.origins, strict=True)
        for dx, char in _glyphs(text, placed.size, placed.stroke)
    ]
    # Every outline first, then every fill, as Pillow does for a whole string: a neighbour's
    # outline never covers a fill, and the fill's positions are the outline's.
    for origin, char in glyphs:
        draw.text(
            origin,
            char,
            fill=OUTLINE,
            font=typeface,
            anchor="la",
            stroke_width=placed.stroke,
            stroke_fill=OUTLINE,
        )
    for origin, char in glyphs:
        draw.text(origin, char, fill=FILL, font=typeface, anchor="la")
    band[...] = np.asarray(image)
    return placed
