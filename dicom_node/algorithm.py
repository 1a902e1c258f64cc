"""The algorithm plugin API: what an algorithm declares, what it is given, what it returns.

An algorithm is a subclass of :class:`Algorithm` registered under the Python entry-point group
``dicom_node.algorithms`` (``[project.entry-points."dicom_node.algorithms"]`` in its
pyproject), so a third-party package adds one without touching the node, and the node never
imports an algorithm by name. An algorithm knows nothing of networking or DICOM writing: it
receives stored series as :class:`SeriesInput` (Part-10 files it may read, or a highdicom
volume) and returns an :class:`AlgorithmResult` of plain data — masks in the voxel grid of a
named input, findings in patient coordinates (LPS, mm), classifications, heat maps — which the
node turns into DICOM.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib.metadata import entry_points
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import RE_VALID_UID, UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

if TYPE_CHECKING:
    import highdicom as hd

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dicom_node.algorithms"
SERIES_INPUT = "series"  # the input name of an algorithm that takes one series
DEMO_WARNING = "DEMO MODEL - NOT FOR CLINICAL USE"


@dataclass(frozen=True)
class InputSpec:
    """What an algorithm takes: one series, or a study with one series per named role."""

    roles: tuple[str, ...] = (SERIES_INPUT,)

    def __post_init__(self) -> None:
        if not self.roles or len(set(self.roles)) != len(self.roles):
            raise ValueError("roles must be distinct and at least one")

    @property
    def is_study(self) -> bool:
        return self.roles != (SERIES_INPUT,)


@dataclass(frozen=True)
class SeriesInput:
    """One stored series handed to an algorithm (read-only files of the node's store)."""

    series_uid: str
    paths: tuple[Path, ...]

    def datasets(self) -> list[Dataset]:
        """Every instance, pixel data included, in the order stored (not sorted).

        Big-endian instances (a retired transfer syntax we still accept) come back re-encoded
        as Explicit VR Little Endian, the only byte order highdicom reads. Read once: the
        algorithm and then the writers use the same data sets, so treat them as read-only.
        """
        return self._datasets

    def volume(self) -> hd.Volume:
        """The series as a highdicom Volume (float32 voxels, their affine in patient LPS mm).

        highdicom sorts the frames spatially. A series that is not one regularly spaced
        volume (missing slices, gantry tilt, several stacks) or whose pixels cannot be decoded
        raises :class:`InputError`, which fails the job with that reason instead of
        misplacing a result. Built once, like :meth:`datasets`.
        """
        return self._volume

    @cached_property
    def _datasets(self) -> list[Dataset]:
        datasets = [dcmread(p) for p in self.paths]
        check_identity(datasets)
        # Before anything decodes them: a header that does not describe its pixel data would
        # give a wrong picture, or a decoder a 65535 x 65535 x 2^31 allocation to attempt.
        check_pixel_data(datasets)
        return [_little_endian(ds) for ds in datasets]

    @cached_property
    def _volume(self) -> hd.Volume:
        import highdicom as hd

        try:
            datasets = self.datasets()
            check_geometry(datasets)
            if len(datasets) == 1:
                # A copy: from_dataset(copy=False) turns the shared data set into an hd.Image.
                image = hd.Image.from_dataset(datasets[0], copy=True)
                return image.get_volume(dtype=VOXEL_DTYPE)
            return hd.get_volume_from_series(datasets, dtype=VOXEL_DTYPE)
        except NotImplementedError as exc:  # pydicom: no decoder for the transfer syntax
            raise InputError(f"the series: pixel data not decodable: {exc}") from exc
        except ValueError as exc:
            if "regularly-spaced" not in str(exc):
                raise
            raise InputError(
                "the series is not a regularly spaced volume (missing or "
                "irregularly spaced slices, gantry tilt, or several stacks): not processed, "
                "so that no result is misplaced"
            ) from exc


class InputError(ValueError):
    """A series an algorithm cannot use as it is; the message says why, for the job's error."""


# Voxels as the algorithms get them: float32 holds every stored integer a 16-bit image and its
# rescale make exactly (below 2^24) and is what the models compute in; highdicom's float64
# default doubled the largest allocation of a job for nothing.
VOXEL_DTYPE = np.float32

# The most voxels (Rows x Columns x frames x samples, over a series) the node decodes: 2^30,
# 4 GiB as float32, above any CT or MR a model takes (512 x 512 x 4096).
# Compressed pixel data can claim any size in a few bytes, so the claim is checked first.
MAX_VOXELS = 2**30
_BITS_ALLOCATED = (1, 8, 16, 32, 64)


def _element(ds: Dataset, keyword: str) -> DataElement | None:
    """``ds``'s element ``keyword``, None when absent, InputError when it cannot be read."""
    try:
        return ds[keyword]
    except KeyError:
        return None
    except Exception as exc:  # a value whose bytes do not fit its VR (3 bytes for a US)
        raise InputError(f"{keyword} cannot be read: not a valid value for its VR") from exc


def _positive_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An Image Pixel module attribute as a positive integer, or InputError naming it."""
    element = _element(ds, keyword)
    value = element.value if element is not None else None
    if value in (None, "") and default is not None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    vr = element.VR if element is not None else None
    shown = "missing" if element is None else f"{str(value)[:32]!r} (VR {vr})"
    raise InputError(f"{keyword} is {shown}, not a positive integer")


# PS3.3 C.7.6.3.1.2, the terms pydicom decodes.
PHOTOMETRIC_INTERPRETATIONS = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "PALETTE COLOR",
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_420",
        "YBR_ICT",
        "YBR_RCT",
    }
)
VOI_LUT_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})  # PS3.3 C.11.2.1.3


def _pixel_problem(ds: Dataset) -> tuple[int, str | None]:
    """(voxels the header claims, why its pixel data cannot be what the header says or None).

    Each reason names the attribute (PS3.3 C.7.6.3 Image Pixel, C.11.1 Modality LUT, C.11.2
    VOI LUT): these describe how stored values become what a model and a reader see, and a
    guess would change the picture.
    """
    element = _element(ds, "PixelData")
    if element is None:
        return 0, "no Pixel Data (PixelData)"
    if element.is_empty:
        return 0, "PixelData is empty"
    rows = _positive_int(ds, "Rows")
    columns = _positive_int(ds, "Columns")
    frames = _positive_int(ds, "NumberOfFrames", default=1)
    samples = _positive_int(ds, "SamplesPerPixel")
    bits = _positive_int(ds, "BitsAllocated")
    if bits not in _BITS_ALLOCATED:
        return 0, f"BitsAllocated is {bits}, not one of {_BITS_ALLOCATED}"
    if bits > 1 and not 1 <= _positive_int(ds, "BitsStored") <= bits:
        return 0, f"BitsStored is more than BitsAllocated ({bits})"
    representation = _element(ds, "PixelRepresentation")
    if representation is None or representation.value not in (0, 1):
        return 0, "PixelRepresentation is missing or neither 0 nor 1"
    photometric = _element(ds, "PhotometricInterpretation")
    if photometric is None or str(photometric.value).strip() not in PHOTOMETRIC_INTERPRETATIONS:
        return 0, "PhotometricInterpretation is missing or not a defined term"
    planar = _element(ds, "PlanarConfiguration")  # read by the decoder whatever the samples
    if samples > 1 and (planar is None or planar.value not in (0, 1)):
        return 0, "PlanarConfiguration is missing or neither 0 nor 1"
    problem = _lookup_problem(ds)
    if problem is not None:
        return 0, problem
    voxels = rows * columns * frames * samples
    syntax = UID(ds.file_meta.get("TransferSyntaxUID") or "")
    compressed = syntax.is_encapsulated if syntax else element.is_undefined_length
    if compressed != element.is_undefined_length:
        if compressed:
            return voxels, (
                f"transfer syntax {syntax.name} says the pixel data is compressed, but it "
                "is not encapsulated (uncompressed data sent under a compressed syntax?)"
            )
        return voxels, f"pixel data is encapsulated under the uncompressed {syntax.name}"
    if not compressed:
        expected = (voxels * bits + 7) // 8
        if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
            expected = expected * 2 // 3  # two samples per pixel as stored (PS3.3 C.7.6.3.1.2)
        length = len(element.value)
        if length not in (expected, expected + expected % 2):  # one byte pads to even length
            return voxels, (
                f"pixel data is {length} bytes where Rows x Columns x frames x samples x bits "
                f"({rows} x {columns} x {frames} x {samples} x {bits}) make {expected}: the "
                "header does not describe the pixel data"
            )
    return voxels, None


def check_identity(datasets: list[Dataset]) -> None:
    """Raise :class:`InputError` unless every instance holds the UIDs that place it and its
    results: SOP Class, SOP Instance, Study and Series Instance UIDs (PS3.3 C.12.1, C.7.2.1,
    C.7.3.1), each a valid UID (PS3.5 9.1). A result cannot be put in a study it cannot name.
    """
    from dicom_node.copied import unusable_uids

    for ds in datasets:
        unusable = unusable_uids(ds)
        if unusable:
            raise InputError(f"an instance's {unusable[0]}: its results could not be placed")


def _lookup_problem(ds: Dataset) -> str | None:
    """Why the Modality LUT, VOI LUT or extended offset table cannot be applied, or None."""
    function = _element(ds, "VOILUTFunction")
    if function is not None and str(function.value).strip() not in VOI_LUT_FUNCTIONS:
        return "VOILUTFunction is not a defined term"
    for keyword in ("ModalityLUTSequence", "VOILUTSequence"):
        sequence = _element(ds, keyword)
        if sequence is None:
            continue
        for item in sequence.value:
            if not (item.get("LUTDescriptor") and item.get("LUTData")):
                return f"{keyword} has an item without LUTDescriptor or LUTData"
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        element = _element(ds, keyword)
        if element is not None and not element.is_empty:
            value = _finite([element.value], 1)
            if value is None or (keyword == "RescaleSlope" and value[0] == 0):
                return f"{keyword} is not a finite number (nor 0, for a slope)"
    mappings = _element(ds, "RealWorldValueMappingSequence")
    if mappings is not None and not (
        mappings.value
        and all(
            ("RealWorldValueSlope" in item and "RealWorldValueIntercept" in item)
            or "RealWorldValueLUTData" in item
            for item in mappings.value
        )
    ):
        return "RealWorldValueMappingSequence has no item, or one with no mapping"
    profile = _element(ds, "ICCProfile")
    if profile is not None and profile.is_empty:
        return "ICCProfile is empty"
    table = _element(ds, "ExtendedOffsetTable")
    lengths = _element(ds, "ExtendedOffsetTableLengths")
    if (table is None) != (lengths is None) or (table is not None and table.is_empty):
        return "ExtendedOffsetTable and ExtendedOffsetTableLengths do not come together"
    return None


def check_pixel_data(datasets: list[Dataset]) -> None:
    """Raise :class:`InputError` unless every instance's header describes its pixel data and
    the series claims at most :data:`MAX_VOXELS`; nothing is decoded."""
    voxels, problems = 0, []
    for ds in datasets:
        try:
            claimed, problem = _pixel_problem(ds)
        except InputError as exc:
            claimed, problem = 0, str(exc)
        voxels += claimed
        if problem is not None:
            problems.append(problem)
    if problems:
        raise InputError(f"{len(problems)} of {len(datasets)} instance(s): {problems[0]}")
    if voxels > MAX_VOXELS:
        raise InputError(
            f"the series claims {voxels} voxels (Rows x Columns x frames x samples), more than "
            f"the {MAX_VOXELS} the node decodes: a corrupt header or a decompression bomb"
        )


def _finite(value: object, count: int) -> np.ndarray | None:
    """``value`` as ``count`` finite numbers, or None (missing, wrong count, not numbers)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return None  # a text VR holding one value: its characters are not coordinates
    try:
        numbers = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return numbers if numbers.shape == (count,) and np.isfinite(numbers).all() else None


def _valid_uid(value: object) -> bool:
    """A UID as PS3.5 9.1 writes it (the results copy the frame of reference)."""
    return isinstance(value, str) and len(value) <= 64 and RE_VALID_UID.match(value) is not None


def check_geometry(datasets: list[Dataset]) -> None:
    """Raise :class:`InputError` unless single-frame images can be placed as one volume.

    highdicom's own errors for these cases name an attribute at best or fail with a database
    error; a person reading a failed job needs the reason. Enhanced multi-frame images keep
    their geometry in functional groups and are left to highdicom.
    """
    classic = [ds for ds in datasets if "PerFrameFunctionalGroupsSequence" not in ds]
    if not classic:
        return
    total = len(datasets)

    def fail(count: int, what: str) -> None:
        if count:
            raise InputError(f"{count} of {total} instance(s) {what}")

    positions = [_finite(ds.get("ImagePositionPatient"), 3) for ds in classic]
    fail(
        sum(p is None for p in positions),
        "have no usable ImagePositionPatient: they cannot be placed in patient space",
    )
    orientations = [_finite(ds.get("ImageOrientationPatient"), 6) for ds in classic]
    fail(
        sum(
            o is None
            or not np.allclose(np.linalg.norm(o.reshape(2, 3), axis=1), 1.0, atol=1e-2)
            or abs(float(np.dot(o[:3], o[3:]))) > 1e-2
            for o in orientations
        ),
        "have no ImageOrientationPatient of two perpendicular unit directions",
    )
    spacings = [_finite(ds.get("PixelSpacing"), 2) for ds in classic]
    fail(
        sum(s is None or bool((s <= 0).any()) for s in spacings),
        "have a PixelSpacing that is missing, not a number, or not positive",
    )
    fail(
        sum(not _valid_uid(ds.get("FrameOfReferenceUID")) for ds in classic),
        "have no valid FrameOfReferenceUID: their positions are in no stated frame",
    )
    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if len(frames_of_reference) > 1:
        raise InputError(
            f"the instances are in {len(frames_of_reference)} frames of reference: not one "
            "volume, so they are not put together"
        )
    # Rounded to a micrometre: the same slice sent twice (new UIDs) or a second stack.
    placed = [p for p in positions if p is not None]  # all of them, checked above
    unique = np.unique(np.round(np.stack(placed), 3), axis=0)
    fail(
        len(classic) - len(unique),
        "repeat another's ImagePositionPatient (a slice sent twice, or two stacks): not one "
        "volume, so that no result lands on the wrong slice",
    )


def _little_endian(ds: Dataset) -> Dataset:
    """``ds`` itself, or for Explicit VR Big Endian a little-endian copy with the same pixels."""
    if ds.file_meta.TransferSyntaxUID != ExplicitVRBigEndian:
        return ds
    pixels = ds.pixel_array
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    buffer = BytesIO()
    dcmwrite(buffer, ds, little_endian=True, implicit_vr=False, force_encoding=True)
    buffer.seek(0)
    return dcmread(buffer)


@dataclass(frozen=True)
class Concept:
    """A coded concept as plain data: coding scheme designator, code value, code meaning
    (for example ``Concept("SCT", "27925004", "Nodule")``). The node's writers turn these
    into DICOM codes; algorithms only name what they found."""

    scheme: str
    value: str
    meaning: str

    def __post_init__(self) -> None:
        if not (self.scheme and self.value and self.meaning):
            raise ValueError("a concept needs a scheme, a value and a meaning")


MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Concept(
    "SCT", "49755003", "Morphologically abnormal structure"
)
ANATOMICAL_STRUCTURE = Concept("SCT", "91723000", "Anatomical structure")


@dataclass(frozen=True)
class LabelMask:
    """A binary mask in the voxel grid of one input.

    The grid is that of the input's :meth:`SeriesInput.volume`: frames in highdicom's spatial
    order (not necessarily the order the instances were stored or numbered), rows, columns.
    ``property_type`` says what the mask is (a DICOM SEG's Segmented Property Type),
    ``category`` its kind and ``anatomy`` where it is.
    """

    name: str
    array: np.ndarray
    source: str = SERIES_INPUT  # the input whose grid this is
    property_type: Concept | None = None
    category: Concept = MORPHOLOGICALLY_ABNORMAL_STRUCTURE
    anatomy: Concept | None = None

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"mask {self.name!r} must be 3-D (frames, rows, columns)")
        object.__setattr__(self, "array", np.asarray(self.array, dtype=bool))


@dataclass(frozen=True)
class Finding:
    """A located finding: centre and extent in patient coordinates (LPS, mm)."""

    label: str
    center_lps_mm: tuple[float, float, float]
    size_mm: tuple[float, float, float]
    score: float
    mask: str | None = None  # name of the LabelMask outlining it, if any
    finding_type: Concept | None = None  # e.g. SCT 27925004 Nodule
    site: Concept | None = None  # e.g. SCT 39607008 Lung

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score {self.score} of {self.label!r} is not in [0, 1]")
        if len(self.center_lps_mm) != 3 or len(self.size_mm) != 3:
            raise ValueError("center_lps_mm and size_mm take three values (L, P, S)")


@dataclass(frozen=True)
class Classification:
    """A whole-image (or whole-study) classification against an operating threshold."""

    label: str
    probability: float
    threshold: float
    finding: Concept | None = None  # e.g. SCT 233604007 Pneumonia

    def __post_init__(self) -> None:
        for key in ("probability", "threshold"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} of {self.label!r} is not in [0, 1]")

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class HeatMap:
    """Where a classification looked, in the pixel grid of one input, values in [0, 1]."""

    name: str
    array: np.ndarray
    source: str = SERIES_INPUT


@dataclass(frozen=True)
class Weights:
    """Which weights an algorithm runs with: a file and its SHA-256, flagged DEMO or not."""

    path: Path | None
    sha256: str | None
    demo: bool

    @classmethod
    def from_file(cls, path: Path, *, demo: bool) -> Weights:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return cls(path, digest.hexdigest(), demo)

    @classmethod
    def from_bundle(cls, bundle: Path) -> Weights:
        """The published weights of a MONAI bundle folder (``models/model.pt`` or ``.ts``)."""
        from dicom_node.weights import bundle_model_file

        return cls.from_file(bundle_model_file(bundle), demo=False)

    @classmethod
    def none(cls) -> Weights:
        """For algorithms that have no trained weights (classical image processing)."""
        return cls(None, None, False)

    def describe(self) -> str:
        if self.path is None:
            return "no weights"
        prefix = f"DEMO ({DEMO_WARNING}) " if self.demo else ""
        return f"{prefix}{self.path} sha256:{self.sha256}"


@dataclass
class AlgorithmResult:
    """Everything an algorithm found, as plain data; the node writes the DICOM."""

    algorithm: str
    version: str
    demo: bool
    masks: list[LabelMask] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    classifications: list[Classification] = field(default_factory=list)
    heatmaps: list[HeatMap] = field(default_factory=list)
    measurements: dict[str, float] = field(default_factory=dict)  # key names carry the unit
    # What the algorithm looks for: a type with no finding is reported as absent, because a
    # silent nothing cannot be told from a failure.
    looked_for: list[Concept] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [m.name for m in self.masks]
        if len(set(names)) != len(names):
            raise ValueError("mask names must be unique")
        for finding in self.findings:
            if finding.mask is not None and finding.mask not in names:
                raise ValueError(f"finding {finding.label!r} names an unknown mask")

    def save(self, folder: Path) -> Path:
        """Write ``result.json`` and one ``.npy`` per array into ``folder``; returns the JSON."""
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for kind, items in (("mask", self.masks), ("heatmap", self.heatmaps)):
            for index, item in enumerate(items):
                name = f"{kind}-{index}.npy"
                np.save(folder / name, item.array)
                arrays[(kind, item.name)] = name
        document = {
            "algorithm": self.algorithm,
            "version": self.version,
            "demo": self.demo,
            "masks": [
                {
                    "name": m.name,
                    "source": m.source,
                    "file": arrays[("mask", m.name)],
                    "voxels": int(m.array.sum()),
                }
                for m in self.masks
            ],
            "findings": [
                {
                    "label": f.label,
                    "center_lps_mm": list(f.center_lps_mm),
                    "size_mm": list(f.size_mm),
                    "score": f.score,
                    "mask": f.mask,
                }
                for f in self.findings
            ],
            "classifications": [
                {
                    "label": c.label,
                    "probability": c.probability,
                    "threshold": c.threshold,
                    "positive": c.positive,
                }
                for c in self.classifications
            ],
            "heatmaps": [
                {"name": h.name, "source": h.source, "file": arrays[("heatmap", h.name)]}
                for h in self.heatmaps
            ],
            "measurements": self.measurements,
        }
        path = folder / "result.json"
        path.write_text(json.dumps(document, indent=2))
        return path


class Algorithm(ABC):
    """Subclass this and register the class under the ``dicom_node.algorithms`` entry points.

    ``settings`` are the algorithm's own section of the node configuration (for example the
    path of public weights); the class decides what it accepts and fails clearly otherwise.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    inputs: ClassVar[InputSpec] = InputSpec()

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings = dict(settings or {})

    @abstractmethod
    def weights(self) -> Weights:
        """The weights :meth:`load` will use (without loading them)."""

    @abstractmethod
    def load(self, device: str) -> None:
        """Load the model once onto ``device`` ("cpu", "cuda", "cuda:1"); kept for many runs."""

    @abstractmethod
    def run(self, inputs: Mapping[str, SeriesInput]) -> AlgorithmResult:
        """Run on one case; ``inputs`` has one entry per name in :attr:`inputs`."""


class BundleAlgorithm(Algorithm):
    """An algorithm whose public weights come as a MONAI bundle folder, setting ``bundle``
    (``configs/inference.json`` + ``models/model.pt`` or ``model.ts``); without that setting
    it runs on the demo weights in :attr:`demo_weights`.

    :attr:`model_module` names the module that loads either kind: ``load_demo(path)`` and
    ``load_bundle(bundle)``, each returning an object with a ``network`` attribute, kept as
    :attr:`loaded`. It is imported by :meth:`load` only, so that discovering and routing to
    the algorithm does not pay for torch and MONAI.
    """

    demo_weights: ClassVar[Path]
    model_module: ClassVar[str]

    def weights(self) -> Weights:
        if "bundle" in self.settings:
            return Weights.from_bundle(Path(self.settings["bundle"]))
        return Weights.from_file(self.demo_weights, demo=True)

    def load(self, device: str) -> None:
        model = importlib.import_module(self.model_module)
        weights = self.weights()
        if weights.demo:
            self.loaded = model.load_demo(weights.path)
        else:
            self.loaded = model.load_bundle(Path(self.settings["bundle"]))
        self.loaded.network.to(device)


def resolve_device(requested: str) -> str:
    """``auto`` becomes ``cuda`` when PyTorch sees a GPU, else ``cpu``; others pass through."""
    if requested != "auto":
        return requested
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Registration:
    """One entry point of the group: the class it names, or why it could not be loaded."""

    name: str
    target: str  # "module:Class"
    algorithm: type[Algorithm] | None
    error: str | None


def discover() -> dict[str, Registration]:
    """Every algorithm registered through entry points; broken ones say why, never raise."""
    found: dict[str, Registration] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
                raise TypeError(f"{ep.value} is not a dicom_node.algorithm.Algorithm subclass")
            if cls.name != ep.name:
                raise ValueError(f"entry point {ep.name!r} names a class called {cls.name!r}")
            found[ep.name] = Registration(ep.name, ep.value, cls, None)
        except Exception as exc:  # a broken plugin must not stop the node; it is listed
            log.error("algorithm entry point %s = %s is broken: %s", ep.name, ep.value, exc)
            found[ep.name] = Registration(ep.name, ep.value, None, f"{type(exc).__name__}: {exc}")
    return found


def catalogue(
    registry: Mapping[str, Registration], settings: Mapping[str, Mapping[str, Any]], device: str
) -> list[dict[str, Any]]:
    """What each installed algorithm is, as plain data: for ``dicom-node algorithms`` and for
    the worker's record that the dashboard shows. A broken one says why; the rest are listed."""
    rows = []
    for name, registration in sorted(registry.items()):
        row: dict[str, Any] = {"name": name, "entry_point": registration.target, "device": device}
        if registration.algorithm is None:
            row["error"] = registration.error
        else:
            cls = registration.algorithm
            row["version"] = cls.version
            row["inputs"] = list(cls.inputs.roles)
            try:
                weights = cls(settings.get(name)).weights()
                row["weights"] = weights.describe()
                row["demo"] = weights.demo
            except Exception as exc:  # bad settings for one algorithm: say so, list the rest
                row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows
