"""The generated tables of the DICOM Conformance Statement (``docs/conformance.md``).

A conformance statement (PS3.2) must list the SOP classes an AE supports as SCU and as SCP
(PS3.2 A.4.2, the AE specifications' "SOP Classes" tables) and the presentation contexts it
accepts and proposes (PS3.2 A.4.2.x.3, "Association Acceptance/Initiation Policy"). Those
tables are rendered here from the node's own constants — the SCP's storage SOP classes and
transfer syntaxes in :mod:`dicom_node.scp`, the routable classes in :mod:`dicom_node.route`,
and the objects :mod:`dicom_node.write` creates — with names from pydicom's UID registry.

In the document each generated table sits between ``<!-- generated: NAME -->`` and
``<!-- end generated -->``; :func:`rewrite` replaces those regions and
``dicom-node conformance tables --write docs/conformance.md`` runs it. A test fails when the
document and this module disagree.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pynetdicom
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    Comprehensive3DSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPIPHTJ2KReferenced,
    JPIPHTJ2KReferencedDeflate,
    MPEGTransferSyntaxes,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    SMPTEST211020UncompressedInterlacedActiveVideo,
    SMPTEST211020UncompressedProgressiveActiveVideo,
    SMPTEST211030PCMDigitalAudio,
)
from pynetdicom import sop_class

# pynetdicom makes its SOP class constants (Verification) at import, out of type checkers'
# sight: https://github.com/pydicom/pynetdicom/issues/558
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.errors import ConformanceDocError
from dicom_node.retrieve import QUERY_RETRIEVE_SOP_CLASSES
from dicom_node.route import ROUTABLE_SOP_CLASSES
from dicom_node.scp import (
    LOSSLESS_COMPRESSED,
    PRIVATE_STORAGE,
    PRIVATE_STORAGE_CLASSES,
    RETIRED_JPEG,
    UNCOMPRESSED,
    accepted_transfer_syntaxes,
    storage_sop_classes,
)

REGENERATE = "dicom-node conformance tables --write docs/conformance.md"


@dataclass(frozen=True)
class CreatedObject:
    """A kind of object :func:`dicom_node.write.write_all` creates, as DELIVERY sends it.

    ``kind`` is :attr:`dicom_node.write.Written.kind`; the SOP class and transfer syntax are
    those its writer builds with highdicom's default encoding (files
    are sent in the transfer syntax they are stored in, :func:`dicom_node.scu.send`).
    """

    kind: str
    sop_class_uid: str
    transfer_syntax_uid: str


CREATED_OBJECTS = (
    CreatedObject("SEG", SegmentationStorage, ExplicitVRLittleEndian),
    CreatedObject("SR", Comprehensive3DSRStorage, ExplicitVRLittleEndian),
    CreatedObject("SC", SecondaryCaptureImageStorage, ImplicitVRLittleEndian),
)

_LOSSY = "lossy"
_VIDEO = "video (lossy)"
_REFERENCED = "referenced pixel data"
_SMPTE = "uncompressed video/audio"
_LOSSLESS_OR_LOSSY = "lossless or lossy"
# What a transfer syntax is to a reader choosing what to send (PS3.5 Table A-1 and Annex A).
# Those pydicom 3.0 has no constant for are spelt out.
TRANSFER_SYNTAX_NOTES: dict[str, str] = {
    "1.2.840.10008.1.2.8.1": "lossless (deflated frames)",
    DeflatedExplicitVRLittleEndian: "uncompressed, data set deflated",
    ExplicitVRBigEndian: (
        "uncompressed (retired; stored as received, read re-encoded little endian)"
    ),
    ImplicitVRLittleEndian: "uncompressed; the default every SCU must offer",
    JPEGBaseline8Bit: _LOSSY,
    JPEGExtended12Bit: _LOSSY,
    JPEGLSNearLossless: "lossy (near-lossless)",
    JPEG2000: _LOSSLESS_OR_LOSSY,
    JPEG2000MC: _LOSSLESS_OR_LOSSY,
    "1.2.840.10008.1.2.4.94": _REFERENCED,  # JPIP Referenced
    "1.2.840.10008.1.2.4.95": _REFERENCED,  # JPIP Referenced Deflate
    **dict.fromkeys(MPEGTransferSyntaxes, _VIDEO),
    "1.2.840.10008.1.2.4.111": "lossless recompression of JPEG (lossy) data",  # JPEG XL
    "1.2.840.10008.1.2.4.112": _LOSSLESS_OR_LOSSY,  # JPEG XL
    HTJ2K: _LOSSLESS_OR_LOSSY,
    JPIPHTJ2KReferenced: _REFERENCED,
    JPIPHTJ2KReferencedDeflate: _REFERENCED,
    SMPTEST211020UncompressedProgressiveActiveVideo: _SMPTE,
    SMPTEST211020UncompressedInterlacedActiveVideo: _SMPTE,
    SMPTEST211030PCMDigitalAudio: _SMPTE,
}

_PYNETDICOM_KEYWORDS = {
    str(value): name for name, value in vars(sop_class).items() if isinstance(value, UID)
}


def sop_class_name(uid: str) -> str:
    """The name of a SOP class: pydicom's registry (PS3.6 Table A-1) without the suffix
    "SOP Class", marked when retired; else ours for the private classes; else pynetdicom's
    keyword in words (classes newer than pydicom's registry); else the UID itself."""
    name = UID(uid).name
    if name != uid:
        # pydicom's names of retired classes do not say so (its keywords do).
        return name.removesuffix(" SOP Class") + (" (retired)" if UID(uid).is_retired else "")
    # Before pynetdicom's keywords: dicom_node.scp registers the private classes with it.
    if uid in PRIVATE_STORAGE:
        return f"{PRIVATE_STORAGE[uid].name} (private)"
    if uid in _PYNETDICOM_KEYWORDS:
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", _PYNETDICOM_KEYWORDS[uid])
    return uid


def transfer_syntax_note(uid: str) -> str:
    """How a transfer syntax of Table 4.2-1 encodes pixel data (empty when nobody said)."""
    if uid in TRANSFER_SYNTAX_NOTES:
        return TRANSFER_SYNTAX_NOTES[uid]
    if uid in RETIRED_JPEG:
        return "retired JPEG process (PS3.5 Table A-1), still sent by archives"
    if uid in LOSSLESS_COMPRESSED:
        return "lossless"
    if uid in UNCOMPRESSED:
        return "uncompressed"
    return ""


def overview_table() -> str:
    """PS3.2 A.1 (Overview): the network services, SCU and SCP, by SOP class."""
    accepted = set(storage_sop_classes())
    rows = [
        "| Network services: SOP class | User of service (SCU) | Provider of service (SCP) |",
        "|---|---|---|",
        "| **Transfer** | | |",
    ]
    for created in CREATED_OBJECTS:
        scp = "Yes" if created.sop_class_uid in accepted else "No"
        rows.append(f"| {sop_class_name(created.sop_class_uid)} | Yes (results) | {scp} |")
    rows += [
        "| Every other storage SOP class of [Table 4.2-2](#table-4-2-2) "
        "| No (the node); Yes (the `dicom-node send` utility) | Yes |",
        "| **Query/Retrieve** | | |",
        *(
            f"| {sop_class_name(uid)} | Yes (fetching what is missing, § 4.2.4) | No |"
            for uid in QUERY_RETRIEVE_SOP_CLASSES
        ),
        "| **Verification** | | |",
        f"| {sop_class_name(Verification)} "
        "| No (the node); Yes (the `dicom-node echo` utility) | Yes |",
    ]
    return "\n".join(rows)


def scp_sop_classes_table() -> str:
    """PS3.2 A.4.2.1.1: the SOP classes of STORAGE-SCP (the listener of dicom_node.scp)."""
    return "\n".join(
        [
            "| SOP class | SOP class UID | SCU | SCP |",
            "|---|---|---|---|",
            f"| {sop_class_name(Verification)} | `{Verification}` | No | Yes |",
            "| every storage SOP class of [Table 4.2-2](#table-4-2-2) | | No | Yes |",
        ]
    )


def transfer_syntaxes_table() -> str:
    """PS3.2 A.4.2.1.3 (presentation contexts accepted): every transfer syntax STORAGE-SCP
    accepts, in its order of preference (:func:`dicom_node.scp.accepted_transfer_syntaxes`)."""
    rows = ["| # | transfer syntax | UID | note |", "|---|---|---|---|"]
    for number, uid in enumerate(accepted_transfer_syntaxes(), 1):
        rows.append(f"| {number} | {UID(uid).name} | `{uid}` | {transfer_syntax_note(uid)} |")
    return "\n".join(rows)


def storage_sop_classes_table() -> str:
    """PS3.2 A.4.2.1.3: Table 4.2-2, every storage SOP class STORAGE-SCP accepts
    (:func:`dicom_node.scp.storage_sop_classes`), and which of them are routed to algorithms
    (:data:`dicom_node.route.ROUTABLE_SOP_CLASSES`)."""
    classes = storage_sop_classes()
    private = sum(uid in PRIVATE_STORAGE_CLASSES for uid in classes)
    rows = [
        "<details>",
        f"<summary>The {len(classes)} storage SOP classes ({len(classes) - private} standard"
        f" and {private} private, with pynetdicom {pynetdicom.__version__})</summary>",
        "",
        "| SOP class | UID | routed |",
        "|---|---|---|",
    ]
    for uid in classes:
        routed = "yes" if uid in ROUTABLE_SOP_CLASSES else ""
        rows.append(f"| {sop_class_name(uid)} | `{uid}` | {routed} |")
    rows += ["", "</details>"]
    return "\n".join(rows)


def scu_sop_classes_table() -> str:
    """PS3.2 A.4.2.2.1: the SOP classes DELIVERY sends (the objects dicom_node.write creates)."""
    rows = ["| SOP class | SOP class UID | SCU | SCP |", "|---|---|---|---|"]
    for created in CREATED_OBJECTS:
        uid = created.sop_class_uid
        rows.append(f"| {sop_class_name(uid)} | `{uid}` | Yes | No |")
    return "\n".join(rows)


def scu_presentation_contexts_table() -> str:
    """PS3.2 A.4.2.2.3 (association initiation policy): the presentation contexts DELIVERY
    proposes for the objects it creates, one transfer syntax each, the one stored."""
    rows = [
        "| abstract syntax | transfer syntax | role | extended negotiation |",
        "|---|---|---|---|",
    ]
    for created in CREATED_OBJECTS:
        syntax = created.transfer_syntax_uid
        rows.append(
            f"| {sop_class_name(created.sop_class_uid)} | {UID(syntax).name} `{syntax}`"
            " | SCU | none |"
        )
    return "\n".join(rows)


TABLES: dict[str, Callable[[], str]] = {
    "overview-sop-classes": overview_table,
    "scp-sop-classes": scp_sop_classes_table,
    "scp-transfer-syntaxes": transfer_syntaxes_table,
    "scp-storage-sop-classes": storage_sop_classes_table,
    "scu-sop-classes": scu_sop_classes_table,
    "scu-presentation-contexts": scu_presentation_contexts_table,
}

_REGION = re.compile(
    r"^<!-- generated: (?P<name>[a-z0-9-]+) -->\n(?P<body>.*?)^<!-- end generated -->$",
    re.MULTILINE | re.DOTALL,
)


def region(name: str) -> str:
    """One generated region as it stands in the document, markers included."""
    return f"<!-- generated: {name} -->\n\n{TABLES[name]()}\n\n<!-- end generated -->"


def regions_of(text: str) -> dict[str, str]:
    """The generated regions of a document by name, markers included."""
    found: dict[str, str] = {}
    for match in _REGION.finditer(text):
        name = match["name"]
        if name in found:
            raise ConformanceDocError(f"generated region {name!r} appears twice")
        if "<!-- generated: " in match["body"]:
            raise ConformanceDocError(f"generated region {name!r} has no end marker")
        found[name] = match[0]
    return found


def rewrite(text: str) -> str:
    """``text`` with every generated region replaced by what the code says now."""
    found = regions_of(text)
    if found.keys() != TABLES.keys():
        missing = sorted(TABLES.keys() - found.keys())
        unknown = sorted(found.keys() - TABLES.keys())
        raise ConformanceDocError(
            f"generated regions missing: {missing or 'none'}; unknown: {unknown or 'none'}"
        )
    return _REGION.sub(lambda match: region(match["name"]), text)
