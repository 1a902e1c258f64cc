"""The algorithm plugin API: what an algorithm declares, what it is given, what it returns.

An algorithm is a subclass of :class:`Algorithm` registered under the Python entry-point group
``dicom_node.algorithms`` (``[project.entry-points."dicom_node.algorithms"]`` in its
pyproject), so a third-party package adds one without touching the node, and the node never
imports an algorithm by name. An algorithm knows nothing of networking or DICOM writing: it
receives stored series as :class:`SeriesInput` (Part-10 files it may read, or a highdicom
volume) and returns an :class:`AlgorithmResult` of plain data — masks in the voxel grid of a
named input, findings in patient coordinates (LPS, mm), classifications, heat maps — which the
node turns into DICOM.

This module is the whole contract, and ``__all__`` is its public surface. What the node does
around it lives elsewhere: the checks a series passes before an algorithm sees it in
:mod:`dicom_node.input_checks` (whose :class:`InputError` is part of this API, since plugins
raise it too), finding the installed algorithms in :mod:`dicom_node.plugins`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.config import describe_error
from dicom_node.errors import ConfigError, InputError
from dicom_node.input_checks import check_geometry, check_identity, check_pixel_data, little_endian

if TYPE_CHECKING:
    import highdicom as hd

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "DEMO_WARNING",
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE",
    "PRIOR_INPUT",
    "SERIES_INPUT",
    "VOXEL_DTYPE",
    "Algorithm",
    "AlgorithmResult",
    "AlgorithmSettings",
    "BundleAlgorithm",
    "BundleSettings",
    "Classification",
    "Concept",
    "Finding",
    "FindingChange",
    "FollowUp",
    "HeatMap",
    "InputError",
    "InputSpec",
    "LabelMask",
    "LesionStatus",
    "PriorSpec",
    "QaCase",
    "QaLesion",
    "QaPhantom",
    "QaRegion",
    "SeriesInput",
    "TrainedAlgorithm",
    "Weights",
]

SERIES_INPUT = "series"  # the input name of an algorithm that takes one series
DEMO_WARNING = "DEMO MODEL - NOT FOR CLINICAL USE"


PRIOR_INPUT = "prior"  # the input name of a prior study's series, by default


@dataclass(frozen=True)
class PriorSpec:
    """An earlier study of the same patient that an algorithm wants beside its input, for
    follow-up: the node looks for it when it routes the current one, among the studies it
    holds (received, or retrieved from a PACS), and hands it over as the input ``role`` when
    it finds one, or leaves the input out and records why.

    A prior qualifies when it has the same PatientID (and Issuer of Patient ID when both give
    one), an earlier StudyDate/StudyTime, at most ``max_age_days`` before the current study,
    and a series that the routing rule would have chosen for the algorithm's input (the same
    modality, body part and kind of series); of several, the most recent study is taken.
    """

    role: str = PRIOR_INPUT
    max_age_days: int = 3 * 365

    def __post_init__(self) -> None:
        if not self.role:
            raise ValueError("a prior needs an input name")
        if self.max_age_days < 1:
            raise ValueError("max_age_days must be at least 1")


@dataclass(frozen=True)
class InputSpec:
    """What an algorithm takes: one series, or a study with one series per named role; and,
    with ``prior``, optionally the matching series of the patient's prior study."""

    roles: tuple[str, ...] = (SERIES_INPUT,)
    prior: PriorSpec | None = None

    def __post_init__(self) -> None:
        if not self.roles or len(set(self.roles)) != len(self.roles):
            raise ValueError("roles must be distinct and at least one")
        if self.prior is not None and self.prior.role in self.roles:
            raise ValueError(f"the prior's input name {self.prior.role!r} is also a role")

    def mismatch(self, names: Collection[str]) -> str | None:
        """Why a job's input names do not fit this spec (every role, the prior's optionally),
        or None when they do."""
        optional = {self.prior.role} if self.prior is not None else set()
        missing = set(self.roles) - set(names)
        unknown = set(names) - set(self.roles) - optional
        if missing or unknown:
            return f"inputs {sorted(names)} do not fit the roles {list(self.roles)}" + (
                f" and the optional prior {self.prior.role!r}" if self.prior else ""
            )
        return None


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
        return [little_endian(ds) for ds in datasets]

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


# Voxels as the algorithms get them: float32 holds every stored integer a 16-bit image and its
# rescale make exactly (below 2^24) and is what the models compute in; highdicom's float64
# default doubled the largest allocation of a job for nothing.
VOXEL_DTYPE = np.float32


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


class LesionStatus(str, Enum):
    """What became of a lesion between a prior study and the current one."""

    NEW = "new"  # in the current study only
    RESOLVED = "resolved"  # in the prior study only
    INCREASED = "increased"  # its volume grew by more than the stable margin
    DECREASED = "decreased"  # its volume shrank by more than the stable margin
    STABLE = "stable"


@dataclass(frozen=True)
class FindingChange:
    """One lesion compared with the prior study.

    ``finding`` is its index in :attr:`AlgorithmResult.findings` (None when it is resolved:
    only the prior has it). Prior values are measured on the prior study, its centre in the
    prior's own patient coordinates; ``volume_change_percent`` is 100 (V2 - V1) / V1 and
    ``doubling_time_days`` Δt ln 2 / ln(V2/V1), negative for a shrinking lesion.
    """

    status: LesionStatus
    finding: int | None
    volume_mm3: float | None = None
    prior_center_lps_mm: tuple[float, float, float] | None = None
    prior_diameter_mm: float | None = None
    prior_volume_mm3: float | None = None
    volume_change_percent: float | None = None
    doubling_time_days: float | None = None
    distance_mm: float | None = None  # between its centre and the prior's, after registration

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", LesionStatus(self.status))
        resolved = self.status is LesionStatus.RESOLVED
        if resolved != (self.finding is None):
            raise ValueError("a resolved lesion has no current finding, any other has one")
        if self.status is not LesionStatus.NEW and self.prior_diameter_mm is None:
            raise ValueError(f"a {self.status} lesion needs its prior measurements")


@dataclass(frozen=True)
class FollowUp:
    """The comparison of a result with the prior study given as input ``prior``: each
    lesion's change, the days between the two studies, and the rigid transform (4 x 4, prior
    patient coordinates to current) the two scans were registered with."""

    prior: str
    interval_days: float
    changes: tuple[FindingChange, ...]
    registration: tuple[float, ...] = ()  # row-major 4 x 4, when registered

    def __post_init__(self) -> None:
        if self.interval_days <= 0:
            raise ValueError("the prior must be earlier than the current study")
        if self.registration and len(self.registration) != 16:
            raise ValueError("a registration is a 4 x 4 matrix, 16 values")


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
    """Everything an algorithm found, as plain data; the node writes the DICOM.

    ``algorithm``, ``version`` and ``demo`` say who made the result, and are the node's to
    fill: from the registered class and the weights it loaded, before the result is saved or
    written (:func:`dicom_node.infer.made_by`). A plugin leaves them out; whatever it puts
    there is replaced, so that a result cannot say it is not DEMO while its weights are.
    """

    algorithm: str = ""
    version: str = ""
    demo: bool = False
    masks: list[LabelMask] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    classifications: list[Classification] = field(default_factory=list)
    heatmaps: list[HeatMap] = field(default_factory=list)
    measurements: dict[str, float] = field(default_factory=dict)  # key names carry the unit
    # What the algorithm looks for: a type with no finding is reported as absent, because a
    # silent nothing cannot be told from a failure.
    looked_for: list[Concept] = field(default_factory=list)
    # With a prior study as input: what became of each finding since (and of the prior's).
    followup: FollowUp | None = None

    def __post_init__(self) -> None:
        names = [m.name for m in self.masks]
        if len(set(names)) != len(names):
            raise ValueError("mask names must be unique")
        for finding in self.findings:
            if finding.mask is not None and finding.mask not in names:
                raise ValueError(f"finding {finding.label!r} names an unknown mask")
        if self.followup is not None:
            compared = [c.finding for c in self.followup.changes if c.finding is not None]
            if sorted(compared) != list(range(len(self.findings))):
                raise ValueError("a follow-up compares each finding exactly once")

    def save(self, folder: Path) -> Path:
        """Write ``result.json`` and one ``.npy`` per array into ``folder``; returns the JSON."""
        folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[tuple[str, str], str] = {}
        named: tuple[tuple[str, Sequence[LabelMask | HeatMap]], ...] = (
            ("mask", self.masks),
            ("heatmap", self.heatmaps),
        )
        for kind, items in named:
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
        if self.followup is not None:
            document["followup"] = {
                "prior": self.followup.prior,
                "interval_days": self.followup.interval_days,
                "registration": list(self.followup.registration),
                "changes": [
                    {k: v for k, v in asdict(c).items() if v is not None}
                    for c in self.followup.changes
                ],
            }
        path = folder / "result.json"
        path.write_text(json.dumps(document, indent=2))
        return path


class AlgorithmSettings(BaseModel):
    """Base of an algorithm's typed settings: its section ``algorithms.<name>`` of the node
    configuration, checked as strictly as the node's own sections.

    Unknown keys are refused (a misspelt ``bundle`` must not quietly run the demo weights),
    values are frozen, and no key may be null: leave a key out for its default, so that an
    empty ``bundle:`` is an error rather than the demo weights.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("null is not a value: leave the key out for its default")
        return value


# -- the self-test an algorithm may declare -----------------------------------------------------

_RESULT_KINDS = frozenset({"SEG", "SR", "SC"})  # the objects the node writes from a result


@dataclass(frozen=True)
class QaLesion:
    """A lesion of a QA phantom. The SEG should have one segment of type ``finding`` on it
    (holding its centre, lying mostly inside ``mask``) and the SR a region of that finding
    type centred on it, of about its diameter."""

    finding: Concept
    center_lps_mm: tuple[float, float, float]
    diameter_mm: float
    mask: np.ndarray  # its voxels in the primary series' grid (see QaPhantom)


@dataclass(frozen=True)
class QaRegion:
    """A region of a QA phantom that a SEG segment of ``property_type`` should cover (and, with
    ``volume``, whose volume the SR should report); ``name`` is what qa's report calls it."""

    name: str
    property_type: Concept
    mask: np.ndarray  # in the primary series' grid (see QaPhantom)
    volume: bool = False


@dataclass(frozen=True)
class QaPhantom:
    """A phantom study written to a folder, and the truth it was made with.

    ``series`` holds each input role's files in the order they were written; masks are
    (frame, row, column) in the grid of the ``primary`` series (the one a SEG is drawn on),
    frames in the order of its files. ``classifications`` says, per finding, whether the
    phantom shows it.
    """

    series: Mapping[str, tuple[Path, ...]]
    primary: str = SERIES_INPUT
    lesions: tuple[QaLesion, ...] = ()
    regions: tuple[QaRegion, ...] = ()
    classifications: Mapping[Concept, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.primary not in self.series or not all(self.series.values()):
            raise ValueError(f"the {self.primary!r} series and every other must have files")


@dataclass(frozen=True)
class QaCase:
    """How ``dicom-node qa`` self-tests an algorithm on a running node: ``make`` writes a
    phantom study into a folder and returns it with its truth; qa sends it, and checks the
    results (``results``: which of SEG, SR and SC the algorithm writes) against that truth.
    ``label`` names the phantom in qa's report (CT, MR, CXR)."""

    label: str
    results: frozenset[str]
    make: Callable[[Path], QaPhantom]

    def __post_init__(self) -> None:
        if not self.label or not self.results or not self.results <= _RESULT_KINDS:
            raise ValueError(f"a QA case needs a label and results among {sorted(_RESULT_KINDS)}")


class Algorithm(ABC):
    """Subclass this and register the class under the ``dicom_node.algorithms`` entry points.

    ``settings`` are the algorithm's own section of the node configuration (for example the
    path of public weights). Declare what it accepts as :attr:`settings_model`, a subclass of
    :class:`AlgorithmSettings`: the node then validates the section when the configuration is
    checked (``dicom-node config check``, ``dicom-node algorithms``) and when the worker
    builds the class, refusing it with one line naming the key, and :attr:`settings` is that
    model's instance. A class without a model gets the section as a dict and must check it
    itself.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    inputs: ClassVar[InputSpec] = InputSpec()
    # The phantom and truth ``dicom-node qa`` tests the algorithm with; None: no self-test.
    qa_case: ClassVar[QaCase | None] = None
    settings_model: ClassVar[type[AlgorithmSettings] | None] = None
    # The longest one job may run, in seconds, before the node kills the worker running it
    # (nothing else stops a CUDA kernel or a C extension) and retries the job as after a
    # crash; ``worker.time_limits`` overrides it per node. Declare what a slow site needs.
    time_limit_s: ClassVar[float] = 3600.0
    # An instance of settings_model; without one, the section as a dict. Subclasses with a
    # model narrow it (``settings: Settings``) for their readers and type checkers.
    settings: Any

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings = self.checked_settings(settings)

    @classmethod
    def checked_settings(cls, settings: Mapping[str, Any] | None) -> Any:
        """``settings`` as :attr:`settings_model` takes them, or a :class:`ConfigError` naming
        each key it refuses (``algorithms.<name>.<key>: ...``); without a model, a dict."""
        if cls.settings_model is None:
            return dict(settings or {})
        try:
            return cls.settings_model.model_validate(dict(settings or {}))
        except ValidationError as exc:
            raise ConfigError(
                describe_error(exc, ("algorithms", cls.name), unknown="unknown setting")
            ) from None

    @classmethod
    def prior_input(cls, settings: Any) -> PriorSpec | None:
        """The prior study this algorithm wants with ``settings`` (as :meth:`checked_settings`
        returns them): ``inputs.prior`` as declared; an algorithm whose settings choose the
        prior's maximum age overrides this."""
        return cls.inputs.prior

    @abstractmethod
    def weights(self) -> Weights:
        """The weights :meth:`load` will use (without loading them)."""

    @abstractmethod
    def load(self, device: str) -> None:
        """Load the model once onto ``device`` ("cpu", "cuda", "cuda:1"); kept for many runs."""

    @abstractmethod
    def run(self, inputs: Mapping[str, SeriesInput]) -> AlgorithmResult:
        """Run on one case; ``inputs`` has one entry per name in :attr:`inputs`."""


class TrainedAlgorithm(Algorithm):
    """An algorithm that runs a trained network: on the public weights its settings name, or
    else on the demo weights it ships in :attr:`demo_weights` (everything it makes is then
    marked DEMO). The one way the built-in algorithms load weights:

    - :meth:`public_weights` says which public weights the settings name, None for the demo
      ones; :meth:`weights` is therefore never the demo weights when public ones are named;
    - :attr:`model_module` names the module that loads them, imported by :meth:`load` only so
      that discovering and routing to the algorithm does not pay for torch and MONAI: its
      ``load_demo(path)`` reads the demo weights, :meth:`load_public` (given the module) the
      public ones. Either returns an object with a ``network`` attribute (a torch module),
      kept as :attr:`loaded` and moved to the device, which is kept as :attr:`device`.

    Loading is strict (:mod:`dicom_node.weights`): weights that do not fit the network are an
    error naming the file, never a partial load.
    """

    demo_weights: ClassVar[Path]
    model_module: ClassVar[str]
    loaded: Any  # what the model module's loader returned, set by load()
    device: str

    @abstractmethod
    def public_weights(self) -> Weights | None:
        """The public weights the settings name (``Weights.from_file(path, demo=False)``,
        ``Weights.from_bundle(folder)``), or None to run on the demo weights."""

    @abstractmethod
    def load_public(self, model: ModuleType) -> Any:
        """Load the public weights with ``model`` (the imported :attr:`model_module`)."""

    def weights(self) -> Weights:
        public = self.public_weights()
        return public if public is not None else Weights.from_file(self.demo_weights, demo=True)

    def load(self, device: str) -> None:
        model = importlib.import_module(self.model_module)
        weights = self.weights()
        self.loaded = model.load_demo(weights.path) if weights.demo else self.load_public(model)
        self.loaded.network.to(device)
        self.device = device


class BundleSettings(AlgorithmSettings):
    """The settings of a :class:`BundleAlgorithm`."""

    bundle: Path | None = Field(
        None,
        description="A MONAI bundle folder (configs/inference.json and models/model.pt or "
        "model.ts) of public weights; without it, the demo weights.",
    )


class BundleAlgorithm(TrainedAlgorithm):
    """A :class:`TrainedAlgorithm` whose public weights come as a MONAI bundle folder, setting
    ``bundle`` (``configs/inference.json`` + ``models/model.pt`` or ``model.ts``); its model
    module's ``load_bundle(bundle)`` loads them. A subclass with more settings extends
    :class:`BundleSettings`.
    """

    settings_model: ClassVar[type[AlgorithmSettings] | None] = BundleSettings
    settings: BundleSettings

    def public_weights(self) -> Weights | None:
        if self.settings.bundle is None:
            return None
        return Weights.from_bundle(self.settings.bundle)

    def load_public(self, model: ModuleType) -> Any:
        return model.load_bundle(self.settings.bundle)
