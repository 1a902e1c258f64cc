"""Which weighting an MR series is (T1, T1c, T2, FLAIR), decided the way an MR physicist does.

The acquisition attributes come first (PS3.3 C.8.3.1 MR Image module, C.8.13 Enhanced MR):
what the scanner did says what the image shows, whatever the technologist typed. A series is
passed over, with the reason, when it is not an image of one weighting a segmentation model
can read: a localizer, derived images and maps (ADC, perfusion, MIP, phase), a mask stored as
an MR image (binary pixels), echo-planar, diffusion, dynamic, angiographic, susceptibility
(T2*) or steady-state acquisitions, several echoes in one series, or proton density. What is
left is weighted by its timing:

- inversion recovery with TI >= 1400 ms and TE >= 60 ms nulls CSF: FLAIR;
- inversion recovery with TI 300-1400 ms and a short TE (MPRAGE, BRAVO, T1-FLAIR): T1;
- inversion recovery with TI < 300 ms: STIR, passed over;
- no inversion, TE >= 60 ms and TR >= 1500 ms, spin echo: T2;
- no inversion, TE <= 30 ms and TR <= 1200 ms (spin echo or spoiled gradient echo): T1;
- a T1 with a contrast agent recorded (Contrast/Bolus Agent, or enhanced Contrast/Bolus
  Usage), or post-contrast wording in its description, is T1c; pre-contrast wording wins.

Only a series without timing attributes is weighted by its description, and says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dicom_node.facts import SeriesFacts

WEIGHTINGS = ("T1c", "T1", "T2", "FLAIR")

FLAIR_MIN_TI_MS = 1400.0  # CSF (T1 ~4 s) nulls at TI ~ 0.69 T1 with a long TR
STIR_MAX_TI_MS = 300.0  # fat (T1 ~250-350 ms) nulls at TI ~150-250 ms
LONG_TE_MS = 60.0  # T2 contrast needs TE of the order of tissue T2 (~70-100 ms)
SHORT_TE_MS = 30.0
T1_MAX_TR_MS = 1200.0  # spin-echo T1 runs TR 400-800 ms (up to ~1000 at 3 T)
T2_MIN_TR_MS = 1500.0
T2_STAR_MIN_TE_MS = 15.0  # a gradient echo this late is T2*-weighted (SWI, GRE)

# Words in descriptions. Written without \b so that "sT2", "FLAIR_ROI" and "T1_MPRAGE" match:
# scanners join words with underscores, slashes and prefixes.
_NOT_LETTER_BEFORE = r"(?<![a-z])"
_NOT_LETTER_AFTER = r"(?![a-z])"


def _words(*words: str) -> re.Pattern[str]:
    return re.compile("(?i)" + _NOT_LETTER_BEFORE + "(" + "|".join(words) + ")" + _NOT_LETTER_AFTER)


_LOCALIZER = _words(
    "localizer", "localiser", "loc", "scout", "survey", "tripilot", "3-?plane", "aahead_scout",
    "aahead", "calibration", "asset_cal", "cal",
)  # fmt: skip
_MASK = _words(
    "roi", "rois", "mask", "seg", "segmentation", "label", "labels", "labelmap", "lesion",
    "lesions", "contour", "contours",
)  # fmt: skip
_DIFFUSION = _words("dwi", "dti", "diff", "diffusion", "trace", "tracew", "adc", "dmri", "b\\d+")
_DYNAMIC = _words(
    "perf", "perfusion", "dsc", "dce", "asl", "pcasl", "pasl", "dynamic", "dyn", "bolus",
    "cbf", "cbv", "rcbv", "mtt", "ttp", "bold", "rest", "rsfmri", "fmri", "resting",
)  # fmt: skip
# Not "pc": sites abbreviate post-contrast so; phase-contrast images say VELOCITY or P.
_ANGIO = _words("tof", "angio", "mra", "mrv", "venc")
_SUSCEPTIBILITY = _words(
    "swi", "swip", "swan", "venobold", "susceptibility", "t2\\*", "t2star", "hemo", "mip", "minip",
    "mnip", "pha", "phase", "mag",
)  # fmt: skip
_STEADY_STATE = _words("ciss", "fiesta", "truefisp", "trufi", "bffe", "bssfp", "space_ciss")
_FIELD_MAP = _words("b0", "b1", "fmap", "field_?map", "field_mapping", "fieldmap", "shim")
_POST = re.compile(
    r"(?i)(\+\s*c(?![a-z])|(?<![a-z])(gd|gad|gado|post|postcontrast|contrast|ce|kontrast|km|mdc)"
    r"(?![a-z])|(?<![a-z])c\+|_c(?![a-z])|\(c\))"
)
_PRE = re.compile(
    r"(?i)(?<![a-z])(pre|precontrast|pre-contrast|nativ|native|sans|w/?o|without|no contrast)"
    r"(?![a-z])"
)
# Descriptions as a tie-breaker (several series of one weighting) and the last resort.
_DESCRIBES = {
    "FLAIR": re.compile(r"(?i)(flair|dark[-_ ]?fluid|tirm|(?<![a-z])fl(?![a-z]))"),
    "T2": re.compile(
        r"(?i)(t2(?![\s_]*\*|star|map)|(?<![a-z])(tse|fse|frfse|haste|cube)(?![a-z]))"
    ),
    "T1": re.compile(r"(?i)(t1(?!\s*map)|mprage|mp-rage|spgr|bravo|tfl|vibe|flash|tfe)"),
}
# ImageType values (PS3.3 C.7.6.1.1.2, C.8.13.1.1.1 and the vendors' value 3+) of images a
# sequence did not acquire as such: maps, projections, phase, subtractions, mosaics of EPI.
_MAP_IMAGE_TYPES = frozenset(
    {
        "ADC", "TRACEW", "FA", "COLFA", "EXP", "DIFFUSION", "PERFUSION", "CBF", "CBV", "RCBV",
        "MTT", "TTP", "T1 MAP", "T2 MAP", "T1_MAP", "T2_MAP", "T2STAR_MAP", "R2", "R2STAR",
        "PHASE", "P", "R", "I", "MIP", "MNIP", "MINIP", "SWI", "SUBTRACTION", "SUB",
        "PROJECTION IMAGE", "MOSAIC", "EPI", "FIELD_MAP", "B0", "B1", "ANGIO", "VELOCITY",
    }
)  # fmt: skip


@dataclass(frozen=True)
class MrClass:
    """A series' weighting, or None when it is passed over; ``reason`` says why in words.

    ``basis`` is "acquisition" (decided from the acquisition attributes), "description" (no
    timing attributes: decided from the words), or "excluded".
    """

    weighting: str | None
    reason: str
    basis: str


def _excluded(reason: str) -> MrClass:
    return MrClass(None, reason, "excluded")


def _tokens(values: tuple[str, ...]) -> set[str]:
    """Code values split on vendor separators too: Canon writes ScanningSequence 'SE_EP'."""
    return {t for v in values for t in re.split(r"[\\_/ ]+", v) if t}


def _ms(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def describes(weighting: str, facts: SeriesFacts) -> bool:
    """Whether the series' own words (description and protocol name) name this weighting."""
    text = f"{facts.description} {facts.protocol}"
    if weighting == "T1c":
        return bool(_DESCRIBES["T1"].search(text) and _POST.search(text))
    if weighting == "T2" and _DESCRIBES["FLAIR"].search(text):
        return False
    return bool(_DESCRIBES[weighting].search(text))


def _is_mask(facts: SeriesFacts) -> str | None:
    mr = facts.mr
    if mr.bits_stored == 1:
        return "a mask: Bits Stored 1"
    if mr.largest_pixel_value is not None and mr.largest_pixel_value <= 1:
        return "a mask: Largest Image Pixel Value 1"
    if mr.distinct_pixel_values is not None and mr.distinct_pixel_values <= 2:
        return "a mask: its pixels take only two values"
    if _MASK.search(facts.description):
        return "a mask or ROI by its description"
    return None


def _passed_over(facts: SeriesFacts) -> str | None:
    """Why this MR series is no T1/T1c/T2/FLAIR image a model may read, or None."""
    mr, text, image_type = facts.mr, facts.description, facts.image_type
    scanning = _tokens(mr.scanning_sequence)
    if "LOCALIZER" in image_type or _LOCALIZER.search(text):
        return "a localizer"
    if image_type[:1] == ("DERIVED",):
        return "derived images (Image Type DERIVED)"
    if (mr.max_b_value or 0) > 0 or mr.acquisition_contrast == "DIFFUSION":
        return "diffusion-weighted"
    name = mr.sequence_name.lower().lstrip("*")
    if "EP" in scanning or mr.echo_planar or name.startswith(("ep", "epfid", "epse")):
        return "echo-planar (EP): distorted, not an anatomical image"
    maps = sorted(_MAP_IMAGE_TYPES.intersection(image_type[2:]))
    if maps or any(v.startswith(("P_", "R_", "I_")) for v in image_type[2:]):
        return f"a map or derived image (Image Type {'/'.join(image_type)})"
    if mr.complex_component in {"PHASE", "REAL", "IMAGINARY", "MIXED"}:
        return f"{mr.complex_component.lower()} images, not magnitude"
    mask = _is_mask(facts)
    if mask:
        return mask
    if mr.acquisition_contrast == "PERFUSION" or mr.temporal_positions > 1:
        return f"dynamic ({mr.temporal_positions} temporal positions)"
    if mr.angio or mr.acquisition_contrast in {"TOF", "FLOW_ENCODED"}:
        return "angiography"
    if len(mr.echo_times_ms) > 1:
        times = ", ".join(f"{t:g}" for t in mr.echo_times_ms)
        return f"several echoes in one series (TE {times} ms)"
    if mr.images_per_position > 1:
        return f"{mr.images_per_position} images per slice position (dynamic or multi-contrast)"
    if mr.steady_state in {"TRANSVERSE", "TIME_REVERSED", "FREE_PRECESSION"}:
        return "steady-state free precession"
    for words, what in (
        (_DIFFUSION, "diffusion by its description"),
        (_DYNAMIC, "dynamic, perfusion or functional by its description"),
        (_ANGIO, "angiography by its description"),
        (_SUSCEPTIBILITY, "susceptibility/T2* gradient echo by its description"),
        (_STEADY_STATE, "steady-state free precession by its description"),
        (_FIELD_MAP, "a field map by its description"),
    ):
        if words.search(text):
            return what
    return None


def _timing_weighting(facts: SeriesFacts) -> MrClass | None:
    """The weighting from the acquisition attributes; None when they do not say."""
    mr = facts.mr
    scanning = _tokens(mr.scanning_sequence)
    tr, ti = mr.repetition_time_ms, mr.inversion_time_ms
    te = mr.echo_times_ms[0] if mr.echo_times_ms else None
    contrast = mr.acquisition_contrast
    timing = f"TR {_ms(tr)} / TE {_ms(te)}" + (f" / TI {_ms(ti)}" if ti else "") + " ms"
    if contrast == "FLUID_ATTENUATED":
        return MrClass("FLAIR", f"Acquisition Contrast FLUID_ATTENUATED ({timing})", "acquisition")
    if contrast == "STIR":
        return _excluded("STIR (Acquisition Contrast)")
    if contrast == "PROTON_DENSITY":
        return _excluded("proton-density weighted (Acquisition Contrast)")
    if contrast == "T2_STAR":
        return _excluded("T2*-weighted (Acquisition Contrast)")
    inversion = (
        "IR" in scanning
        or mr.inversion_recovery is True
        or "IR" in _tokens(mr.scan_options)
        or ti is not None
    )
    gradient_only = (
        "GR" in scanning and "SE" not in scanning
    ) or mr.echo_pulse_sequence == "GRADIENT"
    if te is None or (tr is None and not inversion):
        if contrast in {"T1", "T2"}:
            return MrClass(contrast, f"Acquisition Contrast {contrast}", "acquisition")
        return None
    if inversion:
        if ti is None:
            if te >= LONG_TE_MS and (tr or 0) >= 4000:
                return MrClass(
                    "FLAIR", f"inversion recovery, long TR and TE ({timing})", "acquisition"
                )
            if te <= SHORT_TE_MS:
                return MrClass("T1", f"inversion-prepared, short TE ({timing})", "acquisition")
            return _excluded(f"inversion recovery without TI, TE {te:g} ms: weighting unclear")
        if ti < STIR_MAX_TI_MS:
            return _excluded(f"short-TI inversion recovery (STIR, {timing})")
        if ti >= FLAIR_MIN_TI_MS:
            if te >= LONG_TE_MS:
                return MrClass("FLAIR", f"inversion recovery nulling CSF ({timing})", "acquisition")
            return _excluded(f"long-TI inversion with a short TE ({timing}): not a FLAIR")
        if te <= SHORT_TE_MS:
            return MrClass("T1", f"inversion-prepared T1 ({timing})", "acquisition")
        return _excluded(f"inversion recovery with TI {ti:g} ms and TE {te:g} ms: unclear")
    assert tr is not None
    if gradient_only and te >= T2_STAR_MIN_TE_MS:
        return _excluded(f"T2*-weighted gradient echo ({timing})")
    if te >= LONG_TE_MS and tr >= T2_MIN_TR_MS:
        return MrClass("T2", f"spin echo, long TR and TE ({timing})", "acquisition")
    if te <= SHORT_TE_MS and tr <= T1_MAX_TR_MS:
        kind = "spoiled gradient echo" if gradient_only else "short TR and TE"
        return MrClass("T1", f"{kind} ({timing})", "acquisition")
    if te <= SHORT_TE_MS and tr >= T2_MIN_TR_MS:
        return _excluded(f"proton-density weighted: long TR, short TE ({timing})")
    return _excluded(f"{timing}: neither T1- nor T2-weighted")


def _after_contrast(facts: SeriesFacts) -> str | None:
    """Why this T1 series is post-contrast, or None (pre-contrast wording wins)."""
    text = facts.description
    if _PRE.search(text):
        return None
    if facts.mr.contrast_agent and facts.mr.contrast_agent.upper() not in {"NONE", "NO", "N"}:
        return "Contrast/Bolus Agent recorded"
    if facts.mr.contrast_administered:
        return "Contrast/Bolus Agent Administered YES"
    if _POST.search(text):
        return "post-contrast by its description"
    return None


def classify(facts: SeriesFacts) -> MrClass:
    """The weighting of one MR series, or why it is passed over; always with a reason."""
    if facts.modality != "MR":
        return _excluded(f"modality {facts.modality or '(none)'}, not MR")
    why_not = _passed_over(facts)
    if why_not is not None:
        return _excluded(why_not)
    found = _timing_weighting(facts)
    if found is None:
        for weighting in ("FLAIR", "T2", "T1"):
            if describes(weighting, facts):
                found = MrClass(
                    weighting, "by its description only (no timing attributes)", "description"
                )
                break
        else:
            return _excluded("no timing attributes, and its description names no weighting")
    if found.weighting == "T1":
        post = _after_contrast(facts)
        if post is not None:
            return MrClass("T1c", f"{found.reason}, after contrast: {post}", found.basis)
    return found


def never_a_role(facts: SeriesFacts) -> str | None:
    """Why an MR series may take no role whatever a rule's conditions say: a mask, a
    localizer or derived images are no acquisition a model was trained on; None otherwise."""
    if facts.modality != "MR":
        return None
    image_type = facts.image_type
    if "LOCALIZER" in image_type:
        return "a localizer (Image Type LOCALIZER)"
    if image_type[:1] == ("DERIVED",):
        return "derived images (Image Type DERIVED)"
    return _is_mask(facts)
