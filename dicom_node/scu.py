"""A small modality simulator: C-ECHO and C-STORE of Part-10 files, for users without dcmtk.

Each file is sent exactly as stored (pynetdicom's chunked send streams the data set bytes from
the file), in a presentation context for its own SOP class and transfer syntax, so the receiver
sees what a modality would have sent. PS3.8 9.3.2.2 allows at most 128 presentation contexts in
one association; files needing more are sent over further associations.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

log = logging.getLogger(__name__)

MAX_CONTEXTS_PER_ASSOCIATION = 128  # PS3.8 9.3.2.2: presentation context IDs are odd, 1-255

# Stream files from disk instead of decoding and re-encoding them.
_config.STORE_SEND_CHUNKED_DATASET = True


class AssociationFailed(ConnectionError):
    """The peer rejected, aborted or never answered the association request."""


class AssociationRejected(AssociationFailed):
    """The peer answered A-ASSOCIATE-RJ (PS3.8 7.1.1.9); ``permanent`` when its result says
    that trying again will not help (e.g. our AE title is not known to it)."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class DicomFile:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    meta_matches_dataset: bool = True

    @property
    def context(self) -> tuple[str, str]:
        return self.sop_class_uid, self.transfer_syntax_uid


@dataclass
class SendReport:
    """What a send did, per file: the status the peer returned or why it was skipped."""

    sent: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped


def find_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named directly, and every file under named folders (recursive, sorted)."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def inspect_file(path: Path) -> DicomFile:
    """Read a Part-10 file's SOP class and transfer syntax from its file meta."""
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    meta = ds.file_meta
    sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    syntax = meta.get("TransferSyntaxUID")
    if not sop_class or not syntax:
        raise InvalidDicomError("no SOP Class UID or Transfer Syntax UID in the file meta")
    matches = (meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID")) == (
        ds.get("SOPClassUID"),
        ds.get("SOPInstanceUID"),
    )
    return DicomFile(path, str(sop_class), str(syntax), matches)


def _batches(files: list[DicomFile]) -> Iterator[list[DicomFile]]:
    """Split files into groups that each need at most 128 presentation contexts."""
    batch: list[DicomFile] = []
    contexts: set[tuple[str, str]] = set()
    for f in files:
        if f.context not in contexts and len(contexts) == MAX_CONTEXTS_PER_ASSOCIATION:
            yield batch
            batch, contexts = [], set()
        batch.append(f)
        contexts.add(f.context)
    if batch:
        yield batch


def _ae(calling_aet: str, *, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    return ae


def _associate(
    ae: AE, host: str, port: int, called_aet: str, tls: tuple[ssl.SSLContext, str] | None = None
) -> Association:
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls)
    peer = f"{called_aet} at {host}:{port}"
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        answer = assoc.acceptor.primitive
        raise AssociationRejected(
            f"{peer} rejected the association ({answer.result_str}, {answer.source_str}:"
            f" {answer.reason_str})",
            permanent=answer.result == 0x01,
        )
    if not assoc.is_established:
        raise AssociationFailed(f"association with {peer} failed (refused, aborted or no answer)")
    return assoc


def echo(
    host: str,
    port: int,
    *,
    calling_aet: str = "DICOMNODE_SCU",
    called_aet: str = "DICOMNODE",
    timeout_s: float = 30.0,
) -> int:
    """C-ECHO (PS3.7 9.1.5); returns the peer's status."""
    ae = _ae(calling_aet, timeout_s=timeout_s)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, host, port, called_aet)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise AssociationFailed("no C-ECHO response (timeout or abort)")
    return int(status.Status)


def send(
    paths: Iterable[Path],
    host: str,
    port: int,
    *,
    calling_aet: str = "DICOMNODE_SCU",
    called_aet: str = "DICOMNODE",
    timeout_s: float = 60.0,
    tls: tuple[ssl.SSLContext, str] | None = None,
) -> SendReport:
    """C-STORE every DICOM file under ``paths``; non-DICOM files are reported as skipped.

    One association per batch of at most 128 presentation contexts, each context exactly a
    sent file's SOP class and transfer syntax; ``tls`` is (client context, server name).
    """
    report = SendReport()
    files: list[DicomFile] = []
    for path in find_files(paths):
        try:
            files.append(inspect_file(path))
        except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
            report.skipped.append((path, f"not a DICOM Part-10 file: {exc}"))
    ae = _ae(calling_aet, timeout_s=timeout_s)
    for batch in _batches(files):
        contexts = sorted({f.context for f in batch})
        ae.requested_contexts = [build_context(c, [ts]) for c, ts in contexts]
        assoc = _associate(ae, host, port, called_aet, tls)
        try:
            for f in batch:
                _store_one(assoc, f, report)
        finally:
            if assoc.is_established:
                assoc.release()
    return report


def _store_one(assoc: Association, f: DicomFile, report: SendReport) -> None:
    # The chunked send takes the C-STORE's UIDs from the file meta; where a malformed file's
    # meta disagrees with its data set, send the decoded data set so the request names it.
    payload = f.path if f.meta_matches_dataset else dcmread(f.path)
    try:
        status = assoc.send_c_store(payload)
    except ValueError as exc:  # no accepted presentation context for this file
        report.failed.append((f.path, str(exc)))
        return
    code = int(status.Status) if "Status" in status else None
    if code is None:
        report.failed.append((f.path, "no response (timeout or abort)"))
    elif code == 0x0000:
        report.sent.append(f.path)
    elif code & 0xF000 == 0xB000:  # Warning, PS3.4 B.2.3: stored, perhaps coerced
        log.warning("%s stored with warning status 0x%04X", f.path.name, code)
        report.sent.append(f.path)
    else:
        report.failed.append((f.path, f"status 0x{code:04X}"))
