"""Burned-in text of the heat-map SC: legible, fill inside its outline, inside the image, at every
size from a 256 px phantom to a 4096 px detector (issue 14, item 4: the OpenCV text drawn twice
drifted apart on images under about 1050 px and doubled the DEMO warning)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydicom import dcmread
from scipy import ndimage

from dicom_node.algorithm import (
    DEMO_WARNING,
    AlgorithmResult,
    Classification,
    HeatMap,
    SeriesInput,
    Weights,
)
from dicom_node.burn_in import AREA_FRACTION, MIN_LEGIBLE_PX, burn_in, font, layout, printable
from dicom_node.display import displayed_image
from dicom_node.phantoms import cxr_dataset
from dicom_node.write import Provenance, heat_map_capture
from dicom_node_algorithms.pneumonia_cxr import CXR_SPEC
from tests.support.cases import capture_of
from tests.support.paths import CORPUS_CXR

pytestmark = pytest.mark.unit

LINES = [
    "AI pneumonia-cxr 1.0.0: Pneumonia Grad-CAM",
    "Pneumonia: POSITIVE  p=0.81 (threshold 0.57)",
    DEMO_WARNING,
]
# Square detectors from a small phantom to a large flat panel, the qa phantom, a portrait CR and
# two extreme strips.
SHAPES = [
    (256, 256),
    (512, 512),
    (1024, 1024),
    (2048, 2048),
    (4096, 4096),
    (CXR_SPEC.rows, CXR_SPEC.columns),
    (3000, 2500),
    (256, 3000),
    (3000, 256),
]
GREEN = (0, 150, 0)  # no blend of the white fill and the black outline is green


def draw(shape: tuple[int, int], lines: list[str], background=GREEN) -> np.ndarray:
    picture = np.empty((*shape, 3), np.uint8)
    picture[...] = background
    burn_in(picture, lines)
    return picture


def fill_of(picture: np.ndarray) -> np.ndarray:
    """Fill: white over the outline at 38 % coverage or more (red >= 96; at less, thin diagonals
    of 11 px glyphs break apart). White blended with the green background instead, a fill outside
    its outline, is greener than this (green - red = 150 x the background's share)."""
    r, g = picture[..., 0].astype(int), picture[..., 1].astype(int)
    return (r >= 96) & (np.abs(g - r) <= 30)


def components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=np.ones((3, 3)))[1])


def reference_components(text: str) -> int:
    """Glyph parts of ``text`` drawn plainly by Pillow at 64 px, large enough that no two glyphs
    touch: "i", ":" and "=" count two, most characters one."""
    typeface = font(64)
    left, top, right, bottom = typeface.getbbox(text)
    canvas = Image.new("L", (right - left + 20, bottom - top + 20))
    ImageDraw.Draw(canvas).text((10 - left, 10 - top), text, fill=255, font=typeface)
    return components(np.asarray(canvas) >= 128)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_fill_lies_inside_its_outline(shape) -> None:
    """The bug: the fill, drawn apart from the outline, lay beside it on the image. Every fill
    pixel must be enclosed: none of its 8 neighbours is untouched background."""
    picture = draw(shape, LINES)
    fill = fill_of(picture)
    untouched = (picture == GREEN).all(axis=-1)
    leaked = fill & ndimage.binary_dilation(untouched, structure=np.ones((3, 3)))
    assert fill.sum() > 0
    assert leaked.sum() == 0, f"{leaked.sum()} fill pixels touch the background"


def test_the_fill_lies_inside_its_outline_on_a_real_radiograph(corpus) -> None:
    """The same on the corpus radiograph's own pixels. A text pixel can match the radiograph
    by chance, so the text is drawn on the radiograph and on its negative: background is what
    both kept, fill what is near-white in both."""
    grey = displayed_image(dcmread(corpus / CORPUS_CXR))
    grey = ((grey - grey.min()) / max(float(np.ptp(grey)), 1e-6) * 255).astype(np.uint8)
    backgrounds = [np.repeat(g[..., None], 3, axis=-1) for g in (grey, 255 - grey)]
    drawn = [b.copy() for b in backgrounds]
    for picture in drawn:
        burn_in(picture, LINES)
    untouched = np.logical_and.reduce(
        [(d == b).all(axis=-1) for d, b in zip(drawn, backgrounds, strict=True)]
    )
    fill = np.logical_and.reduce([(d >= 230).all(axis=-1) for d in drawn])
    leaked = fill & ndimage.binary_dilation(untouched, structure=np.ones((3, 3)))
    assert fill.sum() > 500
    assert leaked.sum() == 0, f"{leaked.sum()} fill pixels touch the radiograph"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_text_stays_inside_the_image_and_its_annotation_area(shape) -> None:
    picture = draw(shape, LINES)
    ink = (picture != GREEN).any(axis=-1)
    rows, columns = np.nonzero(ink)
    # Ink clear of every edge: nothing was clipped by the image border.
    assert rows.min() > 0 and columns.min() > 0
    assert rows.max() < shape[0] - 1 and columns.max() < shape[1] - 1
    assert rows.max() < shape[0] * AREA_FRACTION  # off the lungs, in the top band
    placed = layout(*shape, LINES)
    left, top, right, bottom = placed.box
    assert left <= columns.min() and top <= rows.min()
    assert right > columns.max() and bottom > rows.max()


def test_the_text_height_scales_with_the_image() -> None:
    """Cap height (plus outline) of one capitals line: at least legible on small images,
    proportional to the width above that."""

    def height(width: int) -> int:
        rows = np.nonzero((draw((width, width), [DEMO_WARNING]) != GREEN).any(axis=-1))[0]
        return int(rows.max() - rows.min() + 1)

    heights = {width: height(width) for width in (256, 512, 1024, 2048, 4096)}
    assert min(heights.values()) >= 0.7 * MIN_LEGIBLE_PX  # a capital's height at the minimum
    assert heights[2048] / heights[1024] == pytest.approx(2.0, rel=0.1)
    assert heights[4096] / heights[1024] == pytest.approx(4.0, rel=0.1)
    assert heights[1024] / 1024 == pytest.approx(1 / 55, rel=0.25)  # about 19 px at 1024


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("line", LINES)
def test_each_line_is_legible(shape, line) -> None:
    """Drawn alone, a line's fill has the glyph parts of Pillow's own large rendering of the
    string (none merged by the outline, none lost), and its shape: one or more lines of text
    whose extent matches the string's."""
    picture = draw(shape, [line])
    fill = fill_of(picture)
    assert components(fill) == reference_components(line)
    rows, columns = np.nonzero(fill)
    height = rows.max() - rows.min() + 1
    width = columns.max() - columns.min() + 1
    wrapped = len(layout(*shape, [line]).lines)
    # One band of rows with fill per line drawn, separated by rows without.
    bands = ndimage.label(fill.any(axis=1))[1]
    assert bands == wrapped
    if wrapped == 1:
        left, top, right, bottom = font(64).getbbox(line)
        expected = (right - left) / (bottom - top)
        # The drawn text is wider: one outline width between characters (a sixth at 11 px).
        assert expected * 0.9 <= width / height <= expected * 1.4
        assert fill.sum() / (height * width) > 0.1  # strokes, not a blob or a speckle


@pytest.mark.parametrize("width", [256, 512])
def test_a_line_too_long_is_wrapped_never_cut(width) -> None:
    words = "Consolidation right lower lobe with air bronchogram " * 4
    unbroken = "X" * 60  # no space to wrap at: broken between characters
    lines = [words.strip(), unbroken, DEMO_WARNING]
    placed = layout(width, width, lines)
    assert len(placed.lines) > len(lines)
    drawn = "".join(placed.lines).replace(" ", "")
    assert drawn == "".join(lines).replace(" ", "")
    picture = draw((width, width), lines)
    ink = (picture != GREEN).any(axis=-1)
    rows, columns = np.nonzero(ink)
    assert columns.min() > 0 and columns.max() < width - 1 and rows.max() < width - 1
    # Every glyph is there: as many fill parts as the whole text has.
    assert components(fill_of(picture)) == sum(reference_components(line) for line in lines)


def test_a_small_image_gets_smaller_text_and_a_tiny_one_is_refused(caplog) -> None:
    picture = draw((64, 64), LINES)
    ink = (picture != GREEN).any(axis=-1)
    rows, columns = np.nonzero(ink)
    assert ink.sum() > 0 and rows.max() < 63 and columns.max() < 63
    assert "below the legible" in caplog.text
    with pytest.raises(ValueError, match="cannot hold"):
        draw((4, 4), LINES)
    nothing = draw((64, 64), [])
    assert (nothing == GREEN).all()
    with pytest.raises(ValueError, match="uint8 RGB"):
        burn_in(np.zeros((64, 64), np.uint8), LINES)


def test_characters_outside_the_font_are_folded_not_boxed() -> None:
    """The packaged Aileron has printable ASCII only: accents are dropped, the rest "?"."""
    assert printable("Lungenentzündung\tµ 5°") == "Lungenentzundung ? 5?"
    picture = draw((512, 512), ["Lungenentzündung"])
    assert components(fill_of(picture)) == reference_components("Lungenentzundung")


@pytest.mark.parametrize("source", ["corpus", "qa-phantom"])
def test_the_capture_burns_the_text_into_its_annotation_area(tmp_path, corpus, source) -> None:
    """Two captures of one radiograph whose verdicts differ differ only in the top band, and
    there enough to be seen; the SC says its annotation is burned in."""
    if source == "corpus":
        path = corpus / CORPUS_CXR
    else:
        path = tmp_path / "qa-cxr.dcm"
        cxr_dataset(CXR_SPEC).save_as(path, enforce_file_format=True)
    positive, _ = capture_of(path, 0.81)
    negative, _ = capture_of(path, 0.23)
    assert positive.BurnedInAnnotation == negative.BurnedInAnnotation == "YES"
    a, b = positive.pixel_array, negative.pixel_array
    rows = np.nonzero((a != b).any(axis=-1))[0]
    assert rows.size > 100
    assert rows.max() < a.shape[0] * AREA_FRACTION


@pytest.mark.parametrize("source", ["corpus", "qa-phantom"])
def test_the_capture_draws_each_fill_inside_its_outline(tmp_path, corpus, source) -> None:
    """The SC as written: with the heat map at 1 everywhere every radiograph pixel is tinted red
    (red - green = 64), while text is grey (white fill, black outline and their blends). A
    near-white pixel next to a tinted one is fill outside its outline."""
    if source == "corpus":
        path = corpus / CORPUS_CXR
    else:
        path = tmp_path / "qa-cxr.dcm"
        cxr_dataset(CXR_SPEC).save_as(path, enforce_file_format=True)
    rows, columns = dcmread(path).pixel_array.shape
    result = AlgorithmResult(
        "pneumonia-cxr",
        "1.0.0",
        demo=True,
        classifications=[Classification("Pneumonia", 0.81, 0.57)],
        heatmaps=[HeatMap("Pneumonia Grad-CAM", np.ones((rows, columns)))],
    )
    provenance = Provenance("pneumonia-cxr", "1.0.0", Weights(None, None, True))
    capture = heat_map_capture(
        result, {"series": SeriesInput("1", (path,))}, provenance, series_number=903
    )
    pixels = capture.pixel_array.astype(int)
    tinted = pixels[..., 0] - pixels[..., 1] >= 60
    fill = (pixels >= 230).all(axis=-1)
    leaked = fill & ndimage.binary_dilation(tinted, structure=np.ones((3, 3)))
    assert tinted.mean() > 0.8 and fill.sum() > 200
    assert leaked.sum() == 0, f"{leaked.sum()} fill pixels touch the radiograph"
