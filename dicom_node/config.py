"""One validated configuration model for the whole node.

Every key has a default, so ``dicom-node serve`` runs with no file at all. A YAML file overrides
the defaults and environment variables override the file, which is what containers need:
``DICOM_NODE__SCP__PORT=11113`` sets ``scp.port`` (sections and keys joined by ``__``; the value
is read as a YAML scalar or flow collection, so ``[A, B]`` is a list).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.errors import ConfigError
from dicom_node.priority import DEFAULT_PRIORITY, PRIORITY_AGING_S, Priority, RequestPriority

ENV_PREFIX = "DICOM_NODE__"
ENV_CONFIG_FILE = "DICOM_NODE_CONFIG"

# PS3.5 6.2: AE is at most 16 characters of the default repertoire, no backslash or control
# characters; leading and trailing spaces are not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(stripped):
        raise ValueError(
            f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash;"
            " PS3.5 6.2)"
        )
    return stripped


AeTitle = Annotated[str, AfterValidator(_check_ae_title)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllowedPeer(_Section):
    """A calling AE title that may associate, optionally only from one host address."""

    ae_title: AeTitle = Field(description="The calling AE title (or write the entry as 'AE@host').")
    host: str | None = Field(
        default=None, description="Only from this peer address; null: from any address."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_shorthand(cls, value: Any) -> Any:
        # "ORTHANC" or "ORTHANC@10.0.0.5" is how administrators write peer lists.
        if isinstance(value, str):
            title, _, host = value.partition("@")
            return {"ae_title": title, "host": host or None}
        return value

    def admits(self, calling_ae_title: str, peer_host: str) -> bool:
        return calling_ae_title.strip() == self.ae_title and self.host in (None, peer_host)


class TlsConfig(_Section):
    """TLS for a listener: the SCP (PS3.15 B.1, the Basic TLS Secure Transport Connection
    Profile) or the HTTP service (HTTPS, for DICOMweb and the API)."""

    enabled: bool = Field(default=False, description="Listen with TLS instead of plain TCP.")
    cert_file: Path | None = Field(default=None, description="Our certificate (PEM).")
    key_file: Path | None = Field(default=None, description="Its private key (PEM).")
    ca_file: Path | None = Field(
        default=None, description="CA bundle used to verify client certificates."
    )
    require_client_cert: bool = Field(
        default=True, description="Refuse clients without a certificate signed by ca_file."
    )

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TlsConfig:
        if self.enabled:
            for key in ("cert_file", "key_file"):
                if getattr(self, key) is None:
                    raise ValueError(f"{key} is required when TLS is enabled")
            if self.require_client_cert and self.ca_file is None:
                raise ValueError("ca_file is required when require_client_cert is true")
        return self


class ScpConfig(_Section):
    """The DICOM listener (Storage SCP and Verification SCP)."""

    ae_title: AeTitle = Field(default="DICOMNODE", description="Our AE title (PS3.5 AE).")
    host: str = Field(default="0.0.0.0", description="Address to listen on.")
    port: int = Field(default=11112, ge=1, le=65535, description="TCP port to listen on.")
    max_associations: int = Field(
        default=16, ge=1, le=1000, description="More at once are rejected (transient)."
    )
    max_pdu_size: int = Field(
        default=262144,
        ge=0,
        description=(
            "Maximum PDU length we receive (PS3.8 D.1); 0 means unlimited. A PDU announced"
            " longer than this (and than 1 MiB) is not read: the connection is closed."
        ),
    )
    acse_timeout_s: float = Field(default=30.0, gt=0, description="Association set-up timeout.")
    dimse_timeout_s: float = Field(default=60.0, gt=0, description="Wait for a DIMSE message.")
    network_timeout_s: float = Field(
        default=60.0, gt=0, description="An association idle this long is aborted."
    )
    require_called_aet: bool = Field(
        default=True, description="Reject associations not addressed to ae_title."
    )
    fast_path: bool = Field(
        default=True,
        description=(
            "Serve C-STORE and C-ECHO by reading the accepted association's socket directly"
            " (pynetdicom still negotiates); false leaves every association to pynetdicom."
        ),
    )
    allowed_calling_aets: list[AllowedPeer] | None = Field(
        default=None,
        description="Peers that may associate ('AE' or 'AE@host'); null allows every peer.",
    )
    tls: TlsConfig = TlsConfig()

    def admits(self, calling_ae_title: str, peer_host: str) -> bool:
        """Whether the allow-list lets this peer associate (PS3.8 7.1.1.3 calling AE)."""
        if self.allowed_calling_aets is None:
            return True
        return any(p.admits(calling_ae_title, peer_host) for p in self.allowed_calling_aets)


class StoreConfig(_Section):
    """Where received instances, the index and the job store live."""

    data_dir: Path = Field(
        default=Path("./dicom-node-data"), description="Instances, index, jobs and results."
    )
    min_free_bytes: int = Field(
        default=2 * 1024**3,
        ge=0,
        description="Refuse C-STOREs (0xA700 Out of Resources) below this much free disk.",
    )
    fsync: bool = Field(
        default=True,
        description="fsync each instance before acknowledging it; off only for throwaway tests.",
    )


class AssemblyConfig(_Section):
    """When a series or study counts as complete."""

    series_quiet_seconds: float = Field(
        default=5.0, gt=0, description="A series with no new instance this long is complete."
    )
    study_quiet_seconds: float = Field(
        default=5.0, gt=0, description="A study with no new instance this long is complete."
    )


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from None
    return value


Regex = Annotated[str, AfterValidator(_check_regex)]
Orientation = Literal["axial", "sagittal", "coronal", "oblique"]
MrWeighting = Literal["T1", "T1c", "T2", "FLAIR"]


class SeriesMatch(_Section):
    """What a series must be for a rule to route it: every condition given must hold.

    Lists mean "any of"; text comparisons ignore case; regular expressions are searched
    (``re.search``) in the attribute. An unset condition is not checked.
    """

    modality: list[str] | None = Field(default=None, description="Modality (0008,0060) is one of.")
    sop_class: list[str] | None = Field(default=None, description="SOP Class UID is one of.")
    body_part: list[str] | None = Field(
        default=None, description="BodyPartExamined is one of; '' matches a missing value."
    )
    description: Regex | None = Field(default=None, description="SeriesDescription matches.")
    exclude_description: Regex | None = Field(
        default=None, description="SeriesDescription must not match."
    )
    protocol: Regex | None = Field(default=None, description="ProtocolName matches.")
    image_type: list[str] | None = Field(
        default=None, description="ImageType contains all of these values."
    )
    exclude_image_type: list[str] | None = Field(
        default=None, description="ImageType contains none of these values."
    )
    orientation: list[Orientation] | None = Field(
        default=None, description="Plane from ImageOrientationPatient is one of."
    )
    min_slices: int | None = Field(
        default=None, ge=1, description="At least this many frames with pixel data."
    )
    max_slices: int | None = Field(
        default=None, ge=1, description="At most this many frames with pixel data."
    )
    min_pixel_spacing_mm: float | None = Field(
        default=None, gt=0, description="The smaller in-plane pixel spacing is at least this."
    )
    max_pixel_spacing_mm: float | None = Field(
        default=None, gt=0, description="The smaller in-plane pixel spacing is at most this."
    )
    calling_aet: list[AeTitle] | None = Field(
        default=None, description="The series came from one of these calling AE titles."
    )
    station_name: list[str] | None = Field(
        default=None, description="StationName (0008,1010) is one of; '' matches a missing value."
    )
    request_priority: list[RequestPriority] | None = Field(
        default=None,
        description="The C-STORE requests' Priority (PS3.7 9.1.1.1), the highest its instances "
        "were sent with, is one of.",
    )
    mr_weighting: list[MrWeighting] | None = Field(
        default=None,
        description="An MR series of one of these weightings, told from its acquisition "
        "attributes (ScanningSequence, TR/TE/TI, contrast agent; descriptions only without "
        "them); localizers, derived images, masks, EPI, diffusion and dynamic series never "
        "match.",
    )


class RouteRule(_Section):
    """Route series (``series``) or studies with role-matched series (``roles``) to an algorithm."""

    algorithm: str = Field(description="Name of an installed algorithm (dicom-node algorithms).")
    series: SeriesMatch | None = None
    roles: dict[str, SeriesMatch] | None = Field(
        default=None,
        description="For an algorithm that takes a study: what the series of each of its "
        "input roles must be, one series per role.",
    )
    destinations: list[str] | None = Field(
        default=None,
        description="Where results go: names under 'destinations', or 'sender' (back to the "
        "calling AE, looked up in 'peers'); null means routing.destinations.",
    )
    priority: Priority = Field(
        default=DEFAULT_PRIORITY,
        description="The class of its jobs in the queue: stat before urgent before routine, "
        "then the oldest (worker.priority_aging_s).",
    )
    fetch_missing: list[str] | None = Field(
        default=None,
        description="Names under retrieve.sources to ask, in this order, for the series of a "
        "study whose roles no received series fits (a FLAIR not forwarded), and for an "
        "algorithm that wants a prior study not on the node, for the patient's most recent "
        "earlier study within the prior's age; decided again with what came. Null: never ask.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> RouteRule:
        if (self.series is None) == (self.roles is None):
            raise ValueError("give exactly one of 'series' or 'roles'")
        if self.roles is not None and not self.roles:
            raise ValueError("'roles' needs at least one role")
        fetch = self.fetch_missing
        if fetch is not None and (not fetch or len(set(fetch)) != len(fetch)):
            raise ValueError("'fetch_missing' names one or more sources, each once")
        return self


DEFAULT_ROUTES: tuple[dict[str, Any], ...] = (
    {
        "algorithm": "lung-nodules-ct",
        "series": {
            "modality": ["CT"],
            "body_part": ["CHEST", "THORAX", "LUNG", "CHEST_ABDOMEN", "CHEST_TO_PELVIS", ""],
            "orientation": ["axial"],
            "exclude_image_type": ["LOCALIZER", "SECONDARY"],
            "exclude_description": r"(?i)(scout|topogram|localizer|dose|mip|lung window only)",
            "min_slices": 20,
        },
    },
    {
        "algorithm": "brain-tumour-mr",
        # The weighting of each series from its acquisition attributes (dicom_node.mr_sequence):
        # descriptions pick among series of one weighting and name none on their own.
        "roles": {
            role: {"modality": ["MR"], "mr_weighting": [role]}
            for role in ("T1c", "T1", "T2", "FLAIR")
        },
    },
    {
        "algorithm": "pneumonia-cxr",
        "series": {
            "modality": ["CR", "DX"],
            "body_part": ["CHEST", "THORAX", "LUNG", ""],
            "max_slices": 1,
        },
    },
)


class RoutingConfig(_Section):
    """Which algorithms see which series; every completed series gets a recorded decision."""

    rules: list[RouteRule] = Field(
        default_factory=lambda: [RouteRule.model_validate(r) for r in DEFAULT_ROUTES],
        description="Each: algorithm, then series (match) or roles (role -> match), and "
        "optionally destinations; see docs/routing.md.",
    )
    destinations: list[str] = Field(
        default_factory=list,
        description="Destinations of rules that name none; empty keeps results in the data "
        "folder only.",
    )


SENDER = "sender"  # the destination that means "back to the calling AE"


class ClientTlsConfig(_Section):
    """TLS towards a destination (PS3.15 B.1): verify it with ca_file, present cert_file."""

    ca_file: Path | None = Field(default=None, description="CA bundle; null: system CAs.")
    cert_file: Path | None = Field(default=None, description="Our client certificate (PEM).")
    key_file: Path | None = Field(default=None, description="Its private key (PEM).")
    server_hostname: str | None = Field(
        default=None, description="Name to verify the certificate against; default host."
    )


class DicomDestination(_Section):
    """A C-STORE SCP: a PACS, a viewer, a router."""

    type: Literal["dicom"] = Field(default="dicom", description="A C-STORE SCP.")
    ae_title: AeTitle = Field(description="Its AE title (the called AE).")
    host: str = Field(description="Its address.")
    port: int = Field(ge=1, le=65535, description="Its port.")
    tls: ClientTlsConfig | None = None


class DicomwebDestination(_Section):
    """A STOW-RS service (PS3.18 10.5): the base URL of its studies resource."""

    type: Literal["dicomweb"] = Field(default="dicomweb", description="A STOW-RS service.")
    url: str = Field(pattern=r"^https?://", description="e.g. http://pacs:8042/dicom-web")
    username: str | None = Field(default=None, description="Basic authentication user.")
    password: str | None = Field(default=None, description="Basic authentication password.")
    token: str | None = Field(default=None, description="Bearer token; instead of a password.")
    verify: bool | Path = Field(default=True, description="TLS verification, or a CA bundle.")

    @model_validator(mode="after")
    def _one_auth(self) -> DicomwebDestination:
        if self.token and (self.username or self.password):
            raise ValueError("give a token or a username and password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self


class FolderDestination(_Section):
    """A folder (a share another system picks files up from): study/series/instance.dcm."""

    type: Literal["folder"] = Field(default="folder", description="A folder.")
    path: Path = Field(description="Results go to <path>/<study>/<series>/<sop>.dcm.")


class NotifyRule(_Section):
    """Which results a notification destination (webhook, hl7, fhir) is told of, and at what
    priority. Every condition given must hold; a result left out closes its delivery as sent
    without a message (logged at INFO)."""

    only_positive: bool = Field(
        default=False,
        description="Only results with a positive finding (a finding located, or a "
        "classification at or over its threshold); negative results are not notified.",
    )
    algorithms: list[str] | None = Field(
        default=None, description="Only results of these algorithms; null: of every one."
    )
    priorities: list[Priority] | None = Field(
        default=None,
        description="Only results of jobs of these priority classes (their routing rule's "
        "priority: stat, urgent, routine); null: of every class.",
    )
    positive_priority: Priority | None = Field(
        default=None,
        description="A positive result is notified at least at this priority (HL7 OBR-5 S/A/R,"
        " the webhook's 'priority'); null: the job's own class.",
    )

    @field_validator("algorithms", "priorities")
    @classmethod
    def _not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("an empty list would notify nothing: leave the key out instead")
        return value


_URL = r"^https?://\S+$"


class WebhookDestination(_Section):
    """An HTTP endpoint told of each result by a POST of a JSON document (the schema is
    dicom_node/schemas/webhook.schema.json), signed with HMAC-SHA256 (RFC 2104)."""

    type: Literal["webhook"] = Field(default="webhook", description="A JSON webhook.")
    url: str = Field(pattern=_URL, description="e.g. https://ris.example/hooks/ai")
    secret: str = Field(
        min_length=16,
        repr=False,
        description="HMAC-SHA256 key (16+ characters) the receiver verifies "
        "X-Dicom-Node-Signature with; set it by DICOM_NODE__DESTINATIONS__<NAME>__SECRET.",
    )
    verify: bool | Path = Field(default=True, description="TLS verification, or a CA bundle.")
    notify: NotifyRule = NotifyRule()


class Hl7Destination(_Section):
    """An HL7 v2.5.1 receiver (a RIS, an interface engine) told of each result by an ORU^R01
    message over MLLP (HL7 v2.5.1 chapter 7; MLLP release 1)."""

    type: Literal["hl7"] = Field(default="hl7", description="HL7 v2.5.1 ORU^R01 over MLLP.")
    host: str = Field(description="The MLLP listener's address.")
    port: int = Field(ge=1, le=65535, description="Its port.")
    receiving_application: str = Field(
        min_length=1, max_length=227, description="MSH-5 Receiving Application, e.g. RIS."
    )
    receiving_facility: str = Field(
        default="", max_length=227, description="MSH-6 Receiving Facility."
    )
    sending_facility: str = Field(default="", max_length=227, description="MSH-4.")
    processing_id: Literal["P", "T", "D"] = Field(
        default="P", description="MSH-11: P production, T training, D debugging."
    )
    ack_timeout_s: float = Field(
        default=30.0, gt=0, description="No ACK within this long: the attempt failed (retried)."
    )
    max_application_errors: int = Field(
        default=3,
        ge=1,
        description="An AE (application error) ACK is retried; after this many in a row the "
        "delivery is a dead letter. An AR (reject) is one at once.",
    )
    notify: NotifyRule = NotifyRule()

    @field_validator("receiving_application", "receiving_facility", "sending_facility")
    @classmethod
    def _no_delimiters(cls, value: str) -> str:
        if any(c in value for c in "|^~\\&\r\n"):
            raise ValueError("may not contain the HL7 delimiters | ^ ~ \\ & or line breaks")
        return value


class FhirDestination(_Section):
    """A FHIR R4 server told of each result by a DiagnosticReport with one Observation per
    finding, each written by a conditional update on its identifier (FHIR R4 http.html#cond-update),
    so that a resend replaces rather than duplicates."""

    type: Literal["fhir"] = Field(default="fhir", description="A FHIR R4 server.")
    url: str = Field(pattern=_URL, description="The service base URL, e.g. https://ehr/fhir")
    token: str | None = Field(default=None, repr=False, description="Bearer token.")
    verify: bool | Path = Field(default=True, description="TLS verification, or a CA bundle.")
    identifier_system: str = Field(
        default="urn:dicom-node:job",
        min_length=1,
        description="The system of the identifiers the node gives its reports and "
        "observations (their value: job, destination and finding).",
    )
    notify: NotifyRule = NotifyRule()


NotifyDestination = WebhookDestination | Hl7Destination | FhirDestination

Destination = Annotated[
    DicomDestination
    | DicomwebDestination
    | FolderDestination
    | WebhookDestination
    | Hl7Destination
    | FhirDestination,
    Field(discriminator="type"),
]


class Peer(_Section):
    """A known DICOM peer (like a PACS's modality list): where its SCP listens."""

    host: str = Field(description="Address of the AE's SCP.")
    port: int = Field(ge=1, le=65535, description="Port of the AE's SCP.")
    tls: ClientTlsConfig | None = None


RetrieveMethod = Literal["c-move", "c-get", "dicomweb"]


class RetrieveSource(_Section):
    """A PACS the node may ask for the series a study lacks: a Query/Retrieve SCP (C-FIND,
    then C-MOVE or C-GET, PS3.4 C) or a DICOMweb origin (QIDO-RS, then WADO-RS, PS3.18 10.6
    and 10.4). What it sends is stored like a C-STORE and marked as retrieved."""

    method: RetrieveMethod = Field(
        default="c-get",
        description="c-move (the PACS sends the series to move_destination by C-STORE), "
        "c-get (on the same association) or dicomweb (QIDO-RS, then WADO-RS).",
    )
    ae_title: AeTitle | None = Field(
        default=None, description="c-move, c-get: the PACS's Q/R SCP AE title (the called AE)."
    )
    host: str | None = Field(default=None, description="c-move, c-get: its address.")
    port: int | None = Field(default=None, ge=1, le=65535, description="c-move, c-get: its port.")
    move_destination: AeTitle | None = Field(
        default=None,
        description="c-move: the AE title the PACS sends to, which it must know as this node's "
        "SCP (host and port); default scp.ae_title.",
    )
    url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="dicomweb: the base URL of its studies resource, e.g. http://pacs/dicom-web",
    )
    token: str | None = Field(
        default=None, repr=False, description="dicomweb: a bearer token, if it needs one."
    )
    verify: bool | Path = Field(
        default=True, description="dicomweb: TLS verification, or a CA bundle."
    )
    max_concurrent: int = Field(
        default=2, ge=1, le=64, description="Retrievals from this source at once, at most."
    )
    timeout_s: float = Field(
        default=120.0, gt=0, description="Network timeout of each request or DIMSE message."
    )

    @model_validator(mode="after")
    def _complete_for_method(self) -> RetrieveSource:
        if self.method == "dicomweb":
            if self.url is None:
                raise ValueError("method dicomweb needs url")
        else:
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"method {self.method} needs {', '.join(missing)}")
        return self


class RetrieveConfig(_Section):
    """Asking PACSs for what a study lacks (routing.rules[].fetch_missing): durable retrieval
    jobs, retried with exponential backoff, one at a time per study."""

    sources: dict[str, RetrieveSource] = Field(
        default_factory=dict, description="Named PACSs that rules may ask (fetch_missing)."
    )
    calling_ae_title: AeTitle | None = Field(
        default=None, description="Our AE title when asking; default scp.ae_title."
    )
    max_attempts: int = Field(
        default=5, ge=1, description="Tries of a retrieval before it is given up (failed)."
    )
    backoff_initial_s: float = Field(default=10.0, gt=0, description="Wait after a 1st failure.")
    backoff_max_s: float = Field(default=600.0, gt=0, description="Longest wait between tries.")
    poll_s: float = Field(
        default=1.0, gt=0, description="How often queued retrievals are looked for."
    )


class DeliveryConfig(_Section):
    """How results are sent: retries with exponential backoff and jitter, then a dead letter."""

    calling_ae_title: AeTitle | None = Field(
        default=None, description="Our AE title when sending; default scp.ae_title."
    )
    max_attempts: int = Field(default=8, ge=1, description="Tries before a dead letter.")
    backoff_initial_s: float = Field(default=5.0, gt=0, description="Wait after a 1st failure.")
    backoff_max_s: float = Field(default=600.0, gt=0, description="Longest wait between tries.")
    backoff_jitter: float = Field(
        default=0.2, ge=0, le=1, description="Each wait is spread by +- this fraction."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Network timeout per request.")
    poll_s: float = Field(default=0.2, gt=0, description="How often due deliveries are looked for.")


class RetentionConfig(_Section):
    """How long patient data stays on disk once it has done its work."""

    instances_hours: float = Field(
        default=24.0,
        ge=0,
        description="Received instances: hours after every route of their "
        "study delivered (or the study routed nowhere). The index keeps the record.",
    )
    results_hours: float = Field(
        default=168.0,
        ge=0,
        description="Result files: hours after they were delivered; "
        "afterwards they cannot be replayed.",
    )
    check_every_s: float = Field(
        default=60.0, gt=0, description="How often expired data is looked for."
    )


class ResultsConfig(_Section):
    """The DICOM objects results are written as, in the source's study, a new series each."""

    seg_series_number: int = Field(
        default=9901,
        ge=1,
        description="Series Number of SEGs whose source series has no usable one (otherwise "
        "the source's number x 100 + 1).",
    )
    sr_series_number: int = Field(
        default=9902,
        ge=1,
        description="Series Number of SRs whose source series has no usable one (otherwise "
        "the source's number x 100 + 2).",
    )
    sc_series_number: int = Field(
        default=9903,
        ge=1,
        description="Series Number of heat-map Secondary Captures whose source series has no "
        "usable one (otherwise the source's number x 100 + 3).",
    )
    seg_omit_empty_frames: bool = Field(
        default=True,
        description="Leave out SEG frames with no segment pixels. Smaller, faster SEGs that "
        "OHIF places correctly (tested) and that stay under Weasis 4.6's 400-frame limit; "
        "set false for a viewer that needs one SEG frame per source image.",
    )
    series_description: str = Field(
        default="AI {algorithm} {kind}",
        description="Series Description; {algorithm} and {kind} (SEG, SR, heat map) are "
        "filled in and ': <source series description>' follows (64 characters at most). With "
        "demo weights the DEMO warning always comes first.",
    )

    @field_validator("series_description")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        try:
            value.format(algorithm="a", kind="k")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{algorithm}} and {{kind}} may be filled in: {exc}") from exc
        return value


class WorkerConfig(_Section):
    """The inference worker."""

    enabled: bool = Field(
        default=True, description="Run inference worker processes inside 'serve'."
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto = CUDA when available, else CPU; or cpu, cuda, cuda:N.",
    )
    cpu_threads: int | None = Field(default=None, ge=1, description="Torch threads on CPU.")
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Tries per job before it fails; input and writing errors fail at once.",
    )
    priority_aging_s: float = Field(
        default=PRIORITY_AGING_S,
        gt=0,
        allow_inf_nan=False,
        description="A queued job counts one priority class higher for each this many seconds "
        "it waited, so routine work is never starved by stat work.",
    )
    processes: int | None = Field(
        default=None,
        ge=1,
        description="Worker processes inside 'serve', each with its own warm models; unset: one"
        " per GPU (times processes_per_gpu) on a GPU host, else 1.",
    )
    processes_per_gpu: int = Field(
        default=1,
        ge=1,
        description="Worker processes sharing one GPU (CUDA_VISIBLE_DEVICES is set per process).",
    )
    min_free_gpu_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="Before loading a model on CUDA, require this much free GPU memory"
        " (the job is retried otherwise); for processes sharing a GPU.",
    )
    time_limits: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Run time limit in seconds per algorithm name, over the algorithm's own"
        " time_limit_s; a job over it has its worker killed and is retried like a crash.",
    )
    concurrency: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description="Most jobs of an algorithm running at once on the node (by algorithm name),"
        " e.g. 1 for a model that fits a GPU once.",
    )


class LoggingConfig(_Section):
    """What the node logs (patient data never above DEBUG)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="DEBUG adds per-instance lines with UIDs."
    )


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class HttpConfig(_Section):
    """The HTTP service in 'serve': health, readiness, Prometheus metrics, JSON API, dashboard."""

    enabled: bool = Field(default=True, description="Serve HTTP beside the DICOM SCP.")
    host: str = Field(
        default="127.0.0.1",
        description="Address to listen on; beyond loopback a token is required.",
    )
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port (0: any free port).")
    token: str | None = Field(
        default=None,
        min_length=16,
        description="Bearer token for /metrics, /api and the dashboard's data (16+ characters);"
        " /healthz and /readyz stay open for probes.",
    )

    tls: TlsConfig = Field(
        default_factory=TlsConfig,
        description="HTTPS instead of HTTP; with ca_file, a client certificate it verifies"
        " authorises a request as the token does (mutual TLS).",
    )

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> HttpConfig:
        mutual_tls = self.tls.enabled and self.tls.require_client_cert
        if self.enabled and self.host not in _LOOPBACK and self.token is None and not mutual_tls:
            raise ValueError(
                f"http.token: required when http.host is {self.host!r} (beyond loopback)"
                " unless http.tls requires client certificates; set DICOM_NODE__HTTP__TOKEN"
            )
        return self


class DicomwebConfig(_Section):
    """DICOMweb on the HTTP service (PS3.18): STOW-RS in, QIDO-RS and WADO-RS out, under
    /dicom-web; authorised as /api is (http.token, or a client certificate)."""

    enabled: bool = Field(default=True, description="Serve /dicom-web on the HTTP service.")
    sender_aet: AeTitle = Field(
        default="DICOMWEB",
        description="The calling AE title recorded for instances stored by STOW-RS: routing"
        " rules' calling_aet, the index and the audit trail name the sender by it.",
    )
    network_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="A STOW-RS client silent this long in the middle of its request is"
        " dropped; what it sent completely is kept.",
    )
    complete_on_request_end: bool = Field(
        default=True,
        description="A STOW-RS request completes its series and studies when it ends, as an"
        " association's release does. Set false for clients that post one instance per"
        " request: each request would complete and route its series again (about 25 ms each);"
        " the quiet time then completes them.",
    )


class AuditConfig(_Section):
    """The audit trail: security-relevant events as JSON lines (DICOM PS3.15 Annex A fields)."""

    enabled: bool = Field(default=True, description="Write the audit trail.")
    path: Path | None = Field(
        default=None, description="The audit file; null: <store.data_dir>/audit/audit.jsonl."
    )
    max_bytes: int = Field(
        default=10 * 1024 * 1024, ge=4096, description="Size at which the file is rotated."
    )
    backup_count: int = Field(default=10, ge=1, description="Rotated files kept (.1 newest).")
    source_id: str | None = Field(
        default=None,
        description="AuditSourceID in every event (PS3.15 A.5.1); null: the host name.",
    )


_OBJECT_URL = re.compile(r"^(s3://[^/\s]+(/\S*)?|file:///\S*)$")


class ObjectsConfig(_Section):
    """Cluster mode's object store: staged inputs and results move between hosts through it."""

    url: str | None = Field(
        default=None,
        description="s3://bucket/prefix (any S3: SeaweedFS, Ceph, cloud) or file:///path (a folder"
        " mounted on every host); required in cluster mode.",
    )
    endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="The S3 endpoint, e.g. http://seaweedfs:8333; null: AWS.",
    )
    region: str | None = Field(default=None, description="The S3 region; null: the AWS default.")
    access_key_id: str | None = Field(
        default=None,
        description="S3 access key; null: the usual AWS_* variables"
        " (or DICOM_NODE__CLUSTER__OBJECTS__ACCESS_KEY_ID).",
    )
    secret_access_key: str | None = Field(
        default=None,
        repr=False,
        description="S3 secret key; set it by DICOM_NODE__CLUSTER__OBJECTS__SECRET_ACCESS_KEY"
        " rather than in the file.",
    )

    @field_validator("url")
    @classmethod
    def _object_url(cls, value: str | None) -> str | None:
        if value is not None and not _OBJECT_URL.match(value):
            raise ValueError(
                f"{value!r} is not an object store URL (s3://bucket/prefix or file:///path)"
            )
        return value

    @model_validator(mode="after")
    def _keys_together(self) -> ObjectsConfig:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        return self


class ClusterConfig(_Section):
    """Cluster mode: PostgreSQL, RabbitMQ and an object store instead of SQLite and local files;
    GPU workers on other hosts ('dicom-node worker --cluster'). Unset database_url: embedded."""

    database_url: str | None = Field(
        default=None,
        pattern=r"^postgres(ql)?://\S*$",
        description="postgresql://user@host:5432/db; set: cluster mode. Put a password in"
        " DICOM_NODE__CLUSTER__DATABASE_URL rather than in the file.",
    )
    broker_url: str | None = Field(
        default=None,
        pattern=r"^amqps?://\S*$",
        description="RabbitMQ, amqp://user:password@host:5672/vhost; required in cluster mode"
        " (DICOM_NODE__CLUSTER__BROKER_URL).",
    )
    objects: ObjectsConfig = ObjectsConfig()
    lease_s: float = Field(
        default=60.0,
        gt=0,
        allow_inf_nan=False,
        description="A claimed job's lease by the database clock, renewed by the worker's"
        " heartbeat; a job whose lease ran out is queued again.",
    )
    redispatch_s: float = Field(
        default=120.0,
        gt=0,
        allow_inf_nan=False,
        description="A queued job dispatched this long ago and not claimed is dispatched again"
        " (a lost message).",
    )
    sweep_interval_s: float = Field(
        default=1.0,
        gt=0,
        allow_inf_nan=False,
        description="How often the node stages, dispatches and requeues expired jobs.",
    )
    scratch_dir: Path | None = Field(
        default=None,
        description="Worker hosts: where a job's inputs and results live while it runs;"
        " null: a temporary folder.",
    )

    @property
    def enabled(self) -> bool:
        """Cluster mode is on exactly when a database URL is set."""
        return self.database_url is not None

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> ClusterConfig:
        if self.enabled:
            missing = [
                key
                for key, value in (
                    ("broker_url", self.broker_url),
                    ("objects.url", self.objects.url),
                )
                if value is None
            ]
            if missing:
                needed = " and ".join(f"cluster.{key}" for key in missing)
                raise ValueError(f"{needed}: required in cluster mode (cluster.database_url set)")
        return self


class NodeConfig(_Section):
    """The whole configuration of one dicom-node."""

    scp: ScpConfig = ScpConfig()
    store: StoreConfig = StoreConfig()
    assembly: AssemblyConfig = AssemblyConfig()
    routing: RoutingConfig = RoutingConfig()
    algorithms: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-algorithm settings by name, e.g. the path of public weights.",
    )
    worker: WorkerConfig = WorkerConfig()
    results: ResultsConfig = ResultsConfig()
    destinations: dict[str, Destination] = Field(
        default_factory=dict, description="Named places results are sent to."
    )
    peers: dict[AeTitle, Peer] = Field(
        default_factory=dict, description="Known AEs by title, for the 'sender' destination."
    )
    delivery: DeliveryConfig = DeliveryConfig()
    retrieve: RetrieveConfig = RetrieveConfig()
    retention: RetentionConfig = RetentionConfig()
    http: HttpConfig = HttpConfig()
    dicomweb: DicomwebConfig = DicomwebConfig()
    audit: AuditConfig = AuditConfig()
    logging: LoggingConfig = LoggingConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _destinations_exist(self) -> NodeConfig:
        known = {*self.destinations, SENDER}
        for key in self.destinations:
            if key == SENDER:
                raise ValueError(f"destinations.{SENDER}: the name is reserved for the caller")
        named = [("routing.destinations", d) for d in self.routing.destinations] + [
            (f"routing.rules.{i}.destinations", d)
            for i, rule in enumerate(self.routing.rules)
            for d in rule.destinations or []
        ]
        for where, name in named:
            if name not in known:
                raise ValueError(f"{where}: no destination named {name!r}")
        return self

    @model_validator(mode="after")
    def _retrieve_sources_exist(self) -> NodeConfig:
        for i, rule in enumerate(self.routing.rules):
            for name in rule.fetch_missing or []:
                if name not in self.retrieve.sources:
                    raise ValueError(
                        f"routing.rules.{i}.fetch_missing: no source named {name!r} under"
                        " retrieve.sources"
                    )
        return self


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        try:
            node[path[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"{'.'.join(path)}: environment variable {name} is not valid YAML: {exc}"
            ) from None
    return tree


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def describe_error(
    error: ValidationError, within: tuple[str, ...] = (), unknown: str = "unknown key"
) -> str:
    """One line naming each key that failed: ``scp.prot: unknown key``. ``within`` is where
    the validated mapping sits in the whole configuration (an algorithm's settings are
    validated by its own model, ``("algorithms", name)``), ``unknown`` says what an extra
    key is."""
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in (*within, *item["loc"])) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = unknown
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> NodeConfig:
    """Build the effective configuration: defaults, then the YAML file, then the environment.

    Raises :class:`ConfigError` naming the key for anything unusable.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_CONFIG_FILE)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
        data = loaded or {}
    data = _merge(data, _env_overrides(environ))
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc)) from None


def config_as_yaml(config: NodeConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
